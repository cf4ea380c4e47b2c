"""Raw-sample readers for the input layouts users have (docs/data-reference.md §1).

Layouts (detected by file extension; a directory means every supported file below it, sorted):

- ``.json`` (an array) / ``.jsonl``: LLaVA records ``{"id", "image": path | [paths],
  "conversations": [{"from": "human"|"gpt", "value"}]}``, "messages/images" records
  ``{"messages": [{"role", "content"}], "images": [paths]}`` (content may be a string or a list
  of ``{"type": "text"|"image"}`` parts), or caption records ``{"image", "caption"}``; image paths
  are relative to the source's image root (default: the JSON file's folder);
- ``.tar``: WebDataset shards, one ``json`` member (any record layout above) plus image members
  per key; images are taken in natural order of their member names;
- ``.parquet``: rows with an ``image``/``images`` column (bytes, or ``{"bytes", "path"}`` structs)
  and ``caption`` or ``conversations``/``messages`` (list or JSON string) columns.

Every sample gets a stable position ``(source, record)`` and an ``origin`` naming the file and
record; every problem is a :class:`BadSample` carrying that origin.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chat import IMAGE_PLACEHOLDER, Message
from .errors import CORRUPT_IMAGE, MALFORMED_RECORD, MISSING_IMAGE, BadSample

JSON_SUFFIXES = (".json", ".jsonl")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
FORMATS = ("json", "jsonl", "tar", "parquet")
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}

#: The turn lists a record may hold, each with its role and content keys.
_TURN_KEYS = {"conversations": ("from", "value"), "messages": ("role", "content")}


@dataclass(frozen=True)
class ImageRef:
    """Where one image's original encoded bytes live (read back without re-encoding)."""

    path: str  # image file, tar shard or parquet file
    offset: int = -1  # tar: byte offset of the member's data
    size: int = -1  # tar: member size
    row_group: int = -1  # parquet location
    row: int = -1
    column: str = ""
    index: int = -1  # parquet: position inside a list column

    def describe(self) -> str:
        if self.offset >= 0:
            return f"{self.path}@{self.offset}"
        if self.row_group >= 0:
            return f"{self.path}:rg{self.row_group}:row{self.row}:{self.column}"
        return self.path

    def read_bytes(self) -> bytes:
        """The encoded image bytes; :class:`BadSample` (missing_image) if unreadable."""
        try:
            if self.offset >= 0:
                with open(self.path, "rb") as stream:
                    stream.seek(self.offset)
                    data = stream.read(self.size)
                if len(data) != self.size:
                    raise OSError("short read")
                return data
            if self.row_group >= 0:
                rows, _ = _parquet_rows(self.path, self.row_group)
                return _parquet_cell_image(rows[self.row][self.column], self.index)
            with open(self.path, "rb") as stream:
                return stream.read()
        except OSError as error:
            raise BadSample(
                MISSING_IMAGE, f"cannot read image {self.describe()}: {error}"
            ) from error


@dataclass
class RawSample:
    """One sample as read from its source; ``image_data`` holds bytes a reader already had."""

    source: int
    record: int
    origin: str
    messages: list[Message]
    images: list[ImageRef]
    image_data: list[bytes] | None = field(default=None, repr=False)
    #: Where :func:`read_sample` finds the record again: jsonl byte offset of its line, tar
    #: header offset of its first member, else -1 (json / parquet: by record index).
    loc: int = -1

    @property
    def uid(self) -> str:
        """Globally unique, order-preserving id of the sample within one packing run."""
        return f"s{self.source:04d}r{self.record:010d}"


@dataclass(frozen=True)
class Source:
    """One input file."""

    index: int
    path: str
    fmt: str
    image_root: str


@dataclass(frozen=True)
class WorkUnit:
    """A chunk of one source that one worker reads: JSON records, a tar, a parquet row group.

    Small and picklable (no record contents): a JSONL unit is a byte range of its file."""

    source: Source
    start: int = 0  # record index of the first record (json/jsonl)
    count: int = 0  # json/jsonl: number of records
    offset: int = 0  # jsonl: byte offset of the first line
    end: int = 0  # jsonl: byte offset after the last line
    row_group: int = -1


# ----------------------------------------------------------------------------- record parsing


