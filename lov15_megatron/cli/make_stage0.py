"""Build a stage-0 LLaVA-OneVision-1.5 HF checkpoint: Rice ViT + Qwen3 + a fresh merger.

    python tools/make_stage0.py --vit-dir V --llm-dir L --save-dir OUT [--tokenizer-dir T]
        [--seed S] [--dtype auto|float32|bfloat16] [--max-shard-gb G] [--overwrite]
        [--min-pixels N] [--max-pixels N] [--max-image-side PX]

See docs/stage0.md. Bad input: one line ``error: …`` on stderr, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import sys

from lov15_megatron.convert.mapping import ConversionError
from lov15_megatron.data.image_processing import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS


def add_image_arguments(p: argparse.ArgumentParser) -> None:
    """The processor's image settings (written into ``preprocessor_config.json``)."""
    p.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS, help="processor budget")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="processor budget")
    p.add_argument("--max-image-side", type=int, help="processor's longest-side cap (px)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="make_stage0.py",
        description=(
            "Merge an MLCD-layout Rice ViT checkpoint and a Qwen3 checkpoint, with a freshly "
            "initialised patch merger, into a LLaVA-OneVision-1.5 Hugging Face directory."
        ),
    )
    p.add_argument("--vit-dir", required=True, help="Rice ViT checkpoint (MLCDVisionModel layout)")
    p.add_argument("--llm-dir", required=True, help="Qwen3ForCausalLM checkpoint")
    p.add_argument("--save-dir", required=True, help="output directory (created atomically)")
    p.add_argument(
        "--tokenizer-dir", help="take the tokenizer files from here (default: --llm-dir)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the merger initialisation")
    p.add_argument(
        "--init-std", type=float, default=0.02, help="std of the merger's Linear weights"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="output dtype (auto: the language model's)",
    )
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="maximum safetensors shard")
    add_image_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save-dir")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status (0, or 2 on bad input)."""
    args = build_parser().parse_args(argv)
    from lov15_megatron.data.image_processing import ImageConfig
    from lov15_megatron.models.llava_ov.stage0 import make_stage0

    try:
        image = ImageConfig(args.min_pixels, args.max_pixels, args.max_image_side)
    except ValueError as e:
        print(f"error: --min-pixels/--max-pixels/--max-image-side: {e}", file=sys.stderr)
        return 2
    try:
        summary = make_stage0(
            args.vit_dir,
            args.llm_dir,
            args.save_dir,
            tokenizer_dir=args.tokenizer_dir,
            seed=args.seed,
            dtype=args.dtype,
            init_std=args.init_std,
            max_shard_bytes=int(args.max_shard_gb * 2**30),
            overwrite=args.overwrite,
            progress=not args.quiet,
            image=image,
        )
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
