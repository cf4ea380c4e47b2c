"""Training entry point: ``python -m lov15_megatron.train --config CFG.yaml [key.sub=value …]``.

Launched by ``torchrun`` on any number of ranks, or as a single plain process. Reads top to
bottom: config → runtime → model → optimizer → (weights) → loop with metrics → save.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lov15_megatron.config import RunConfig, format_config, load_config
from lov15_megatron.models.qwen3 import build_qwen3_model, zero_vocab_padding
from lov15_megatron.runtime import distributed
from lov15_megatron.runtime.distributed import print_rank_0
from lov15_megatron.training import checkpointing, setup, synthetic
from lov15_megatron.training.step import train_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config in configs/")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser.parse_args(argv)


def language_model_provider(cfg: RunConfig, vp_stage: int | None):
    return build_qwen3_model(cfg, vp_stage=vp_stage)


def train(cfg: RunConfig) -> list[float]:
    """Train for ``cfg.train.train_iters`` steps; returns the per-step losses."""
    rt = distributed.initialize(cfg)
    print_rank_0(format_config(cfg))
    print_rank_0(
        f"runtime: device={rt.device} backend={rt.backend} world={rt.world_size} "
        f"TP={rt.tensor_parallel} PP={rt.pipeline_parallel} CP={rt.context_parallel} "
        f"DP={rt.data_parallel}"
    )
    model = setup.wrap_ddp(cfg, setup.build_model_chunks(cfg, language_model_provider))
    if cfg.checkpoint.pretrained:
        checkpointing.load_model_weights(model, cfg.checkpoint.pretrained)
        for chunk in model:
            zero_vocab_padding(chunk, cfg.model.language.vocab_size)
        print_rank_0(f"loaded weights from {cfg.checkpoint.pretrained}")
    optimizer = setup.build_optimizer(cfg, model)
    scheduler = setup.build_scheduler(cfg, optimizer)
    n_micro = setup.num_microbatches(cfg)
    data = [synthetic.synthetic_batches(cfg) for _ in model]
    data_iter = data[0] if len(data) == 1 else data
    n_params = sum(p.numel() for c in model for p in c.parameters())
    print_rank_0(f"parameters on rank 0: {n_params:,}; micro-batches per step: {n_micro}")

    losses: list[float] = []
    for it in range(1, cfg.train.train_iters + 1):
        t0 = time.perf_counter()
        res = train_step(cfg, data_iter, model, optimizer, scheduler, n_micro)
        dt = time.perf_counter() - t0
        losses.append(res.loss)
        if res.loss != res.loss or res.loss in (float("inf"), float("-inf")):
            raise FloatingPointError(f"loss is {res.loss} at iteration {it}; stopping")
        if it % cfg.logging.log_interval == 0 or it == cfg.train.train_iters:
            mem = (
                f" mem={torch.cuda.max_memory_allocated() / 2**30:.2f}GiB"
                if rt.device.type == "cuda"
                else ""
            )
            gn = "n/a" if res.grad_norm is None else f"{res.grad_norm:.4f}"
            print_rank_0(
                f"iter {it}/{cfg.train.train_iters} loss={res.loss:.5f} lr={res.lr:.3e} "
                f"grad_norm={gn} tokens/s={res.num_tokens / dt:,.0f} "
                f"samples/s={cfg.train.global_batch_size / dt:.1f} step_time={dt:.3f}s{mem}"
                + (" (update skipped)" if res.skipped else "")
            )
    if cfg.checkpoint.save:
        path = checkpointing.save_model_weights(model, cfg.checkpoint.save)
        print_rank_0(f"saved weights to {path}")
    print_rank_0(f"done: first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}")
    return losses


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(format_config(cfg))
        return 0
    try:
        train(cfg)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
