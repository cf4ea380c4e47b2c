"""Pack raw VLM samples into Energon WebDataset shards of at most ``--seq-len`` tokens.

    python tools/pack_offline.py --input SRC [SRC ...] --output OUT --tokenizer TOK \\
        --seq-len 8192 --workers N [--kind caption|instruct] [--min-pixels P --max-pixels P] \\
        [--on-error fail|skip] [--balance-vision] \\
        [--phase all|measure|plan|write|finalise [--task-index I --num-tasks N]]

``SRC``: LLaVA / messages-images JSON or JSONL (``PATH::IMAGE_ROOT`` sets its image folder),
WebDataset ``.tar`` shards (ours, and the release's image, mix and packed caption shards),
parquet with image bytes (Mid-Training-85M, Instruct-Data), or folders of these. Videos are
skipped and counted, or with ``--videos pack`` decoded, sampled by the release's rule
(``--fps`` …) and packed. ``TOK``: a Hugging Face
tokenizer directory, or ``qwen-offline``. ``--phase`` runs one phase; measure and write split
their work over ``--num-tasks`` tasks (defaults: the Slurm array's ``SLURM_ARRAY_TASK_ID`` /
``SLURM_ARRAY_TASK_COUNT``). Every phase and task resumes where it stopped when re-run with the
same arguments. Bad input: one line ``error: …`` on stderr, exit status 2. See
``docs/data-packing.md``.
"""

from __future__ import annotations

import argparse
import os
import sys

from lov15_megatron.data.image_processing import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from lov15_megatron.data.offline_packing import (
    PHASES,
    VIDEO_FIELDS,
    VIDEO_MODES,
    PackConfig,
    PackingError,
    Task,
    format_summary,
    format_task_summary,
    run_phase,
)


def _slurm_default(name: str, fallback: int) -> int:
    """A Slurm array variable as a default (arrays are numbered from 0: ``--array=0-15``; a
    re-run of element 5 alone is ``--array=5`` with ``--num-tasks 16`` given explicitly)."""
    value = os.environ.get(name)
    try:
        return fallback if value is None else int(value)
    except ValueError:
        raise ValueError(f"${name}: {value!r} is not an integer") from None


def parse_args(argv: list[str] | None = None) -> tuple[PackConfig, str, Task, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="SRC")
    parser.add_argument("--output", required=True, metavar="OUT")
    parser.add_argument("--tokenizer", required=True, metavar="TOK")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--kind", choices=("caption", "instruct"), default="instruct")
    parser.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument(
        "--max-image-side",
        type=int,
        default=None,
        help="cap every image's longest side at this many pixels before the pixel budget "
        "(the release's stage 2: 1000; training must set the same data.max_image_side)",
    )
    parser.add_argument(
        "--one-sample-per-pack",
        action="store_true",
        help="no packing: every sample is its own sequence (the release's stage 2)",
    )
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    parser.add_argument("--image-root", help="image folder for JSON sources (default: its folder)")
    parser.add_argument(
        "--verify-images", action="store_true", help="fully decode images (default: headers only)"
    )
    parser.add_argument("--max-packs-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-bytes", type=int, default=1 << 30)
    parser.add_argument("--seed", type=int, default=0, help="seed of the pack order")
    parser.add_argument(
        "--balance-vision",
        action="store_true",
        help="even out the ViT cost over packs (same packs' lengths, same fill)",
    )
    parser.add_argument(
        "--records-per-unit", type=int, default=512, help="JSON(L) records per measure work unit"
    )
    parser.add_argument(
        "--videos",
        choices=VIDEO_MODES,
        default="skip",
        help="skip: count video samples as video_not_supported (training cannot use them yet); "
        "pack: decode, sample and pack them",
    )
    video = parser.add_argument_group("video sampling (--videos pack; the release's defaults)")
    for name, default in VIDEO_FIELDS.items():
        kind = float if isinstance(default, float) else int
        video.add_argument("--" + name.replace("_", "-"), type=kind, default=default)
    parser.add_argument("--phase", choices=("all", *PHASES), default="all")
    parser.add_argument(
        "--task-index",
        type=int,
        default=None,
        help="this task's index, from 0 (default: $SLURM_ARRAY_TASK_ID, else 0)",
    )
    parser.add_argument(
        "--num-tasks",
        type=int,
        default=None,
        help="tasks the phase is split into (default: $SLURM_ARRAY_TASK_COUNT, else 1)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    splittable = args.phase in ("measure", "write")
    index = args.task_index
    count = args.num_tasks
    if index is None:
        index = _slurm_default("SLURM_ARRAY_TASK_ID", 0) if splittable else 0
    if count is None:
        count = _slurm_default("SLURM_ARRAY_TASK_COUNT", 1) if splittable else 1
    config = PackConfig(
        inputs=tuple(args.input),
        output=args.output,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        kind=args.kind,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        max_image_side=args.max_image_side,
        one_sample_per_pack=args.one_sample_per_pack,
        on_error=args.on_error,
        image_root=args.image_root,
        verify_images=args.verify_images,
        max_packs_per_shard=args.max_packs_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        seed=args.seed,
        balance_vision=args.balance_vision,
        records_per_unit=args.records_per_unit,
        workers=args.workers,
        videos=args.videos,
        **{name: getattr(args, name) for name in VIDEO_FIELDS},
    )
    return config, args.phase, Task(index, count), not args.no_progress


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are processes
    try:
        config, phase, task, progress = parse_args(argv)
        result = run_phase(config, phase, task, progress)
    except (PackingError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if phase in ("all", "finalise"):
        print(format_summary(result, config.output))
    else:
        print(format_task_summary(phase, task, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
