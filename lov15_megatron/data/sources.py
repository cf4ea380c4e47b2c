"""Raw-sample readers for the input layouts users have (data-and-stages.md §1).

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
                return _parquet_cell_image(
                    _read_parquet_column(self.path, self.row_group, self.column)[self.row],
                    self.index,
                )
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
    """A chunk of one source that one worker reads: JSON records, a tar, a parquet row group."""

    source: Source
    start: int = 0  # record index of the first record (json/jsonl)
    records: tuple[Any, ...] = ()  # json: parsed objects; jsonl: raw lines
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
        if "conversations" in record:
            turns = record["conversations"]
            if isinstance(turns, str):
                turns = json.loads(turns)
            messages = [
                Message(ROLE_ALIASES[turn["from"]], _content_to_text(turn["value"], where))
                for turn in turns
            ]
        elif "messages" in record:
            turns = record["messages"]
            if isinstance(turns, str):
                turns = json.loads(turns)
            messages = [
                Message(ROLE_ALIASES[turn["role"]], _content_to_text(turn["content"], where))
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
    """Split sources into work units, in source/record order."""
    units: list[WorkUnit] = []
    for source in sources:
        if source.fmt in ("json", "jsonl"):
            records = _load_json_records(source)
            for start in range(0, len(records), records_per_unit):
                chunk = tuple(records[start : start + records_per_unit])
                units.append(WorkUnit(source, start=start, records=chunk))
        elif source.fmt == "tar":
            units.append(WorkUnit(source))
        else:
            import pyarrow.parquet as pq

            try:
                count = pq.ParquetFile(source.path).num_row_groups
            except Exception as error:  # pyarrow raises several types
                raise ValueError(f"{source.path}: not a readable parquet file: {error}") from error
            units.extend(WorkUnit(source, row_group=group) for group in range(count))
    return units


def _load_json_records(source: Source) -> list[Any]:
    data = Path(source.path).read_bytes()
    if source.fmt == "jsonl":
        return [line for line in data.splitlines() if line.strip()]
    try:
        records = json.loads(data)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source.path}: not valid JSON: {error}") from error
    if isinstance(records, dict) and isinstance(records.get("data"), list):
        records = records["data"]
    if not isinstance(records, list):
        raise ValueError(f"{source.path}: expected a JSON array of records")
    return records


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
    root = Path(source.image_root)
    for offset, raw in enumerate(unit.records):
        record_index = unit.start + offset
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
            yield _bad(error, source, record_index, where)
            continue
        yield RawSample(source.index, record_index, where, messages, images)


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_tar(source: Source) -> Iterator[RawSample | BadSample]:
    try:
        archive = tarfile.open(source.path, "r:")
    except (OSError, tarfile.TarError) as error:
        raise ValueError(f"{source.path}: not a readable tar: {error}") from error
    groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    with archive:
        try:
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, part = base.partition(".")
                if not dot:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                groups[-1][1][part.lower()] = member
        except tarfile.TarError as error:
            raise ValueError(f"{source.path}: corrupt tar: {error}") from error
        for record_index, (key, parts) in enumerate(groups):
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
                    images.append(
                        ImageRef(source.path, offset=member.offset_data, size=member.size)
                    )
                    stream = archive.extractfile(member)
                    data.append(stream.read() if stream else b"")
            except BadSample as error:
                yield _bad(error, source, record_index, where)
                continue
            yield RawSample(source.index, record_index, where, messages, images, data)


@functools.lru_cache(maxsize=2)
def _read_parquet_column(path: str, row_group: int, column: str) -> list[Any]:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(row_group, columns=[column]).column(0).to_pylist()


def _parquet_cell_image(cell: Any, index: int) -> bytes:
    value = cell[index] if index >= 0 else cell
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, bytes | bytearray) or not value:
        raise BadSample(MISSING_IMAGE, "no image bytes in parquet cell")
    return bytes(value)


def _read_parquet_group(source: Source, row_group: int) -> Iterator[RawSample | BadSample]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(source.path)
    names = set(parquet.schema_arrow.names)
    image_column = "images" if "images" in names else ("image" if "image" in names else "")
    table = parquet.read_row_group(row_group)
    rows = table.to_pylist()
    first = sum(parquet.metadata.row_group(g).num_rows for g in range(row_group))
    for offset, row in enumerate(rows):
        record_index = first + offset
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
            yield _bad(error, source, record_index, where)
            continue
        yield RawSample(source.index, record_index, where, messages, images, data)


def corrupt_image_error(ref: ImageRef, detail: str) -> BadSample:
    """A :class:`BadSample` for an image whose bytes are not a readable image."""
    return BadSample(CORRUPT_IMAGE, f"{ref.describe()}: {detail}")
