"""Plan a training layout: per-stage FLOPs and memory, the balanced pipeline split, step time.

    lov15-plan --config configs/llava_ov_1_5/8b/stage1_5_mid_training.yaml \\
        --pack-report PACKED/pack_report.json --gpus 128 [--gpu-memory-gb 80] \\
        [--peak-tflops 312] [--hfu 0.45] [--samples 85e6] [override ...]

The pack shape comes from the packer's report (``tools/pack_offline.py`` writes
``pack_report.json`` beside the shards) or from ``--tokens-per-pack``, ``--samples-per-pack``,
``--patches-per-pack`` (and ``--images-per-pack``) with the config's ``data.seq_length``. It
prints the config's own layout (its stages, with the split that balances them), then the
candidate TP/PP/CP(/EP) layouts of ``--gpus`` GPUs, fastest that fit first. ``--json`` writes
the numbers. Bad input: one line ``error: …`` on stderr, exit status 2. See
``docs/parallelism-choice.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from lov15_megatron.config import ConfigError, RunConfig, validate
from lov15_megatron.config.bundled import find_config
from lov15_megatron.config.loader import load
from lov15_megatron.plan import (
    Hardware,
    PackShape,
    Plan,
    balanced_split,
    candidate_layouts,
    plan_layout,
    total_params,
    training_days,
    with_parallel,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lov15-plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a run config (YAML) or a bundled name")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    p.add_argument("--pack-report", help="pack_report.json of the packed data")
    p.add_argument("--images-per-sample", type=float, default=1.0,
                   help="images per sample (not in the report; captions: 1)")  # fmt: skip
    p.add_argument("--tokens-per-pack", type=float, help="real tokens per pack (no report)")
    p.add_argument("--samples-per-pack", type=float, help="sub-samples per pack (no report)")
    p.add_argument("--patches-per-pack", type=float, default=0.0, help="ViT patches per pack")
    p.add_argument("--images-per-pack", type=float, help="images per pack (default: samples)")
    p.add_argument("--loss-tokens-per-pack", type=float,
                   help="loss positions per pack (default: tokens minus image tokens; the "
                   "worst case for the logits' memory is the pack length)")  # fmt: skip
    p.add_argument("--gpus", type=int, required=True, help="world size to plan for")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0)
    p.add_argument("--peak-tflops", type=float, default=312.0, help="dense bf16 peak per GPU")
    p.add_argument("--hfu", type=float, default=0.45, help="assumed hardware FLOPs utilisation")
    p.add_argument("--overhead-gb", type=float, default=5.0, help="context, buffers, fragments")
    p.add_argument("--samples", type=float, help="samples of the whole stage: prints its days")
    p.add_argument("--top", type=int, default=10, help="candidate layouts to print")
    p.add_argument("--json", help="write the plans here as JSON")
    return p


def load_run_config(path: str, overrides: list[str]) -> RunConfig:
    """The config, validated; an Energon run without ``data.path`` (the stage configs leave it
    to the launcher) gets a placeholder: the planner reads no data."""
    cfg = load(RunConfig, find_config(path), overrides)
    if cfg.data.loader == "energon" and not cfg.data.path:
        cfg.data.path = "(not read by the planner)"
    validate(cfg)
    return cfg


def pack_shape(args: argparse.Namespace, cfg: RunConfig) -> PackShape:
    if args.pack_report:
        if args.tokens_per_pack is not None or args.samples_per_pack is not None:
            raise ConfigError("--pack-report and --tokens-per-pack/--samples-per-pack: give one")
        try:
            report = json.loads(Path(args.pack_report).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--pack-report {args.pack_report}: {e}") from None
        shape = PackShape.from_report(report, args.images_per_sample)
        if args.loss_tokens_per_pack is not None:
            shape = dataclasses.replace(shape, loss_tokens=args.loss_tokens_per_pack)
        if shape.seq_length != cfg.data.seq_length:
            raise ConfigError(
                f"--pack-report {args.pack_report}: packs of {shape.seq_length} tokens, but "
                f"data.seq_length={cfg.data.seq_length}"
            )
        return shape
    if args.tokens_per_pack is None or args.samples_per_pack is None:
        raise ConfigError("give --pack-report, or --tokens-per-pack and --samples-per-pack")
    images = args.images_per_pack
    if images is None:
        images = args.samples_per_pack if args.patches_per_pack > 0 else 0.0
    return PackShape(cfg.data.seq_length, args.tokens_per_pack, args.samples_per_pack,
                     args.patches_per_pack, images, args.loss_tokens_per_pack)  # fmt: skip


def _layout(plan: Plan) -> str:
    text = f"TP {plan.tp} · PP {plan.pp} · CP {plan.cp}"
    text += f" · EP {plan.ep}" if plan.ep > 1 else ""
    text += f" · VPP {plan.vpp}" if plan.vpp else ""
    if plan.pp > 1:
        text += f" ({'/'.join(str(s.lm_layers) for s in plan.stages)})"
    return text + f" · DP {plan.dp}"


def format_stages(plan: Plan) -> str:
    rows = ["stage  LM layers  TFLOP/pack  weights  grads  optimizer  activations  total (GB)"]
    for s in plan.stages:
        rows.append(
            f"{s.index:>5}  {s.lm_layers:>9}  {s.flops / 1e12:>10.1f}  {s.weights_gb:>7.1f}  "
            f"{s.grads_gb:>5.1f}  {s.optimizer_gb:>9.1f}  {s.activations_gb:>11.1f}  "
            f"{s.memory_gb:>10.1f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        shape = pack_shape(args, cfg)
        hw = Hardware(args.gpu_memory_gb, args.peak_tflops, args.hfu, args.overhead_gb)
        for name in ("gpus", "gpu_memory_gb", "peak_tflops", "hfu"):
            if not getattr(args, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be > 0")
        own = plan_layout(cfg, shape, args.gpus, hw)
        first, last = balanced_split(cfg, shape)
        balanced = plan_layout(
            with_parallel(cfg, num_layers_in_first_pipeline_stage=first,
                          num_layers_in_last_pipeline_stage=last), shape, args.gpus, hw,
        )  # fmt: skip
        candidates = candidate_layouts(cfg, shape, args.gpus, hw)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model: {total_params(cfg) / 1e9:.3f} B parameters; pack: {shape.seq_length} "
          f"positions, {shape.tokens:.0f} tokens, {shape.samples:.2f} samples, "
          f"{shape.patches:.0f} patches, {shape.images:.2f} images")  # fmt: skip
    print(f"GPU: {hw.memory_gb:g} GB, {hw.peak_tflops:g} TFLOP/s peak, assumed HFU "
          f"{hw.hfu:.0%}, {hw.overhead_gb:g} GB overhead; {args.gpus} GPUs")  # fmt: skip
    for title, plan in (("config's layout", own), ("balanced split", balanced)):
        if title == "balanced split" and plan.pp == 1:
            continue
        print(f"\n{title}: {_layout(plan)}: step {plan.step_seconds:.2f} s, "
              f"micro-batches per rank and step {plan.micro_batches}, fullest GPU "
              f"{plan.memory_gb:.1f} GB{'' if plan.fits else ' (does not fit)'}")  # fmt: skip
        print(format_stages(plan))
        if args.samples:
            print(f"{args.samples:g} samples: {training_days(plan, cfg, args.samples, shape):.2f} "
                  f"days")  # fmt: skip
    print(f"\ncandidate layouts on {args.gpus} GPUs, LM layers per stage in brackets (fits "
          f"first, then step time, then fewer model-parallel GPUs: TP/CP/EP communication is "
          f"not modelled):")  # fmt: skip
    for plan in candidates[: args.top]:
        fit = "fits" if plan.fits else "does not fit"
        print(f"  {_layout(plan):<48} step {plan.step_seconds:6.2f} s  "
              f"{plan.memory_gb:6.1f} GB  {fit}")  # fmt: skip
    if args.json:
        out = {"config": own.as_dict(), "balanced": balanced.as_dict(),
               "candidates": [p.as_dict() for p in candidates]}  # fmt: skip
        tmp = f"{args.json}.tmp{os.getpid()}"
        Path(tmp).write_text(json.dumps(out, indent=2) + "\n")
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
