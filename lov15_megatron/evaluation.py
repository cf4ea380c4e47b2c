"""Score an exported Hugging Face checkpoint on a local question/answer set.

The checkpoint is used exactly as the ecosystem uses it (the model card's quick start,
lmms-eval): ``AutoModelForCausalLM`` + ``AutoProcessor`` with ``trust_remote_code=True``,
``processor.apply_chat_template(…, add_generation_prompt=True, tokenize=True,
return_dict=True)``, greedy ``generate``, decode up to ``<|im_end|>``. So a passing evaluation
also shows that the export is complete.

Data: a JSONL file (one object per line) or a JSON list. Each item has ``question``,
``answer`` and ``image`` (one path) or ``images`` (a list), and/or ``video`` (one path: a video
file or a folder of frame images) or ``videos`` (a list), paths relative to the data file's
folder; optional ``id``, ``type`` (per-type accuracy) and ``chance`` (that type's chance
accuracy, reported next to it). The user turn is the ``prompt`` template (default
``"{question}"``) with, per item, ``{question}`` replaced by the question and ``{media}`` by
one ``<image>`` per image, then one ``<video>`` per video (the training order), so that one
template serves a file that mixes image and video items: ``"{media}\n{question}"`` is
``"<image>\n{question}"`` for an image item and ``"<video>\n{question}"`` for a clip, the
shapes data set's two training texts (an item without media keeps the ``"\n"``). ``<image>``
in the template or the question marks where each image goes and ``<video>`` where each video
goes; without them the images come first, then the videos (the training rule of
``data/chat.py``); more or fewer placeholders than images (videos) is an error, and so is a
template holding both ``{media}`` and a literal ``<image>``/``<video>`` (two rules for one
medium). Videos are sampled by the checkpoint's processor with its settings (the release's
rule: frames at 2 fps, 4 … 768 of them, unless the export's ``processor_config.json`` carries
the packer's; PyAV decodes them). The quickstart's held-out set (``eval/eval.jsonl`` of the
shapes data set) is one such file.

Scoring: exact match of the stripped answer (``match="exact"``), or ``"relaxed"``: case and
surrounding punctuation ignored. The report (JSON) holds the overall and per-type accuracy,
every answer, the image processor's settings and, when an item has a video, the video sampling
settings the processor used (``"video_processor"``; the key is absent otherwise).
"""

from __future__ import annotations

import json
import re
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lov15_megatron.checkpoint_dir import PACK_VIDEO_FIELDS

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
QUESTION_FIELD = "{question}"
MEDIA_FIELD = "{media}"
MATCHES = ("exact", "relaxed")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class EvaluationError(ValueError):
    """Bad input: the message starts with the file (and item) it is about."""


@dataclass
class QAItem:
    """One question about one or more images."""

    id: str
    question: str
    answer: str
    images: list[Path]
    type: str = "all"
    videos: list[Path] = field(default_factory=list)
    chance: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_qa(path: str | Path) -> list[QAItem]:
    """Read and check a QA file (JSONL or a JSON list); raises :class:`EvaluationError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise EvaluationError(f"{path}: cannot read: {error.strerror or error}") from error
    where: list[str]
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
            where = [f"item {i}" for i in range(len(records))]
        else:
            records, where = [], []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    records.append(json.loads(line))
                    where.append(f"line {number}")
    except json.JSONDecodeError as error:
        raise EvaluationError(f"{path}: not valid JSON/JSONL: {error}") from error
    if not records:
        raise EvaluationError(f"{path}: no questions")
    return [_item(record, path, at) for record, at in zip(records, where, strict=True)]


def _item(record: Any, path: Path, at: str) -> QAItem:
    if not isinstance(record, dict):
        raise EvaluationError(f"{path}: {at}: expected an object, got {type(record).__name__}")
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str):
            raise EvaluationError(f"{path}: {at}: field {key!r} must be a string")
    media = {}
    for one, many in (("image", "images"), ("video", "videos")):
        listed = record.get(many, [record[one]] if one in record else [])
        if not isinstance(listed, list) or not all(isinstance(i, str) for i in listed):
            raise EvaluationError(
                f"{path}: {at}: '{one}'/'{many}' must be a path or a list of paths"
            )
        media[many] = listed
    images, videos = media["images"], media["videos"]
    check_placeholders(record["question"], len(images), f"{path}: {at}", len(videos))
    known = {"id", "question", "answer", "image", "images", "video", "videos", "type", "chance"}
    return QAItem(
        id=str(record.get("id", at)),
        question=record["question"],
        answer=record["answer"],
        images=[(path.parent / image) for image in images],
        videos=[(path.parent / video) for video in videos],
        type=str(record.get("type", "all")),
        chance=record.get("chance"),
        extra={k: v for k, v in record.items() if k not in known},
    )


def check_placeholders(text: str, n_images: int, where: str, n_videos: int = 0) -> None:
    """``<image>`` placeholders must be absent or one per image; ``<video>`` ones (counted only
    for an item with videos, as in training) absent or one per video."""
    counts = [(IMAGE_PLACEHOLDER, n_images, "images")]
    if n_videos:
        counts.append((VIDEO_PLACEHOLDER, n_videos, "videos"))
    for placeholder, expected, what in counts:
        placeholders = text.count(placeholder)
        if placeholders and placeholders != expected:
            raise EvaluationError(
                f"{where}: the question has {placeholders} {placeholder} placeholders but "
                f"{expected} {what}"
            )


def check_prompt(prompt: str) -> None:
    """A template with ``{media}`` holds no literal ``<image>``/``<video>``: ``{media}`` places
    every medium of an item, so a literal placeholder beside it would place one twice."""
    if MEDIA_FIELD in prompt:
        for placeholder in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
            if placeholder in prompt:
                raise EvaluationError(
                    f"prompt {prompt!r}: holds both {MEDIA_FIELD} and a literal {placeholder}; "
                    f"use one: {MEDIA_FIELD} places each item's images, then its videos"
                )


def render_prompt(prompt: str, item: QAItem) -> str:
    """``item``'s user turn: ``{question}`` and ``{media}`` (one ``<image>`` per image, then one
    ``<video>`` per video) replaced in one pass, so a question's own text is never expanded."""
    media = IMAGE_PLACEHOLDER * len(item.images) + VIDEO_PLACEHOLDER * len(item.videos)
    fields = {QUESTION_FIELD: item.question, MEDIA_FIELD: media}
    pattern = "|".join(re.escape(name) for name in fields)
    return re.sub(pattern, lambda found: fields[found.group(0)], prompt)