def _content_to_text(content: Any, where: str) -> str:
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
            else:
                raise BadSample(MALFORMED_RECORD, f"unknown content part {part!r}", where)
        return "".join(parts)
    raise BadSample(MALFORMED_RECORD, f"content is {type(content).__name__}", where)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def parse_record(record: Any, where: str) -> tuple[list[Message], list[Any]]:
    """``(messages, image entries)`` of a LLaVA, messages/images or caption record."""
    if not isinstance(record, dict):
        raise BadSample(
            MALFORMED_RECORD, f"record is {type(record).__name__}, not an object", where
        )
    images = _as_list(record.get("images", record.get("image")))
    try:
        layout = next((k for k in _TURN_KEYS if k in record), None)
        if layout is not None:  # LLaVA "conversations" or OpenAI-style "messages"
            role, content = _TURN_KEYS[layout]
            turns = record[layout]
            if isinstance(turns, str):
                turns = json.loads(turns)
            messages = [
                Message(ROLE_ALIASES[turn[role]], _content_to_text(turn[content], where))
                for turn in turns
            ]
        elif "caption" in record:
            caption = record["caption"]
            prompt = record.get("prompt") or ""
            if not isinstance(caption, str) or not isinstance(prompt, str):
                raise BadSample(MALFORMED_RECORD, "caption/prompt must be strings", where)
            messages = [Message("user", prompt), Message("assistant", caption)]
        else:
            raise BadSample(
                MALFORMED_RECORD, "no 'conversations', 'messages' or 'caption' field", where
            )
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise BadSample(MALFORMED_RECORD, f"bad turn structure: {error!r}", where) from error
    return messages, images


# ----------------------------------------------------------------------------- sources


def discover_sources(inputs: Sequence[str], image_root: str | None = None) -> list[Source]:
    """Expand ``--input`` values (files or folders; ``PATH::IMAGE_ROOT`` sets a JSON source's
    image root) into sources in a deterministic order."""
    sources: list[Source] = []
    for spec in inputs:
        path_text, _, root = spec.partition("::")
        path = Path(path_text).expanduser().resolve()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _format_of(p))
            if not files:
                raise FileNotFoundError(f"--input {spec}: no .json/.jsonl/.tar/.parquet files")
        elif path.is_file():
            if not _format_of(path):
                raise ValueError(f"--input {spec}: unsupported file type {path.suffix!r}")
            files = [path]
        else:
            raise FileNotFoundError(f"--input {spec}: no such file or directory")
        for file in files:
            file_root = root or image_root or str(file.parent)
            sources.append(Source(len(sources), str(file), _format_of(file), file_root))
    return sources


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".json": "json", ".jsonl": "jsonl", ".tar": "tar", ".parquet": "parquet"}.get(
        suffix, ""
    )


def plan_units(sources: Sequence[Source], records_per_unit: int = 512) -> list[WorkUnit]:
    """Split sources into work units, in source/record order (deterministic, streaming: a
    JSONL file is scanned for line offsets, not loaded)."""
    units: list[WorkUnit] = []
    for source in sources:
        if source.fmt == "jsonl":
            units.extend(_jsonl_units(source, records_per_unit))
        elif source.fmt == "json":
            count = len(_json_records(source.path))
            for start in range(0, count, records_per_unit):
                units.append(
                    WorkUnit(source, start=start, count=min(records_per_unit, count - start))
                )
        elif source.fmt == "tar":
            units.append(WorkUnit(source))
        else:
            count = len(_parquet_group_starts(source.path)) - 1
            units.extend(WorkUnit(source, row_group=group) for group in range(count))
    return units


def _jsonl_units(source: Source, records_per_unit: int) -> Iterator[WorkUnit]:
    start = count = 0
    first = position = 0
    with open(source.path, "rb") as stream:
        for line in stream:
            if line.strip():
                if count == 0:
                    first = position
                count += 1
                if count == records_per_unit:
                    yield WorkUnit(source, start, count, first, position + len(line))
                    start, count = start + count, 0
            position += len(line)
    if count:
        yield WorkUnit(source, start, count, first, position)


@functools.lru_cache(maxsize=4)
def _json_records(path: str) -> list[Any]:
    """A JSON array source, parsed whole (kept for the last four files asked for: a write task
    draws samples from all sources in turn). Large sets are better given as JSONL, which is
    read by byte offset."""
    data = Path(path).read_bytes()
    try:
        records = json.loads(data)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error
    if isinstance(records, dict) and isinstance(records.get("data"), list):
        records = records["data"]
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON array of records")
    return records


