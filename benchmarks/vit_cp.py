"""Time and peak memory per rank of the Rice ViT split over context-parallel ranks, on CPU.

The release's tower (width 1024, 16 heads, MLP 4096, patch 14, 2×2 merger to the 4B LM's 2560;
``--layers`` of its 24 layers) runs on one pack of ``--lm-tokens`` LM tokens at CP 1, 2 and 4
(gloo ranks, one thread each). Each CP rank takes its load-balanced part of the pack's tokens
(``thd_model_inputs``), runs the tower and merger on its own whole images
(``models/llava_ov/vision_cp.py``), all-gathers the merged features and places those its
``<|image_pad|>`` tokens need, through the model's own code (``_merge_image_embeddings``), then
backward from ``Σ embeddings²``. The LM layers are not run (they are split over CP with or
without this change). Cases:

- ``uniform``: ``--images`` images of ``--image-grid`` patches (the release's pack: ~30
  images of ~1000 patches, ~30k patches per 8k pack);
- ``skewed``: one page-sized image (``--page-grid``, ~43 % of the pack's patches, as a
  1400 × 1820 px page is of 30k) plus images of ``--image-grid`` filling the same patch total.

Per rank it reports the images and patches it ran, the wall and CPU seconds of forward +
backward, and the peak resident memory added during them (Linux ``VmHWM``, reset before the
forward, minus the resident memory before it). The CPU seconds are each rank's own work; the
wall time includes waiting for the slowest rank in the all-gather and, on a machine with fewer
cores than ranks, for a core. Results go to ``docs/rice-vit.md``.

    python benchmarks/vit_cp.py [--cp 1 2 4] [--cases uniform skewed] [--layers 2]
        [--image-grid 16 16] [--page-grid 56 58] [--images 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_TOKEN = 3000  # the benchmark's small vocabulary (4096) holds the image token id


def pack_grids(case: str, images: int, image_grid: list[int], page_grid: list[int]) -> list:
    """The pack's image grids ``(h, w)`` for ``case``."""
    h, w = image_grid
    if case == "uniform":
        return [(h, w)] * images
    ph, pw = page_grid
    fill = max(1, (images * h * w - ph * pw) // (h * w))
    return [(ph, pw)] + [(h, w)] * fill


def _rss_and_peak() -> tuple[int, int]:
    """Resident and peak resident (``VmHWM``) bytes of this process."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS
        f.write("5")


def _pack(grids: list, lm_tokens: int, text_per_image: int):
    """One row of ``lm_tokens``: per image a sub-sample of text then its ``h·w/4`` image
    tokens; text fills the rest. Returns the batch (task-encoder layout) and pixel rows."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids, bounds = [], [0]
    for h, w in grids:
        # Each sub-sample a multiple of 16 tokens: CP (≤ 8) then adds no padding tokens, whose
        # id is outside the benchmark's small vocabulary.
        text = text_per_image + (-(text_per_image + h * w // 4)) % 16
        ids += torch.randint(0, 2000, (text,), generator=gen).tolist()
        ids += [IMAGE_TOKEN] * (h * w // 4)
        bounds.append(len(ids))
    if len(ids) > lm_tokens:
        raise SystemExit(f"vit_cp: the images need {len(ids)} tokens, more than {lm_tokens}")
    if len(ids) < lm_tokens:
        ids += torch.randint(0, 2000, (lm_tokens - len(ids),), generator=gen).tolist()
        bounds.append(lm_tokens)
    input_ids = torch.tensor([ids])
    labels = torch.where(input_ids == IMAGE_TOKEN, -100, input_ids)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "loss_mask": (labels >= 0).float(),
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        "pixel_values": torch.randn(sum(h * w for h, w in grids), 588, generator=gen),
        "image_grid_thw": torch.tensor([[1, h, w] for h, w in grids]),
    }
    return batch


def run_rank(spec: dict) -> dict:
    """One CP rank: build the model, one small warm-up pass, then the measured pass."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from lov15_megatron.config import load_config
    from lov15_megatron.models.llava_ov.model import LLaVAOneVisionModel
    from lov15_megatron.models.llava_ov.vision_cp import ImageSplit
    from lov15_megatron.models.packed_seq import thd_model_inputs
    from lov15_megatron.runtime import distributed

    cp = spec["cp"]
    cfg = load_config(
        ROOT / "configs/models/llava_ov_1_5_4b.yaml",
        [
            "runtime.device=cpu", "model.params_dtype=float32",
            f"model.vision.num_layers={spec['layers']}", "model.language.num_layers=1",
            "model.language.vocab_size=4096", f"model.vision.image_token_id={IMAGE_TOKEN}",
            "model.vision.vision_start_token_id=3001", "model.vision.vision_end_token_id=3002",
            f"data.seq_length={spec['lm_tokens']}", f"parallel.context_parallel_size={cp}",
        ],
    )  # fmt: skip
    distributed.initialize(cfg)
    rank = parallel_state.get_context_parallel_rank()
    model = LLaVAOneVisionModel(cfg)
    model.train()

    def step(grids: list, lm_tokens: int) -> None:
        batch = _pack(grids, lm_tokens, spec["text_per_image"])
        inputs = thd_model_inputs(batch, cp=cp, cp_rank=rank, image_token_id=IMAGE_TOKEN)
        emb = model._merge_image_embeddings(
            inputs["input_ids"],
            inputs["pixel_values"],
            inputs["image_grid_thw"],
            inputs.get("image_feature_index"),
        )
        emb.square().sum().backward()

    step([(4, 4)] * cp, 64 * cp)  # warm-up: every rank one small image
    model.zero_grad(set_to_none=False)  # grads stay allocated: the peak is activations
    dist.barrier()
    _reset_peak()
    base, _ = _rss_and_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    step(spec["grids"], spec["lm_tokens"])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    _, peak = _rss_and_peak()
    split = ImageSplit.of(spec["grids"], cp, 2)
    return {
        "rank": rank,
        "images": model.tower_images,
        "patches": split.patches_per_rank()[rank],
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_gib": (peak - base) / 2**30,
        "maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cp", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--cases", nargs="+", default=["uniform", "skewed"],
                    choices=["uniform", "skewed"])  # fmt: skip
    ap.add_argument("--layers", type=int, default=2, help="ViT layers (the release has 24)")
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--image-grid", nargs=2, type=int, default=[16, 16], metavar=("H", "W"))
    ap.add_argument("--page-grid", nargs=2, type=int, default=[56, 58], metavar=("H", "W"))
    ap.add_argument("--lm-tokens", type=int, default=8192)
    ap.add_argument("--text-per-image", type=int, default=40, help="text tokens before each")
    ap.add_argument("--json", type=Path, help="also write every rank's numbers here")
    args = ap.parse_args()
    if args.lm_tokens % 16:
        ap.error(f"--lm-tokens must be a multiple of 16, got {args.lm_tokens}")
    for g in (*args.image_grid, *args.page_grid):
        if g <= 0 or g % 2:
            ap.error(f"grid sides must be positive multiples of 2, got {g}")

    from lov15_megatron.runtime.launch import run_ranks

    rows = []
    print("| case | CP | images per rank | patches per rank | wall s (slowest rank) | "
          "CPU s per rank (max / min) | peak GiB per rank (max) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for case in args.cases:
        grids = pack_grids(case, args.images, args.image_grid, args.page_grid)
        for cp in args.cp:
            spec = {"cp": cp, "grids": grids, "layers": args.layers, "lm_tokens": args.lm_tokens,
                    "text_per_image": args.text_per_image}  # fmt: skip
            ranks = sorted(run_ranks(cp, run_rank, spec, timeout=3600.0), key=lambda r: r["rank"])
            rows.append({"case": case, "cp": cp, "grids": grids, "ranks": ranks})
            images = "/".join(str(r["images"]) for r in ranks)
            patches = "/".join(str(r["patches"]) for r in ranks)
            cpu = [r["cpu_s"] for r in ranks]
            print(f"| {case} | {cp} | {images} | {patches} | "
                  f"{max(r['wall_s'] for r in ranks):.1f} | {max(cpu):.1f} / {min(cpu):.1f} | "
                  f"{max(r['peak_gib'] for r in ranks):.2f} |", flush=True)  # fmt: skip
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
