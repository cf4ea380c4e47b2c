"""Peak memory of the whole packer against the number of samples. Results: docs/data-packing.md.

    python benchmarks/packing_memory.py --samples 50000 200000 1000000 [--workers 1]

For each count, generates a JSONL set of that many LLaVA-style records that share 64 PNG files
(64–1,000 px sides, so image token counts vary; 5–80 words of text; 1 in 5 records without an
image, 1 in 10 with two), runs ``tools/pack_offline.py`` (all phases, one process with
``--workers 1``) as a child process and reads the child's peak RSS from ``wait4``. Prints, per
count, the peak RSS, bytes per sample and the report's per-phase wall times, then the marginal
bytes per sample (the slope between the smallest and the largest count) and the extrapolation
to 85M samples.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--balance-vision", action="store_true")
    args = parser.parse_args()
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