def messages_for(
    question: str, images: Sequence[Any], videos: Sequence[Any] = ()
) -> list[dict[str, Any]]:
    """Chat messages (content list) for one question: images and videos at their
    placeholders, or first (images, then videos)."""
    kinds = [("image", IMAGE_PLACEHOLDER, list(images))]
    if videos:
        kinds.append(("video", VIDEO_PLACEHOLDER, list(videos)))
    lead: list[dict[str, Any]] = []
    for kind, placeholder, items in kinds:
        if placeholder not in question:
            lead += [{"type": kind, kind: item} for item in items]
    placed = [
        (kind, placeholder, items) for kind, placeholder, items in kinds if placeholder in question
    ]
    content: list[dict[str, Any]] = list(lead)
    if placed:
        pattern = "(" + "|".join(re.escape(p) for _, p, _ in placed) + ")"
        queues = {placeholder: iter(items) for _, placeholder, items in placed}
        kind_of = {placeholder: kind for kind, placeholder, _ in placed}
        for piece in re.split(pattern, question):
            if piece in queues:
                kind = kind_of[piece]
                content.append({"type": kind, kind: next(queues[piece])})
            elif piece:
                content.append({"type": "text", "text": piece})
    elif question:
        content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def normalize(text: str, match: str) -> str:
    text = text.strip()
    if match == "relaxed":
        text = text.strip(string.punctuation + string.whitespace).lower()
    return text


