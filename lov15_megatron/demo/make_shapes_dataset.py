"""Generate the procedural shapes vision-language data set (captions, instruct QA, held-out eval;
optionally short video clips with questions about what happens in them).

    python tools/make_shapes_dataset.py --out DIR [--seed S] [--n-caption N] [--n-instruct N]
        [--n-eval N] [--max-shapes 1|2|3] [--layout free|grid]
        [--n-video N [--n-video-eval N]] [--overwrite]

Deterministic from the seed; written atomically. See docs/shapes-dataset.md. Bad arguments or an
existing DIR without ``--overwrite``: one line ``error: …`` on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from lov15_megatron.demo.shapes_dataset import (
    LAYOUTS,
    MAX_SHAPES,
    format_summary,
    generate_shapes_dataset,
)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="make_shapes_dataset.py",
        description="Generate the procedural shapes VLM data set (see docs/shapes-dataset.md).",
    )
    p.add_argument("--out", required=True, help="output directory (created atomically)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-caption", type=int, default=600, help="caption samples (stages 1/1.5)")
    p.add_argument("--n-instruct", type=int, default=600, help="instruct samples (stage 2)")
    p.add_argument("--n-eval", type=int, default=60, help="held-out eval questions")
    p.add_argument("--max-shapes", type=int, default=MAX_SHAPES, help="shapes per image, at most")
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="free",
        help="free: shapes at fixed fractions of the image; grid: one 28-px cell (LM token) each",
    )
    p.add_argument(
        "--n-video",
        type=int,
        default=0,
        help="video clips with one question each (0: no video split, the default)",
    )
    p.add_argument(
        "--n-video-eval",
        type=int,
        default=None,
        help="held-out video questions (default 40; needs --n-video)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = generate_shapes_dataset(
            args.out,
            seed=args.seed,
            n_caption=args.n_caption,
            n_instruct=args.n_instruct,
            n_eval=args.n_eval,
            overwrite=args.overwrite,
            max_shapes=args.max_shapes,
            layout=args.layout,
            n_video=args.n_video,
            n_video_eval=args.n_video_eval,
        )
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