@functools.lru_cache(maxsize=64)
def _parquet_group_starts(path: str) -> tuple[int, ...]:
    """First record index of every row group of a parquet file, plus the row count."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as error:  # pyarrow raises several types
        raise ValueError(f"{path}: not a readable parquet file: {error}") from error
    starts = [0]
    for group in range(metadata.num_row_groups):
        starts.append(starts[-1] + metadata.row_group(group).num_rows)
    return tuple(starts)


def read_unit(unit: WorkUnit) -> Iterator[RawSample | BadSample]:
    """The samples of a work unit in record order; bad ones as :class:`BadSample` (with
    ``where`` set and a ``record`` attribute)."""
    fmt = unit.source.fmt
    if fmt in ("json", "jsonl"):
        yield from _read_json_unit(unit)
    elif fmt == "tar":
        yield from _read_tar(unit.source)
    else:
        yield from _read_parquet_group(unit.source, unit.row_group)


def _bad(error: BadSample, source: Source, record: int, where: str) -> BadSample:
    located = error.at(where)
    located.record = record  # type: ignore[attr-defined]
    located.source = source.index  # type: ignore[attr-defined]
    return located


def _read_json_unit(unit: WorkUnit) -> Iterator[RawSample | BadSample]:
    source = unit.source
    if source.fmt == "json":
        records = _json_records(source.path)
        for record_index in range(unit.start, unit.start + unit.count):
            yield _json_sample(source, record_index, records[record_index], -1)
        return
    record_index = unit.start
    with open(source.path, "rb") as stream:
        stream.seek(unit.offset)
        position = unit.offset
        while position < unit.end:
            line = stream.readline()
            if not line:
                break
            if line.strip():
                yield _json_sample(source, record_index, line, position)
                record_index += 1
            position += len(line)


def _json_sample(source: Source, record_index: int, raw: Any, loc: int) -> RawSample | BadSample:
    """One JSON(L) record (a parsed object, or a JSONL line's bytes) as a sample."""
    root = Path(source.image_root)
    where = f"{source.path}:record {record_index}"
    try:
        record = raw
        if source.fmt == "jsonl":
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as error:
                raise BadSample(MALFORMED_RECORD, f"invalid JSON: {error}") from error
        messages, entries = parse_record(record, where)
        images = []
        for entry in entries:
            if not isinstance(entry, str):
                raise BadSample(MALFORMED_RECORD, f"image entry {entry!r} is not a path")
            path = root / entry
            if not path.is_file():
                raise BadSample(MISSING_IMAGE, f"image file {path} not found")
            images.append(ImageRef(str(path)))
    except BadSample as error:
        return _bad(error, source, record_index, where)
    return RawSample(source.index, record_index, where, messages, images, loc=loc)


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_tar(source: Source) -> Iterator[RawSample | BadSample]:
    try:
        archive = tarfile.open(source.path, "r:")
    except (OSError, tarfile.TarError) as error:
        raise ValueError(f"{source.path}: not a readable tar: {error}") from error
    groups: list[tuple[str, dict[str, tarfile.TarInfo], int]] = []
    with archive:
        try:
            for member in archive:
                key, part = _tar_key(member)
                if key is None:
                    continue
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}, member.offset))
                groups[-1][1][part] = member
        except tarfile.TarError as error:
            raise ValueError(f"{source.path}: corrupt tar: {error}") from error
        for record_index, (key, parts, offset) in enumerate(groups):
            yield _tar_sample(archive, source, record_index, key, parts, offset)


def _tar_key(member: tarfile.TarInfo) -> tuple[str | None, str]:
    """``(sample key, part name)`` of a WebDataset member; key None for members to skip."""
    if not member.isfile():
        return None, ""
    directory, _, base = member.name.rpartition("/")
    stem, dot, part = base.partition(".")
    if not dot:
        return None, ""
    return (f"{directory}/{stem}" if directory else stem), part.lower()


