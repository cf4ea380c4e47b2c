"""Pack raw VLM samples into Energon WebDataset shards of at most ``--seq-len`` tokens.

    python tools/pack_offline.py --input SRC [SRC ...] --output OUT --tokenizer TOK \\
        --seq-len 8192 --workers N [--kind caption|instruct] [--min-pixels P --max-pixels P] \\
        [--on-error fail|skip]

``SRC``: LLaVA / messages-images JSON or JSONL (``PATH::IMAGE_ROOT`` sets its image folder),
WebDataset ``.tar`` shards, parquet with image bytes, or folders of these. ``TOK``: a Hugging Face
tokenizer directory, or ``qwen-offline``. See ``docs/data-packing.md``.
"""

from __future__ import annotations

import argparse
import os
import sys

from lov15_megatron.data.image_processing import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from lov15_megatron.data.offline_packing import PackConfig, PackingError, format_summary, run


def parse_args(argv: list[str] | None = None) -> tuple[PackConfig, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="SRC")
    parser.add_argument("--output", required=True, metavar="OUT")
    parser.add_argument("--tokenizer", required=True, metavar="TOK")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--kind", choices=("caption", "instruct"), default="instruct")
    parser.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    parser.add_argument("--image-root", help="image folder for JSON sources (default: its folder)")
    parser.add_argument(
        "--verify-images", action="store_true", help="fully decode images (default: headers only)"
    )
    parser.add_argument("--max-packs-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-bytes", type=int, default=1 << 30)
    parser.add_argument("--seed", type=int, default=0, help="seed of the pack order")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = PackConfig(
        inputs=tuple(args.input),
        output=args.output,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        kind=args.kind,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        on_error=args.on_error,
        image_root=args.image_root,
        verify_images=args.verify_images,
        max_packs_per_shard=args.max_packs_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        seed=args.seed,
        workers=args.workers,
    )
    return config, not args.no_progress


def main(argv: list[str] | None = None) -> int:
    config, progress = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are processes
    try:
        report = run(config, progress=progress)
    except (PackingError, FileNotFoundError, ValueError) as error:
        print(f"pack_offline: error: {error}", file=sys.stderr)
        return 1
    print(format_summary(report, config.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
