"""Memory of a full fine-tune step against a LoRA step at Qwen3-4B's width, on CPU.

The Qwen3-4B language model (``configs/models/qwen3_4b.yaml``: hidden 2560, 32 heads, 8 KV
groups, head dim 128, ffn 9728, the 151 936-word vocabulary with tied embeddings) cut to
``--layers`` decoder layers, one sequence of ``--seq`` tokens per step, fp32 (or
``--dtype bfloat16``), built with the trainer's own set-up (Megatron DDP, the distributed
optimizer, Adam) and trained ``--steps`` steps on the synthetic stream:

- ``full``: every parameter trains;
- ``lora``: ``peft`` with rank ``--rank`` (alpha 2·rank) on linear_qkv, linear_proj, linear_fc1
  and linear_fc2 of every layer; all else frozen.

Each case runs in a fresh process and reports its parameter counts, the bytes of the gradient
buffers and of the optimizer state it actually holds (Adam's moments, plus fp32 master copies
for bf16 weights), the peak resident memory of the process (``ru_maxrss``) and that above the
process after start-up (``peak_added``), one step's time, and the size of its training
checkpoint on disk (a full run's holds every weight and its optimizer state; a LoRA run's the
adapters and theirs). Results go to ``docs/lora.md``.

    python benchmarks/lora_memory.py [--layers 2] [--seq 2048] [--rank 16] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_case(kind: str, layers: int, seq: int, rank: int, dtype: str, steps: int) -> dict:
    """Inside one rank: build, train ``steps`` steps, save a training checkpoint; measure."""
    import torch

    from lov15_megatron.config import load_config
    from lov15_megatron.models.registry import family_for_config
    from lov15_megatron.runtime import distributed
    from lov15_megatron.training import checkpointing, setup, synthetic
    from lov15_megatron.training.step import train_step

    overrides = [
        f"model.language.num_layers={layers}", f"model.params_dtype={dtype}",
        "model.language.max_position_embeddings=4096", f"data.seq_length={seq}",
        "train.micro_batch_size=1", "train.global_batch_size=1", f"train.train_iters={steps}",
        "runtime.device=cpu", "optimizer.lr=1e-4",
    ]  # fmt: skip
    if kind == "lora":  # the base is random here: a LoRA run's checkpoint.pretrained, unread
        overrides += [f"peft={{rank: {rank}, alpha: {2.0 * rank}}}", "checkpoint.pretrained=unread"]
    cfg = load_config("configs/models/qwen3_4b.yaml", overrides)
    distributed.initialize(cfg)
    start = _rss()
    model = setup.wrap_ddp(cfg, setup.build_model_chunks(cfg, family_for_config(cfg).build_model))
    optimizer = setup.build_optimizer(cfg, model)
    scheduler = setup.build_scheduler(cfg, optimizer)
    data = synthetic.synthetic_batches(cfg)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step(cfg, data, model, optimizer, scheduler, setup.num_microbatches(cfg))
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = [p for c in model for p in c.module.parameters()]
    grad_bytes = sum(
        p.main_grad.numel() * p.main_grad.element_size() for p in params if hasattr(p, "main_grad")
    )
    state_bytes = 0
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in chained.optimizer.state.values():
            state_bytes += sum(
                t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor)
            )
        # bf16 weights: the distributed optimizer's fp32 master copies of its shards
        for group in getattr(chained, "shard_fp32_from_float16_groups", []):
            state_bytes += sum(p.numel() * p.element_size() for p in group)
    with tempfile.TemporaryDirectory(dir=ROOT / "outputs") as tmp:
        path = checkpointing.save_checkpoint(
            tmp, steps, model, optimizer, scheduler, {"iteration": steps}
        )
        checkpoint_bytes = _dir_bytes(path)
    distributed.shutdown()
    return {
        "kind": kind,
        "params": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "grad_buffer_bytes": grad_bytes,
        "optimizer_state_bytes": state_bytes,
        "peak_rss": peak,
        "peak_added": peak - start,
        "step_s": min(times),
        "checkpoint_bytes": checkpoint_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    args = ap.parse_args()
    from lov15_megatron.runtime.launch import run_ranks

    (ROOT / "outputs").mkdir(exist_ok=True)
    rows = []
    for kind in args.kinds:  # each in a fresh process: peak RSS is per process
        (row,) = run_ranks(1, run_case, kind, args.layers, args.seq, args.rank, args.dtype,
                           args.steps, timeout=3600.0)  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    gib = 2.0**30
    print(f"\n{args.layers} layers, seq {args.seq}, {args.dtype}, LoRA rank {args.rank}")
    print("| | params | trainable | weights | grad buffers | optimizer state | peak RSS "
          "(added) | step | checkpoint |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['kind']} | {r['params'] / 1e6:.1f} M | {r['trainable'] / 1e6:.2f} M | "
            f"{r['weight_bytes'] / gib:.2f} GiB | {r['grad_buffer_bytes'] / gib:.3f} GiB | "
            f"{r['optimizer_state_bytes'] / gib:.3f} GiB | {r['peak_rss'] / gib:.2f} "
            f"({r['peak_added'] / gib:.2f}) GiB | {r['step_s']:.1f} s | "
            f"{r['checkpoint_bytes'] / 2**20:.1f} MiB |"
        )


if __name__ == "__main__":
    main()
