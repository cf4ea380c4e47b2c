"""What one raw record says: its messages, its media and its published id, in every record
layout users bring (the file layouts around them are read by :mod:`.sources`).

Record layouts:

- **LLaVA**: ``{"id", "image": path | [paths], "conversations": [turns]}``;
- **messages / images**: ``{"messages": [turns], "images": [paths]}``;
- **caption**: ``{"image", "caption"[, "prompt"]}`` (mid-training parquet rows);
- **a bare turn list** (the release's ``--media image`` WebDataset: the ``json`` member is the
  message list itself, the image is the key's image member);
- **the release's mix WebDataset** (``--media mix``): ``{"texts": [turns], "media": "image" |
  "video" | "text", "name": [member names]}``; the images are the members named, in that order;
- **the release's packed caption samples** (``PackedCaptioningSample``): ``{"prompts",
  "captions", "images"}``, one prompt/caption pair per image member ``img{i}.jpg``; each pair is
  its own sample (:func:`caption_pairs`).

A turn is ``{"from", "value"}`` or ``{"role", "content"}``; both pairs may be present with the
unused one null (a parquet list of structs unifies its fields over all rows), and extra fields
(e.g. ``markdown``) are ignored. Content is a string with ``<image>`` placeholders, or a list of
``{"type": "text" | "image" | "video"}`` parts.

Videos (read only when the packer packs them, ``videos=True``; otherwise refused as
``video_not_supported``): ``<video>`` placeholders (or ``{"type": "video"}`` parts) in the text;
a mix record with ``media: "video"`` names its video members; a JSON record's ``video`` is one
video (a file, a frame folder, or a list of frame images) and ``videos`` a list of them
(:func:`video_entries`).
"""

from __future__ import annotations

import json
from typing import Any

from .chat import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Message
from .errors import MALFORMED_RECORD, VIDEO_NOT_SUPPORTED, BadSample

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
#: Fields that hold a record's turns, in the order they are looked for.
TURN_FIELDS = ("conversations", "messages", "texts")
#: Fields that name a sample's source data set inside the record (e.g. Instruct-Data parquet).
SOURCE_NAME_FIELD = "data_source"
#: The release's mix layout: ``media`` values.
MIX_MEDIA = ("image", "video", "text")


def _content_to_text(content: Any, where: str, videos: bool = False) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind == "image":
                parts.append(IMAGE_PLACEHOLDER)
            elif kind == "video" and videos:
                parts.append(VIDEO_PLACEHOLDER)
            elif kind == "video":
                raise BadSample(VIDEO_NOT_SUPPORTED, "a video content part", where)
            else:
                raise BadSample(MALFORMED_RECORD, f"unknown content part {part!r}", where)
        return "".join(parts)
    raise BadSample(MALFORMED_RECORD, f"content is {type(content).__name__}", where)


def _one_of(
    turn: dict[str, Any], names: tuple[str, str], index: int, where: str, same: dict[str, str]
) -> Any:
    """The non-null value of ``names`` in ``turn``; if both are set they must agree (after
    mapping through ``same``, e.g. ``gpt`` = ``assistant``)."""
    values = [turn[name] for name in names if turn.get(name) is not None]
    if not values:
        raise BadSample(MALFORMED_RECORD, f"turn {index} has no {' or '.join(names)}", where)
    canonical = [same.get(v, v) if isinstance(v, str) else v for v in values]
    if len(values) == 2 and canonical[0] != canonical[1]:
        raise BadSample(
            MALFORMED_RECORD, f"turn {index}: {names[0]!r} and {names[1]!r} differ", where
        )
    return values[0]


def parse_turns(turns: Any, where: str, videos: bool = False) -> list[Message]:
    """Messages of a list of ``from``/``value`` or ``role``/``content`` turns (or its JSON)."""
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as error:
            raise BadSample(MALFORMED_RECORD, f"turns are not valid JSON: {error}", where) from None
    if not isinstance(turns, list | tuple):
        raise BadSample(MALFORMED_RECORD, f"turns are {type(turns).__name__}, not a list", where)
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadSample(MALFORMED_RECORD, f"turn {index} is {type(turn).__name__}", where)
        role = _one_of(turn, ("role", "from"), index, where, ROLE_ALIASES)
        if role not in ROLE_ALIASES:
            raise BadSample(MALFORMED_RECORD, f"turn {index}: unknown role {role!r}", where)
        content = _one_of(turn, ("content", "value"), index, where, {})
        messages.append(Message(ROLE_ALIASES[role], _content_to_text(content, where, videos)))
    return messages


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _check_no_video(record: dict[str, Any], where: str) -> None:
    if record.get("media") == "video" or _as_list(record.get("video") or record.get("videos")):
        raise BadSample(VIDEO_NOT_SUPPORTED, "a video sample", where)