def check_checkpoint(directory: str | Path) -> Path:
    """The checkpoint directory, or :class:`EvaluationError` if it cannot be evaluated."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise EvaluationError(f"{directory}: not a Hugging Face checkpoint (no config.json)")
    if not any((directory / name).is_file() for name in PROCESSOR_FILES):
        raise EvaluationError(
            f"{directory}: no processor ({' / '.join(PROCESSOR_FILES)} missing); export it "
            "again with tools/convert_checkpoint.py mcore-to-hf, which writes one"
        )
    return directory


def check_images(item: QAItem, data: Path) -> None:
    """Every image of ``item`` exists and has an image header (no decoding)."""
    from PIL import Image

    for image in item.images:
        try:
            with Image.open(image):
                pass
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise EvaluationError(
                f"{data}: {item.id}: image {image}: cannot open: {error}"
            ) from error


def check_videos(item: QAItem, data: Path) -> None:
    """Every video of ``item`` is a readable file or a folder (decoded when scored)."""
    for video in item.videos:
        if not (video.is_file() or video.is_dir()):
            raise EvaluationError(f"{data}: {item.id}: video {video}: no such file or folder")


def open_images(item: QAItem, data: Path) -> list[Any]:
    from PIL import Image

    opened = []
    for image in item.images:
        try:
            with Image.open(image) as handle:
                handle.load()
                opened.append(handle.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise EvaluationError(
                f"{data}: {item.id}: image {image}: cannot open: {error}"
            ) from error
    return opened


def score_qa(
    checkpoint: str | Path,
    data: str | Path,
    *,
    max_new_tokens: int = 16,
    match: str = "exact",
    prompt: str = "{question}",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer every question with the checkpoint's processor and model; return the report."""
    if match not in MATCHES:
        raise EvaluationError(f"match: {match!r} is not one of {', '.join(MATCHES)}")
    start = time.perf_counter()
    check_prompt(prompt)
    checkpoint, data = check_checkpoint(checkpoint), Path(data)
    items = load_qa(data)[:limit]
    texts = [render_prompt(prompt, item) for item in items]  # each item's user turn
    for item, text in zip(items, texts, strict=True):  # every item checked before the model loads
        check_placeholders(text, len(item.images), f"{data}: {item.id}", len(item.videos))
        check_images(item, data)
        check_videos(item, data)
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    processor = AutoProcessor.from_pretrained(
        checkpoint, trust_remote_code=True, local_files_only=True, **pixels
    )
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, trust_remote_code=True, local_files_only=True, dtype=torch.float32
    ).eval()
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else eos
    answers = []
    for index, (item, text) in enumerate(zip(items, texts, strict=True)):
        images = open_images(item, data)
        try:
            inputs = processor.apply_chat_template(
                messages_for(text, images, [str(video) for video in item.videos]),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
            )
        except ValueError as error:  # e.g. a video the processor cannot decode
            if not item.videos:
                raise
            raise EvaluationError(f"{data}: {item.id}: {error}") from error
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        if eos in new:
            new = new[: new.index(eos)]
        predicted = processor.decode(new, skip_special_tokens=True).strip()
        correct = normalize(predicted, match) == normalize(item.answer, match)
        answers.append(
            {
                "id": item.id,
                "type": item.type,
                "question": item.question,
                "images": [str(i) for i in item.images],
                **({"videos": [str(v) for v in item.videos]} if item.videos else {}),
                "answer": item.answer,
                "predicted": predicted,
                "correct": correct,
            }
        )
        if progress and ((index + 1) % 10 == 0 or index + 1 == len(items)):
            done = sum(a["correct"] for a in answers)
            print(
                f"evaluate: {index + 1}/{len(items)} answered, {done} correct",
                file=sys.stderr,
                flush=True,
            )
    per_type: dict[str, dict[str, Any]] = {}
    for item, result in zip(items, answers, strict=True):
        entry = per_type.setdefault(item.type, {"questions": 0, "correct": 0})
        if item.chance is not None:
            entry["chance"] = item.chance
        entry["questions"] += 1
        entry["correct"] += int(result["correct"])
    for entry in per_type.values():
        entry["accuracy"] = entry["correct"] / entry["questions"]
    correct = sum(a["correct"] for a in answers)
    return {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "match": match,
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "image_processor": {
            "min_pixels": processor.image_processor.size["shortest_edge"],
            "max_pixels": processor.image_processor.size["longest_edge"],
            "max_image_side": getattr(processor.image_processor, "max_image_side", None),
        },
        **({"video_processor": video_settings(processor)} if any(i.videos for i in items) else {}),
        "questions": len(answers),
        "correct": correct,
        "accuracy": correct / len(answers),
        "accuracy_per_type": per_type,
        "answers": answers,
        "seconds": time.perf_counter() - start,
    }


def video_settings(processor: Any) -> dict[str, Any]:
    """The video sampling settings ``processor`` holds (``fps``, ``min_frames``, ``max_frames``,
    ``frame_min_pixels``, ``frame_max_pixels``, ``video_max_pixels``): the release's defaults or
    what the export's ``processor_config.json`` carries."""
    return {name: getattr(processor, name) for name in PACK_VIDEO_FIELDS}


def format_report(report: dict[str, Any]) -> str:
    """The accuracy table: per type (correct/questions = accuracy (chance)), then overall."""
    lines = [f"evaluate: {report['checkpoint']} on {report['data']} ({report['match']} match)"]
    for name, t in sorted(report["accuracy_per_type"].items()):
        chance = f" ({t['chance']:.2f})" if "chance" in t else ""
        lines.append(
            f"  {name:10s} {t['correct']:3d}/{t['questions']:<3d} = {t['accuracy']:.2f}{chance}"
        )
    lines.append(
        f"  accuracy {report['correct']}/{report['questions']} = {report['accuracy']:.2f} "
        f"in {report['seconds']:.0f}s"
    )
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write ``report`` as JSON atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return path


__all__ = [
    "EvaluationError",
    "QAItem",
    "check_checkpoint",
    "check_placeholders",
    "check_prompt",
    "format_report",
    "load_qa",
    "messages_for",
    "render_prompt",
    "score_qa",
    "video_settings",
    "write_report",
]
