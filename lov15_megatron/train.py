"""Training entry point: ``python -m lov15_megatron.train --config CFG.yaml [key.sub=value …]``.

Launched by ``torchrun`` on any number of nodes/ranks, or as a single plain process. Reads top
to bottom: config → runtime → model → optimizer → resume or weights → data → loop (metrics,
checkpoints, SIGTERM, NaN guard) → final checkpoint.

* The model is the registered family the config describes (``models/registry.py``): the
  LLaVA-OV-1.5 VLM when ``model.vision`` is set, else the qwen3 or qwen3-moe LM.
* Resume is automatic: if ``checkpoint.load`` (or else ``checkpoint.save``) holds a training
  checkpoint, the latest one is restored exactly (model, optimizer, scheduler, RNG, counters,
  data-loader state). Otherwise ``checkpoint.pretrained`` starts from weights only (a previous
  stage or a converted checkpoint) with a fresh optimizer and iteration 0.
* With ``peft`` (LoRA, docs/lora.md) only adapters train: the base weights come from
  ``checkpoint.pretrained`` at every start, resume included, and a resume checks that they are
  the base the checkpoint's adapters were trained on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lov15_megatron.config import (
    ConfigError,
    RunConfig,
    config_to_dict,
    format_config,
    load_config,
)

# torch, Megatron and everything built on them are imported where they are used, so that
# ``--print-config`` (the launchers' pre-flight) answers in a fraction of a second.
if TYPE_CHECKING:
    import torch

    from lov15_megatron.training.flops import StepCounts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config in configs/")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser.parse_args(argv)


@dataclass
class TrainResult:
    """What a run did (returned to tests and the quickstart; also logged)."""

    first_iteration: int
    last_iteration: int
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)  # before clipping
    valid_losses: list[tuple[int, float]] = field(default_factory=list)  # (iteration, loss)
    valid_sample_ids: list[str] | None = None  # this DP rank's held-out samples (first eval)
    tokens_per_s: list[float] = field(default_factory=list)
    moe_losses: list[dict[str, float]] = field(default_factory=list)  # MoE: aux losses per step
    consumed_sample_ids: list[str] = field(default_factory=list)
    stopped_by_signal: bool = False
    checkpoint: str | None = None


def _global_counts(counts: StepCounts, device: torch.device) -> StepCounts:
    """Counts of the whole global batch: sum over DP (one PP/TP/CP position counts)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from lov15_megatron.training.flops import StepCounts

    t = counts.as_tensor().to(device)
    ps = parallel_state
    if ps.get_tensor_model_parallel_rank() or ps.get_pipeline_model_parallel_rank():
        t.zero_()
    if ps.get_context_parallel_rank():
        t.zero_()
    dist.all_reduce(t)
    return StepCounts.from_tensor(t.cpu())


