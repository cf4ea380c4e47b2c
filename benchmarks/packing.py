"""Packing benchmark: ours (best-fit-decreasing) vs first-fit vs a release-style bucket scheme,
and energon loader throughput on packed shards. Results go to ``docs/data-packing.md``.

    python benchmarks/packing.py --samples 1000000 --seq-len 8192
    python benchmarks/packing.py --loader-packs 8192   # also measure the loader

Synthetic lengths (``synthetic_lengths``), shaped like the release's data mix:

- 70 % caption-like (stage 1 / mid-training): one image whose width and height are drawn
  log-normally around 512 px (σ = 0.5), turned into LM tokens by the real ``smart_resize``
  (min 3136, max 2,560,000 px), plus log-normal caption text (median 120 tokens, σ = 0.6)
  and 25 template tokens;
- 30 % instruct-like (stage 2): 0–3 such images (probabilities .2/.6/.15/.05) plus
  log-normal dialogue text (median 350 tokens, σ = 1.0) and 25 template tokens per turn pair;
- samples over ``--seq-len`` are dropped and counted (the packer reports them as too_long).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from lov15_megatron.data.image_processing import image_token_count
from lov15_megatron.data.packing import (
    best_fit_decreasing,
    first_fit,
    lower_bound_packs,
    pack_statistics,
    release_style,
)


def synthetic_lengths(count: int, seq_len: int, seed: int = 0) -> tuple[list[int], int]:
    """(lengths ≤ seq_len, number dropped as too long)."""
    rng = random.Random(seed)

    def image_tokens() -> int:
        width = max(16, int(rng.lognormvariate(6.24, 0.5)))  # median ~512 px
        height = max(16, int(width * rng.lognormvariate(-0.2, 0.3)))
        try:
            return image_token_count(height, width) + 2  # + vision_start/end
        except ValueError:
            return 0

    lengths, dropped = [], 0
    for _ in range(count):
        if rng.random() < 0.7:
            length = 25 + image_tokens() + int(rng.lognormvariate(4.79, 0.6))
        else:
            images = rng.choices((0, 1, 2, 3), weights=(0.2, 0.6, 0.15, 0.05))[0]
            turns = 1 + int(rng.expovariate(1.0))
            length = 25 * turns + sum(image_tokens() for _ in range(images))
            length += int(rng.lognormvariate(5.86, 1.0))
        if length > seq_len:
            dropped += 1
        else:
            lengths.append(length)
    return lengths, dropped


def bench_algorithms(count: int, seq_len: int) -> dict:
    lengths, dropped = synthetic_lengths(count, seq_len)
    results = {
        "samples": len(lengths),
        "dropped_too_long": dropped,
        "mean_length": sum(lengths) / len(lengths),
        "lower_bound_packs": lower_bound_packs(lengths, seq_len),
    }
    for name, algorithm in (
        ("ours_best_fit_decreasing", best_fit_decreasing),
        ("first_fit", first_fit),
        ("release_style_buckets", release_style),
    ):
        started = time.perf_counter()
        packs = algorithm(lengths, seq_len)
        seconds = time.perf_counter() - started
        stats = pack_statistics(lengths, packs, seq_len)
        results[name] = {
            "packs": len(packs),
            "fill_efficiency": round(stats["fill_efficiency"], 5),
            "samples_per_pack": round(stats["samples_per_pack"], 3),
            "padding_compression": round(stats["padding_compression"], 2),
            "seconds": round(seconds, 2),
            "samples_per_s": round(len(lengths) / seconds),
        }
        print(name, results[name], flush=True)
    return results


def bench_loader(num_packs: int, seq_len: int) -> dict:
    """Pack generated samples with the real packer, then time energon's loader (0 workers)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from data_fixtures import image_bytes

    from lov15_megatron.data.loader import build_train_loader, data_parallel_worker_config
    from lov15_megatron.data.offline_packing import PackConfig, run
    from lov15_megatron.data.tokenizer import load_tokenizer

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        for index in range(16):
            side = 224 + 28 * index
            (root / "images" / f"{index}.jpg").write_bytes(image_bytes(side, side, "JPEG", index))
        records = []
        target_tokens = num_packs * seq_len * 0.98
        tokens = 0
        while tokens < target_tokens:
            index = rng.randrange(16)
            side = 224 + 28 * index
            words = " ".join("word" for _ in range(rng.randint(20, 300)))
            records.append(
                {
                    "image": f"images/{index}.jpg",
                    "conversations": [
                        {"from": "human", "value": "<image>\nDescribe."},
                        {"from": "gpt", "value": words},
                    ],
                }
            )
            tokens += (side // 28) ** 2 + len(words) // 5 + 40
        (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
        started = time.perf_counter()
        report = run(
            PackConfig(
                inputs=(str(root / "data.jsonl"),),
                output=str(root / "packed"),
                tokenizer="qwen-offline",
                seq_len=seq_len,
                workers=2,
            ),
            progress=False,
        )
        pack_seconds = time.perf_counter() - started
        loader = build_train_loader(
            root / "packed",
            tokenizer=load_tokenizer("qwen-offline"),
            micro_batch_size=1,
            worker_config=data_parallel_worker_config(0, 1, 0),
        )
        iterator = iter(loader)
        next(iterator)  # warm-up
        count = min(report["packs"], 512)
        started = time.perf_counter()
        for _ in range(count):
            next(iterator)
        seconds = time.perf_counter() - started
    return {
        "raw_samples": len(records),
        "packs": report["packs"],
        "packer_wall_s_2_workers": round(pack_seconds, 1),
        "packer_samples_per_s": round(len(records) / pack_seconds),
        "loader_packs_timed": count,
        "loader_packs_per_s_per_worker": round(count / seconds, 2),
        "loader_tokens_per_s_per_worker": round(
            count * seq_len * report["fill_efficiency"] / seconds
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--loader-packs", type=int, default=0, help="0: skip the loader benchmark")
    args = parser.parse_args()
    results = {"algorithms": bench_algorithms(args.samples, args.seq_len)}
    if args.loader_packs:
        results["loader"] = bench_loader(args.loader_packs, args.seq_len)
        print("loader", results["loader"], flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
