"""Score an exported HF checkpoint on a local question/answer set (JSON/JSONL + images/videos).

    python tools/evaluate.py --checkpoint HF_DIR --data qa.jsonl --report report.json
        [--prompt "{media}\\n{question}"] [--max-new-tokens N] [--match exact|relaxed]
        [--min-pixels N] [--max-pixels N] [--limit N] [--quiet]

Loads the checkpoint with AutoModelForCausalLM + AutoProcessor (trust_remote_code, local files
only; items with a ``video`` are sampled by the processor's video rule), answers greedily,
prints the accuracy table (per question type, then overall) and writes the JSON report (with
``video_processor``, the sampling settings, when an item has a video). ``--prompt`` is the user
turn: ``{question}`` becomes the item's question and ``{media}`` one ``<image>`` per image, then
one ``<video>`` per video, so ``"{media}\\n{question}"`` scores a file that mixes image and
video items with each medium where training put it; literal ``<image>``/``<video>`` place them
by hand (not together with ``{media}``). See docs/exports-and-evaluation.md. Bad input: one line
``error: …`` on stderr, exit status 2, no report written.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="exported Hugging Face directory")
    p.add_argument("--data", required=True, help="QA file: JSONL or a JSON list")
    p.add_argument("--report", required=True, help="JSON report to write")
    p.add_argument(
        "--prompt",
        default="{question}",
        help="user turn; {question} is replaced by the question, {media} by one <image> per "
        "image then one <video> per video (e.g. '{media}\\n{question}'); literal "
        "<image>/<video> mark where media go (not together with {media})",
    )
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--match", choices=["exact", "relaxed"], default="exact")
    p.add_argument("--min-pixels", type=int, help="override the processor's min_pixels")
    p.add_argument("--max-pixels", type=int, help="override the processor's max_pixels")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lov15_megatron.evaluation import (
        EvaluationError,
        format_report,
        score_qa,
        write_report,
    )

    try:
        report = score_qa(
            args.checkpoint,
            args.data,
            max_new_tokens=args.max_new_tokens,
            match=args.match,
            prompt=args.prompt,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            limit=args.limit,
            progress=not args.quiet,
        )
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"report: {write_report(report, args.report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