def parse_record(record: Any, where: str, videos: bool = False) -> tuple[list[Message], list[Any]]:
    """``(messages, image entries)`` of one record (see the module docstring). Entries are
    paths (LLaVA, messages/images, caption), member names (mix), or empty (bare turn list).
    Without ``videos`` a video sample is a ``video_not_supported`` :class:`BadSample`; with it
    its videos are :func:`video_entries`."""
    if isinstance(record, list):
        return parse_turns(record, where, videos), []
    if not isinstance(record, dict):
        raise BadSample(
            MALFORMED_RECORD, f"record is {type(record).__name__}, not an object", where
        )
    if not videos:
        _check_no_video(record, where)
    if is_release_mix(record):
        return parse_turns(record["texts"], where, videos), _mix_members(record, where)
    layout = next((name for name in TURN_FIELDS if record.get(name) is not None), None)
    images = _as_list(record.get("images", record.get("image")))
    if layout is not None:
        return parse_turns(record[layout], where, videos), images
    if "caption" in record:
        caption, prompt = record["caption"], record.get("prompt") or ""
        if not isinstance(caption, str) or not isinstance(prompt, str):
            raise BadSample(MALFORMED_RECORD, "caption/prompt must be strings", where)
        return [Message("user", prompt), Message("assistant", caption)], images
    raise BadSample(
        MALFORMED_RECORD, "no 'conversations', 'messages', 'texts' or 'caption' field", where
    )


def _mix_members(record: dict[str, Any], where: str) -> list[str]:
    media = record.get("media")
    if media not in MIX_MEDIA:
        raise BadSample(MALFORMED_RECORD, f"media is {media!r}, not one of {MIX_MEDIA}", where)
    names = _as_list(record.get("name"))
    if media in ("image", "video") and not names:
        raise BadSample(MALFORMED_RECORD, f"media {media!r} without a 'name' list", where)
    if not all(isinstance(name, str) for name in names):
        raise BadSample(MALFORMED_RECORD, f"name entries must be strings: {names!r}", where)
    return names if media == "image" else []


def video_entries(record: Any, where: str) -> list[str | list[str]]:
    """The videos of a record, each a path (file or frame folder), a list of frame image
    paths, or (mix ``media: "video"``) a member name."""
    if not isinstance(record, dict):
        return []
    if is_release_mix(record):
        return list(_as_list(record.get("name"))) if record.get("media") == "video" else []
    entries: list[Any] = []
    if record.get("video") is not None:
        entries.append(record["video"])
    entries.extend(_as_list(record.get("videos")))
    for entry in entries:
        frames = entry if isinstance(entry, list | tuple) else [entry]
        if not frames or not all(isinstance(frame, str) and frame for frame in frames):
            raise BadSample(MALFORMED_RECORD, f"video entry {entry!r} is not a path", where)
    return [list(entry) if isinstance(entry, list | tuple) else entry for entry in entries]


def is_release_mix(record: Any) -> bool:
    """Whether a record is in the release's mix layout (its images are named members)."""
    return isinstance(record, dict) and record.get("texts") is not None


def is_packed_captions(record: Any) -> bool:
    """Whether a record is one of the release's packed caption samples."""
    return (
        isinstance(record, dict)
        and "captions" in record
        and not any(name in record for name in TURN_FIELDS)
    )


def caption_pairs(record: dict[str, Any], where: str) -> list[tuple[str, str, str]]:
    """``(prompt, caption, original image path)`` per image of a packed caption record
    (no ``prompts``, or an empty list: empty prompts)."""
    captions = record.get("captions")
    if not isinstance(captions, list) or not captions:
        raise BadSample(MALFORMED_RECORD, "captions must be a non-empty list", where)
    prompts = record.get("prompts") or [""] * len(captions)
    paths = record.get("images")
    paths = [""] * len(captions) if paths is None else paths
    if not isinstance(prompts, list) or not isinstance(paths, list):
        raise BadSample(MALFORMED_RECORD, "prompts/images must be lists", where)
    if not len(captions) == len(prompts) == len(paths):
        raise BadSample(
            MALFORMED_RECORD,
            f"{len(captions)} captions, {len(prompts)} prompts, {len(paths)} images",
            where,
        )
    for index, values in enumerate(zip(prompts, captions, paths, strict=True)):
        if not all(isinstance(value, str) for value in values):
            raise BadSample(MALFORMED_RECORD, f"pair {index}: not strings {values!r}", where)
    return list(zip(prompts, captions, paths, strict=True))


def record_id(record: Any) -> str | None:
    """The record's published ``id`` (kept in the sample's origin), if it has one."""
    value = record.get("id") if isinstance(record, dict) else None
    return None if value is None or value == "" else str(value)


def record_source_name(record: Any) -> str | None:
    """The data set a record says it comes from (``data_source``), if it says so."""
    value = record.get(SOURCE_NAME_FIELD) if isinstance(record, dict) else None
    return value if isinstance(value, str) and value else None