def _tar_sample(
    archive: tarfile.TarFile,
    source: Source,
    record_index: int,
    key: str,
    parts: dict[str, tarfile.TarInfo],
    loc: int,
) -> RawSample | BadSample:
    where = f"{source.path}:{key} (tar sample {record_index})"
    try:
        if "json" not in parts:
            raise BadSample(MALFORMED_RECORD, f"no json member, parts {sorted(parts)}")
        json_file = archive.extractfile(parts["json"])
        try:
            record = json.loads(json_file.read() if json_file else b"")
        except json.JSONDecodeError as error:
            raise BadSample(MALFORMED_RECORD, f"invalid JSON: {error}") from error
        messages, _ = parse_record(record, where)
        image_parts = sorted(
            (name for name in parts if name.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS),
            key=_natural_key,
        )
        images, data = [], []
        for name in image_parts:
            member = parts[name]
            images.append(ImageRef(source.path, offset=member.offset_data, size=member.size))
            stream = archive.extractfile(member)
            data.append(stream.read() if stream else b"")
    except BadSample as error:
        return _bad(error, source, record_index, where)
    return RawSample(source.index, record_index, where, messages, images, data, loc=loc)


def _reread_tar_sample(source: Source, record_index: int, loc: int) -> RawSample | BadSample:
    with open(source.path, "rb") as stream:
        stream.seek(loc)
        with tarfile.open(fileobj=stream, mode="r:") as archive:
            key, parts = None, {}
            for member in archive:
                member_key, part = _tar_key(member)
                if member_key is None:
                    continue
                if key is not None and member_key != key:
                    break
                key = member_key
                parts[part] = member
            if key is None:
                raise ValueError(f"{source.path}@{loc}: no tar sample there (file changed?)")
            return _tar_sample(archive, source, record_index, key, parts, loc)


def _parquet_cell_image(cell: Any, index: int) -> bytes:
    value = cell[index] if index >= 0 else cell
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, bytes | bytearray) or not value:
        raise BadSample(MISSING_IMAGE, "no image bytes in parquet cell")
    return bytes(value)


@functools.lru_cache(maxsize=2)
def _parquet_rows(path: str, row_group: int) -> tuple[list[dict[str, Any]], str]:
    """Rows of one row group (kept for the last two asked for) and the image column name."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = set(parquet.schema_arrow.names)
    image_column = "images" if "images" in names else ("image" if "image" in names else "")
    return parquet.read_row_group(row_group).to_pylist(), image_column


def _read_parquet_group(source: Source, row_group: int) -> Iterator[RawSample | BadSample]:
    rows, _ = _parquet_rows(source.path, row_group)
    for offset in range(len(rows)):
        yield _parquet_sample(source, row_group, offset)


def _parquet_sample(source: Source, row_group: int, offset: int) -> RawSample | BadSample:
    rows, image_column = _parquet_rows(source.path, row_group)
    row = rows[offset]
    record_index = _parquet_group_starts(source.path)[row_group] + offset
    where = f"{source.path}:row {record_index} (id {row.get('id', '?')})"
    try:
        text_record = {k: v for k, v in row.items() if k not in ("image", "images")}
        messages, _ = parse_record(text_record, where)
        cell = row.get(image_column) if image_column else None
        images, data = [], []
        if isinstance(cell, list):
            for index in range(len(cell)):
                images.append(
                    ImageRef(
                        source.path,
                        row_group=row_group,
                        row=offset,
                        column=image_column,
                        index=index,
                    )
                )
                data.append(_parquet_cell_image(cell, index))
        elif cell is not None:
            images.append(
                ImageRef(source.path, row_group=row_group, row=offset, column=image_column)
            )
            data.append(_parquet_cell_image(cell, -1))
    except BadSample as error:
        return _bad(error, source, record_index, where)
    return RawSample(source.index, record_index, where, messages, images, data)


def read_sample(source: Source, record: int, loc: int) -> RawSample:
    """Read one sample again by its position (``record``, and ``loc`` from the first read).

    Raises :class:`BadSample` if it has become unusable, ``ValueError`` if the file changed.
    """
    if source.fmt == "jsonl":
        with open(source.path, "rb") as stream:
            stream.seek(loc)
            item = _json_sample(source, record, stream.readline(), loc)
    elif source.fmt == "json":
        item = _json_sample(source, record, _json_records(source.path)[record], -1)
    elif source.fmt == "tar":
        item = _reread_tar_sample(source, record, loc)
    else:
        starts = _parquet_group_starts(source.path)
        group = bisect.bisect_right(starts, record) - 1
        item = _parquet_sample(source, group, record - starts[group])
    if isinstance(item, BadSample):
        raise item
    return item


def corrupt_image_error(ref: ImageRef, detail: str) -> BadSample:
    """A :class:`BadSample` for an image whose bytes are not a readable image."""
    return BadSample(CORRUPT_IMAGE, f"{ref.describe()}: {detail}")