def train(cfg: RunConfig) -> TrainResult:
    """Train until ``train.train_iters`` (or SIGTERM); returns what happened."""
    import torch

    from lov15_megatron import checkpoint_dir
    from lov15_megatron.models.backend import attention_backend, fp8_config_kwargs
    from lov15_megatron.models.qwen3.model import zero_vocab_padding
    from lov15_megatron.runtime import distributed
    from lov15_megatron.runtime.distributed import print_rank_0
    from lov15_megatron.training import checkpointing, setup
    from lov15_megatron.training.data import build_train_data, data_layout, resumable_state
    from lov15_megatron.training.flops import peak_tflops, step_flops
    from lov15_megatron.training.metrics import MetricsLogger
    from lov15_megatron.training.preflight import check_data_inputs
    from lov15_megatron.training.signals import ExitSignal
    from lov15_megatron.training.step import make_forward_step, train_step
    from lov15_megatron.training.validation import validation_loss

    attention_backend(cfg)  # a backend this run cannot have fails here, before any rank starts
    fp8_config_kwargs(cfg)  # so does model.fp8 without Transformer Engine on a GPU
    check_data_inputs(cfg)

    rt = distributed.initialize(cfg)
    print_rank_0(format_config(cfg))
    print_rank_0(
        f"runtime: device={rt.device} backend={rt.backend} world={rt.world_size} "
        f"TP={rt.tensor_parallel} PP={rt.pipeline_parallel} CP={rt.context_parallel} "
        f"DP={rt.data_parallel}"
    )
    from lov15_megatron.models.registry import family_for_config

    family = family_for_config(cfg)  # the registered model this config describes (one lookup)
    model = setup.wrap_ddp(cfg, setup.build_model_chunks(cfg, family.build_model))
    optimizer = setup.build_optimizer(cfg, model)
    scheduler = setup.build_scheduler(cfg, optimizer)

    start, progress, data_state = 0, {"consumed_samples": 0}, None
    resume_dir = cfg.checkpoint.load or cfg.checkpoint.save
    lora_base = None  # a LoRA run: {"path", "fingerprint"} of its base weights
    if cfg.peft is not None:
        assert cfg.checkpoint.pretrained is not None  # validated
        lora_base = checkpointing.load_base_weights(model, cfg.checkpoint.pretrained)
        for chunk in model:
            zero_vocab_padding(chunk, cfg.model.language.vocab_size)
        print_rank_0(f"LoRA base weights from {cfg.checkpoint.pretrained} (frozen)")
    if checkpoint_dir.has_checkpoint(resume_dir):
        checkpointing.check_lora_resume(resume_dir, lora_base)
        progress, data_state = checkpointing.load_checkpoint(
            resume_dir, model, optimizer, scheduler
        )
        start = progress["iteration"]
        data_state = resumable_state(
            cfg, progress.get("data_layout"), data_state, progress["consumed_samples"], resume_dir
        )
        print_rank_0(f"resumed from {resume_dir} at iteration {start}")
    elif cfg.checkpoint.pretrained and lora_base is None:
        checkpointing.load_model_weights(model, cfg.checkpoint.pretrained)
        for chunk in model:
            zero_vocab_padding(chunk, cfg.model.language.vocab_size)
        print_rank_0(f"loaded weights from {cfg.checkpoint.pretrained} (fresh optimizer)")

    data = build_train_data(cfg, len(model), start, data_state)
    source = cfg.checkpoint.pretrained or resume_dir
    model_file = checkpoint_dir.describe_model(cfg, source, family.name)
    if cfg.peft is not None:  # what the adapters are and the base they apply to
        model_file["peft"] = {**config_to_dict(cfg)["peft"], "base": lora_base}
    n_micro = setup.num_microbatches(cfg)
    forward_step = make_forward_step(family, cfg)
    trainable = sum(p.numel() for c in model for p in c.parameters() if p.requires_grad)
    total = sum(p.numel() for c in model for p in c.parameters())
    print_rank_0(
        f"parameters on rank 0: {total:,} ({trainable:,} trainable); micro-batches/step: {n_micro}"
    )
    if cfg.peft is not None:
        from lov15_megatron.models.lora import lora_modules

        adapters = sum(1 for chunk in model for _ in lora_modules(chunk))
        p = cfg.peft
        print_rank_0(
            f"LoRA adapters on rank 0: {adapters} layers (rank {p.rank}, alpha {p.alpha:g}, "
            f"dropout {p.dropout:g}; {', '.join(p.target_modules)} of {', '.join(p.towers)})"
        )
    metrics = MetricsLogger(cfg, rt)
    peak = peak_tflops(rt.device)
    exit_signal = ExitSignal()
    result = TrainResult(first_iteration=start, last_iteration=start)
    saved_at = start if checkpoint_dir.has_checkpoint(resume_dir) else None

    def validation_due(iteration: int) -> bool:
        if cfg.data.valid_path is None:
            return False
        interval = cfg.train.eval_interval
        return iteration == cfg.train.train_iters or bool(interval and iteration % interval == 0)

    def save(iteration: int) -> None:
        nonlocal saved_at
        if not cfg.checkpoint.save or saved_at == iteration:
            return
        state = {**progress, "iteration": iteration, "data_layout": data_layout(cfg)}
        path = checkpointing.save_checkpoint(
            cfg.checkpoint.save, iteration, model, optimizer, scheduler, state,
            data.state(), keep_last=cfg.checkpoint.keep_last, model_file=model_file,
        )  # fmt: skip
        saved_at, result.checkpoint = iteration, str(path)
        print_rank_0(f"saved checkpoint {path}")

    try:
        for iteration in range(start + 1, cfg.train.train_iters + 1):
            t0 = time.perf_counter()
            res = train_step(
                cfg, data.for_schedule(), model, optimizer, scheduler, n_micro, forward_step
            )
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if not math.isfinite(res.loss):
                raise FloatingPointError(
                    f"loss is {res.loss} at iteration {iteration} (lr {res.lr:.3e}); stopping. "
                    f"Last checkpoint: {result.checkpoint or 'none'}"
                )
            counts = _global_counts(data.counter.take(), rt.device)
            data.next_iteration = iteration
            progress["consumed_samples"] += cfg.train.global_batch_size
            tflops = step_flops(cfg, counts) / dt / 1e12 / rt.world_size
            hw_tflops = step_flops(cfg, counts, hardware=True) / dt / 1e12 / rt.world_size
            result.losses.append(res.loss)
            result.grad_norms.append(res.grad_norm)
            result.tokens_per_s.append(counts.token_positions / dt)
            result.last_iteration = iteration
            metrics.log(iteration, res, dt, counts, tflops, peak, hw_tflops)
            moe = family.step_losses(cfg, n_micro)
            if moe:
                result.moe_losses.append(moe)
                if iteration % cfg.logging.log_interval == 0:
                    parts = ", ".join(f"{name} {value:.6f}" for name, value in sorted(moe.items()))
                    print_rank_0(f"iteration {iteration}: moe {parts}")
            if validation_due(iteration):
                validation = validation_loss(cfg, model, forward_step, n_micro, iteration)
                result.valid_losses.append((iteration, validation.loss))
                if result.valid_sample_ids is None:
                    result.valid_sample_ids = validation.sample_ids
                metrics.log_validation(validation)
                family.discard_step_losses()
            if cfg.checkpoint.save_interval and iteration % cfg.checkpoint.save_interval == 0:
                save(iteration)
            if exit_signal.received(rt.device):
                print_rank_0(f"SIGTERM received: saving at iteration {iteration} and stopping")
                result.stopped_by_signal = True
                break
            if cfg.train.exit_interval and iteration % cfg.train.exit_interval == 0:
                print_rank_0(f"train.exit_interval: saving at iteration {iteration} and stopping")
                break
        save(result.last_iteration)
    finally:
        exit_signal.restore()
        metrics.close()
    if data.consumed_sample_ids is not None:
        result.consumed_sample_ids = list(data.consumed_sample_ids)
    if result.losses and cfg.checkpoint.save and rt.rank == 0:
        _write_summary(Path(cfg.checkpoint.save) / "train_summary.json", result)
    if result.losses:
        print_rank_0(
            f"done: iterations {start + 1}-{result.last_iteration}, first loss "
            f"{result.losses[0]:.4f}, last loss {result.losses[-1]:.4f}"
        )
    return result


def _write_summary(path: Path, result: TrainResult) -> None:
    """A small JSON of the run for scripts (the quickstart's summary table reads it)."""
    speeds = result.tokens_per_s[1:] or result.tokens_per_s  # the first step warms up
    summary = {
        "first_iteration": result.first_iteration,
        "last_iteration": result.last_iteration,
        "first_loss": result.losses[0],
        "last_loss": result.losses[-1],
        "tokens_per_s": sum(speeds) / len(speeds),
        "checkpoint": result.checkpoint,
        "stopped_by_signal": result.stopped_by_signal,
        "valid_losses": [{"iteration": i, "loss": v} for i, v in result.valid_losses],
        "last_valid_loss": result.valid_losses[-1][1] if result.valid_losses else None,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:  # one line naming the file/field, not a traceback
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(format_config(cfg))
        return 0
    from lov15_megatron.training.preflight import check_data_inputs

    try:
        check_data_inputs(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from lov15_megatron.runtime import distributed

    if cfg.checkpoint.save:
        Path(cfg.checkpoint.save).mkdir(parents=True, exist_ok=True)
    try:
        train(cfg)
    except ConfigError as e:  # found while building (e.g. an attention backend not installed)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
