"""Packing benchmark: ours (best-fit-decreasing) vs first-fit vs a release-style bucket scheme,
and energon loader throughput on packed shards. Results go to ``docs/data-packing.md``.

    python benchmarks/packing.py --samples 1000000 --seq-len 8192
    python benchmarks/packing.py --loader-packs 8192   # also measure the loader

Synthetic samples (``synthetic_samples``: lengths and ViT patches), like the release's data mix:

- 70 % caption-like (stage 1 / mid-training): one image whose width and height are drawn
  log-normally around 512 px (σ = 0.5), turned into LM tokens by the real ``smart_resize``
  (min 3136, max 2,560,000 px), plus log-normal caption text (median 120 tokens, σ = 0.6)
  and 25 template tokens;
- 30 % instruct-like (stage 2): 0–3 such images (probabilities .2/.6/.15/.05) plus
  log-normal dialogue text (median 350 tokens, σ = 1.0) and 25 template tokens per turn pair;
- samples over ``--seq-len`` are dropped and counted (the packer reports them as too_long).

It also reports the ViT cost spread over the BFD packs (max/mean, p99/mean, std/mean of
``6144·Σ patches + Σ patches²`` per pack) without and with ``balance_cost``.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from packing_baselines import first_fit, release_style  # benchmarks/ is the script's folder

from lov15_megatron.data.image_processing import image_token_count
from lov15_megatron.data.pack_plan import vit_cost, vit_cost_spread
from lov15_megatron.data.packing import (
    balance_cost,
    best_fit_decreasing,
    best_fit_decreasing_assign,
    lower_bound_packs,
    pack_statistics,
)


def synthetic_samples(count: int, seq_len: int, seed: int = 0) -> tuple[dict[str, list[int]], int]:
    """(``length``, ``patches`` = Σ h·w, ``patches_sq`` = Σ (h·w)² per sample ≤ seq_len, number
    dropped as too long). An image of n LM tokens has 4·n ViT patches (2×2 merge)."""
    rng = random.Random(seed)

    def image_tokens() -> int:
        width = max(16, int(rng.lognormvariate(6.24, 0.5)))  # median ~512 px
        height = max(16, int(width * rng.lognormvariate(-0.2, 0.3)))
        try:
            return image_token_count(height, width)
        except ValueError:
            return 0

    samples: dict[str, list[int]] = {"length": [], "patches": [], "patches_sq": []}
    dropped = 0
    for _ in range(count):
        if rng.random() < 0.7:
            images = [image_tokens()]
            text = 25 + int(rng.lognormvariate(4.79, 0.6))
        else:
            count_images = rng.choices((0, 1, 2, 3), weights=(0.2, 0.6, 0.15, 0.05))[0]
            turns = 1 + int(rng.expovariate(1.0))
            images = [image_tokens() for _ in range(count_images)]
            text = 25 * turns + int(rng.lognormvariate(5.86, 1.0))
        images = [tokens for tokens in images if tokens]
        length = text + sum(tokens + 2 for tokens in images)  # + vision_start/end
        if length > seq_len:
            dropped += 1
            continue
        samples["length"].append(length)
        samples["patches"].append(sum(4 * tokens for tokens in images))
        samples["patches_sq"].append(sum((4 * tokens) ** 2 for tokens in images))
    return samples, dropped


def bench_algorithms(count: int, seq_len: int) -> dict:
    samples, dropped = synthetic_samples(count, seq_len)
    lengths = samples["length"]
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
    results["vision_balance"] = bench_balance(samples, seq_len)
    print("vision_balance", results["vision_balance"], flush=True)
    return results


def bench_balance(samples: dict[str, list[int]], seq_len: int) -> dict:
    """ViT cost spread over BFD packs without and with :func:`balance_cost` (same packs'
    lengths, so the same fill)."""
    lengths = np.asarray(samples["length"])
    patches = np.asarray(samples["patches"], dtype=np.int64)
    patches_sq = np.asarray(samples["patches_sq"], dtype=np.int64)
    cost = vit_cost(patches, patches_sq)
    pack_of = best_fit_decreasing_assign(lengths, seq_len)
    num_packs = int(pack_of.max()) + 1
    started = time.perf_counter()
    balanced = balance_cost(lengths, pack_of, cost)
    seconds = time.perf_counter() - started

    def spread(assignment: np.ndarray) -> dict:
        out = vit_cost_spread(assignment, num_packs, cost, patches, patches_sq)
        fill = np.bincount(assignment, weights=lengths, minlength=num_packs).sum()
        out["fill_efficiency"] = round(float(fill) / (num_packs * seq_len), 6)
        return out

    return {
        "packs": num_packs,
        "without": spread(pack_of),
        "with": spread(balanced),
        "balance_seconds": round(seconds, 2),
    }


def gradient_jpeg(side: int, seed: int) -> bytes:
    """A deterministic side×side gradient JPEG (real pixels for the loader to decode)."""
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side]
    pixels = np.stack([(x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, (x * y) % 256], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def bench_loader(num_packs: int, seq_len: int) -> dict:
    """Pack generated samples with the real packer, then time energon's loader (0 workers)."""
    from lov15_megatron.data.loader import build_train_loader, data_parallel_worker_config
    from lov15_megatron.data.offline_packing import PackConfig, run
    from lov15_megatron.data.tokenizer import load_tokenizer

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        for index in range(16):
            side = 224 + 28 * index
            (root / "images" / f"{index}.jpg").write_bytes(gradient_jpeg(side, index))
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
