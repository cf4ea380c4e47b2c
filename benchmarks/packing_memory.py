"""Peak memory of the whole packer against the number of samples. Results: docs/data-packing.md.

    python benchmarks/packing_memory.py --samples 50000 200000 1000000 [--workers 1]

For each count, generates a JSONL set of that many LLaVA-style records that share 64 PNG files
(64–1,000 px sides, so image token counts vary; 5–80 words of text; 1 in 5 records without an
image, 1 in 10 with two), runs ``tools/pack_offline.py`` (all phases, one process with
``--workers 1``) as a child process and reads the child's peak RSS from ``wait4``. Prints, per
count, the peak RSS, bytes per sample and the report's per-phase wall times, then the marginal
bytes per sample (the slope between the smallest and the largest count) and the extrapolation
to 85M samples.

    python benchmarks/packing_memory.py --plan-samples 2000000 8000000 [--balance-vision]

measures the one phase whose memory grows with the corpus, planning (BFD over all lengths), on
synthetic sample tables of millions of rows, without measuring millions of real records.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = 85_000_000


def flat_png(width: int, height: int, seed: int) -> bytes:
    """A small deterministic PNG (one flat colour, a few KB: only its size in pixels matters)."""
    from PIL import Image

    image = Image.new("RGB", (width, height), ((seed * 37) % 256, (seed * 91) % 256, 128))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_dataset(root: Path, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    for index in range(64):
        width, height = 64 + (index * 149) % 937, 64 + (index * 83) % 937
        (root / "images" / f"{index}.png").write_bytes(flat_png(width, height, index))
    words = ["red", "green", "blue", "square", "circle", "large", "small", "image", "the", "a"]
    path = root / "data.jsonl"
    with open(path, "w") as stream:
        for _ in range(count):
            draw = rng.random()
            images = 0 if draw < 0.2 else (2 if draw > 0.9 else 1)
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(5, 80)))
            record = {
                "conversations": [
                    {"from": "human", "value": "<image>" * images + "Describe it."},
                    {"from": "gpt", "value": answer},
                ]
            }
            if images:
                record["image"] = [f"images/{rng.randrange(64)}.png" for _ in range(images)]
            stream.write(json.dumps(record) + "\n")
    return path


def measure_tool(count: int, workers: int, balance: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="packmem-") as tmp:
        source = write_dataset(Path(tmp), count)
        command = [sys.executable, str(ROOT / "tools" / "pack_offline.py"), "--input", str(source)]
        command += ["--output", str(Path(tmp) / "packed"), "--tokenizer", "qwen-offline"]
        command += ["--seq-len", "8192", "--workers", str(workers), "--no-progress"]
        command += ["--balance-vision"] if balance else []
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        stderr = child.stderr.read().decode() if child.stderr else ""
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"pack_offline failed: {stderr[-2000:]}")
        report = json.loads((Path(tmp) / "packed" / "pack_report.json").read_text())
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    return {
        "samples": count,
        "peak_rss_bytes": peak,
        "bytes_per_sample": round(peak / count, 1),
        "wall_s": round(seconds, 1),
        "phase_wall_s": report["wall_time_s"],
        "packs": report["packs"],
        "fill_efficiency": round(report["fill_efficiency"], 5),
        "vision_balance": report["vision_balance"],
    }


def synthetic_table(count: int, seed: int = 0):
    """A sample table (:data:`SAMPLE_DTYPE`) of ``count`` rows, vectorised: 70 % one image of
    log-normal size around 512 px (tokens ≈ pixels / 28², clipped to the default min/max
    pixels) plus log-normal text as in ``benchmarks/packing.py``; 30 % text only, log-normal."""
    import numpy as np

    from lov15_megatron.data.sample_store import SAMPLE_DTYPE

    rng = np.random.default_rng(seed)
    width = np.maximum(16, rng.lognormal(6.24, 0.5, count))
    height = np.maximum(16, width * rng.lognormal(-0.2, 0.3, count))
    tokens = np.clip(width * height / 784, 4, 3265).astype(np.int64)
    tokens[rng.random(count) >= 0.7] = 0
    text = np.where(tokens > 0, rng.lognormal(4.79, 0.6, count), rng.lognormal(5.86, 1.0, count))
    lengths = np.minimum(8192, 25 + tokens + 2 * (tokens > 0) + text.astype(np.int64))
    table = np.zeros(count, dtype=SAMPLE_DTYPE)
    table["source"], table["record"], table["length"] = 0, np.arange(count), lengths
    table["patches"], table["patches_sq"] = 4 * tokens, (4 * tokens) ** 2
    table["image_bytes"] = 100_000 * (tokens > 0)
    return table


def plan_child(count: int, balance: bool, directory: str) -> None:
    """Child process: write a synthetic table, then the plan phase's work on it."""
    import numpy as np

    from lov15_megatron.data.pack_plan import make_plan, save_plan
    from lov15_megatron.data.sample_store import load_table

    path = Path(directory) / "samples.npy"
    if count:
        np.save(path, synthetic_table(count))
        table = load_table(path)  # memory-mapped, as in the plan phase
        plan = make_plan(table, 8192, 0, 1000, 1 << 30, balance)
        save_plan(plan, Path(directory) / "plan")


def measure_plan(count: int, balance: bool) -> dict:
    """Peak RSS of the plan phase alone on ``count`` synthetic rows (a child process)."""
    with tempfile.TemporaryDirectory(prefix="planmem-") as tmp:
        command = [sys.executable, __file__, "--plan-child", str(count), tmp]
        command += ["--balance-vision"] if balance else []
        started = time.perf_counter()
        child = subprocess.Popen(command)
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError("plan child failed")
    return {
        "samples": count,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--balance-vision", action="store_true")
    parser.add_argument(
        "--plan-samples",
        type=int,
        nargs="+",
        default=None,
        help="instead: peak RSS of the plan phase alone on synthetic tables of these sizes",
    )
    parser.add_argument("--plan-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plan_child:
        plan_child(int(args.plan_child[0]), args.balance_vision, args.plan_child[1])
        return
    if args.plan_samples:
        base = measure_plan(0, args.balance_vision)
        print(json.dumps({"imports_only": base}), flush=True)
        for count in sorted(args.plan_samples):
            result = measure_plan(count, args.balance_vision)
            grown = result["peak_rss_bytes"] - base["peak_rss_bytes"]
            result["bytes_per_sample_above_imports"] = round(grown / count, 1)
            result["extrapolated_85M_GiB"] = round(
                (base["peak_rss_bytes"] + grown / count * CORPUS) / 2**30, 2
            )
            print(json.dumps(result), flush=True)
        return
    results = []
    for count in sorted(args.samples):
        results.append(measure_tool(count, args.workers, args.balance_vision))
        print(json.dumps(results[-1]), flush=True)
    summary: dict = {"runs": results}
    if len(results) >= 2:
        small, large = results[0], results[-1]
        slope = (large["peak_rss_bytes"] - small["peak_rss_bytes"]) / (
            large["samples"] - small["samples"]
        )
        base = small["peak_rss_bytes"] - slope * small["samples"]
        summary["marginal_bytes_per_sample"] = round(slope, 1)
        summary["fixed_bytes"] = round(base)
        summary["extrapolated_85M_GiB"] = round((base + slope * CORPUS) / 2**30, 2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
