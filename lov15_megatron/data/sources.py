"""Raw-sample readers for the input layouts users have (docs/data-reference.md §1,
docs/data-packing.md *Input layouts*). What a record itself holds is read by :mod:`.records`.

File layouts (detected by file extension; a directory means every supported file below it,
sorted):

- ``.json`` (an array) / ``.jsonl``: one record per element / line, image paths relative to the
  source's image root (default: the JSON file's folder);
- ``.tar``: WebDataset shards, members ``KEY.PART`` grouped by key (the basename up to its first
  dot, so ``KEY.0_a.b.jpg`` is part ``0_a.b.jpg`` of ``KEY``): a ``json`` member plus image
  members, taken in natural order of their names, or the members a release mix record names;
  a release packed caption record (``KEY.img{i}.jpg``) gives one sample per image;
- ``.parquet``: rows with an ``image``/``images`` column (bytes, ``{"bytes", "path"}`` structs, or
  null) and ``caption`` or ``conversations``/``messages`` (list or JSON string) columns: the
  Mid-Training-85M and Instruct-Data sets as published.

Every sample gets a stable position ``(source, record)``, an ``origin`` naming the file, the
record and the record's published ``id``, and a source name for the report (the record's
``data_source``, else the first folder below the ``--input`` folder, else that folder's or the
given file's name); every problem is a :class:`BadSample` carrying that origin.

Videos are read only from sources made with ``videos=True`` (``--videos pack``); other sources
refuse them as ``video_not_supported``. A sample's videos (:class:`VideoRef`) are, in order: a
JSON record's ``video``/``videos`` entries (a file, a folder of frame images, or a list of frame
images, relative to the image root), a mix record's named video members or, in other tars, every
video member in natural order, and a parquet row's ``video``/``videos`` cells (bytes or
``{"bytes", "path"}`` structs, or lists of them). A packed caption
record's pairs take consecutive record numbers; its ``loc`` adds the pair's index to the tar
position (:data:`TAR_LOC_STRIDE`).
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

from .chat import Message
from .errors import (
    CORRUPT_IMAGE,
    CORRUPT_VIDEO,
    MALFORMED_RECORD,
    MISSING_IMAGE,
    MISSING_VIDEO,
    VIDEO_NOT_SUPPORTED,
    BadSample,
)
from .records import (
    caption_pairs,
    is_packed_captions,
    is_release_mix,
    parse_record,
    record_id,
    record_source_name,
    video_entries,
)
from .video import VideoError, list_frame_files

JSON_SUFFIXES = (".json", ".jsonl")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
VIDEO_EXTENSIONS = ("mp4", "avi", "mov", "mkv", "webm", "flv", "wmv", "m4v")
FORMATS = ("json", "jsonl", "tar", "parquet")
#: A tar sample's ``loc`` is its first member's header offset × this + the index of the sample
#: in its record (a packed caption record's pair; 0 otherwise): at most this many pairs.
TAR_LOC_STRIDE = 4096


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


@dataclass(frozen=True)
class VideoRef:
    """One video: an encoded video file (``file``), or frame images in order (``frames``)."""

    file: ImageRef | None = None
    frames: tuple[ImageRef, ...] = ()

    def describe(self) -> str:
        if self.file is not None:
            return self.file.describe()
        return f"{self.frames[0].describe()} … ({len(self.frames)} frame images)"

    def read_bytes(self) -> bytes:
        """The encoded video file's bytes; :class:`BadSample` (missing_video) if unreadable."""
        assert self.file is not None
        try:
            return self.file.read_bytes()
        except BadSample as error:
            raise BadSample(MISSING_VIDEO, error.message) from error


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
    #: position (:data:`TAR_LOC_STRIDE`), else -1 (json / parquet: by record index).
    loc: int = -1
    #: The data set it belongs to, for the report's per-source counts.
    source_name: str = ""
    videos: list[VideoRef] = field(default_factory=list)
    #: A video file's bytes where the reader already had them (tar, parquet), else None.
    video_data: list[bytes | None] | None = field(default=None, repr=False)

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
    #: Its samples' source name unless a record names its own (``data_source``).
    name: str = ""
    #: Whether its video samples are read (``--videos pack``) or refused.
    videos: bool = False


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


# ----------------------------------------------------------------------------- sources


def discover_sources(
    inputs: Sequence[str], image_root: str | None = None, videos: bool = False
) -> list[Source]:
    """Expand ``--input`` values (files or folders; ``PATH::IMAGE_ROOT`` sets a JSON source's
    image root) into sources in a deterministic order; ``videos``: read video samples."""
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
            name = _source_name(path, file)
            fmt = _format_of(file)
            sources.append(Source(len(sources), str(file), fmt, file_root, name, videos))
    return sources


def _source_name(given: Path, file: Path) -> str:
    """The first folder below a given folder (``Instruct/ai2d/train-….parquet``: ``ai2d``),
    else the given folder's name, else the given file's name."""
    if given == file:
        return file.name
    folders = file.relative_to(given).parts[:-1]
    return folders[0] if folders else given.name


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


def _bad(
    error: BadSample, source: Source, record: int, where: str, name: str | None = None
) -> BadSample:
    located = error.at(where)
    located.record = record  # type: ignore[attr-defined]
    located.source = source.index  # type: ignore[attr-defined]
    located.source_name = name or source.name  # type: ignore[attr-defined]
    return located


def _with_id(where: str, record: Any) -> str:
    """``where`` plus the record's published id, which a user can look the sample up by."""
    published = record_id(record)
    return where if published is None else f"{where} (id {published})"


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
    record, name = raw, None
    try:
        if source.fmt == "jsonl":
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as error:
                raise BadSample(MALFORMED_RECORD, f"invalid JSON: {error}") from error
        where, name = _with_id(where, record), record_source_name(record)
        messages, entries = parse_record(record, where, source.videos)
        videos = _json_videos(root, video_entries(record, where)) if source.videos else []
        images = []
        for entry in entries:
            if not isinstance(entry, str):
                raise BadSample(MALFORMED_RECORD, f"image entry {entry!r} is not a path")
            path = root / entry
            if not path.is_file():
                raise BadSample(MISSING_IMAGE, f"image file {path} not found")
            images.append(ImageRef(str(path)))
    except BadSample as error:
        return _bad(error, source, record_index, where, name)
    return RawSample(
        source.index,
        record_index,
        where,
        messages,
        images,
        loc=loc,
        source_name=name or source.name,
        videos=videos,
    )


def _json_videos(root: Path, entries: list[str | list[str]]) -> list[VideoRef]:
    """A JSON record's videos: files, frame folders and frame lists below ``root``."""
    videos = []
    for entry in entries:
        if isinstance(entry, list):
            frames = [root / frame for frame in entry]
            missing = next((frame for frame in frames if not frame.is_file()), None)
            if missing is not None:
                raise BadSample(MISSING_VIDEO, f"frame image {missing} not found")
            videos.append(VideoRef(frames=tuple(ImageRef(str(frame)) for frame in frames)))
            continue
        path = root / entry
        if path.is_dir():
            try:
                files = list_frame_files(path)
            except VideoError as error:
                raise BadSample(MISSING_VIDEO, str(error)) from error
            videos.append(VideoRef(frames=tuple(ImageRef(str(file)) for file in files)))
        elif path.is_file():
            videos.append(VideoRef(file=ImageRef(str(path))))
        else:
            raise BadSample(MISSING_VIDEO, f"video {path} not found")
    return videos


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_tar(source: Source) -> Iterator[RawSample | BadSample]:
    try:
        archive = tarfile.open(source.path, "r:")
    except (OSError, tarfile.TarError) as error:
        raise ValueError(f"{source.path}: not a readable tar: {error}") from error
    groups: list[_TarGroup] = []
    with archive:
        try:
            for member in archive:
                key, part = _tar_key(member)
                if key is None:
                    continue
                if not groups or groups[-1].key != key:
                    groups.append(_TarGroup(key, member.offset))
                groups[-1].parts[part] = member
        except tarfile.TarError as error:
            raise ValueError(f"{source.path}: corrupt tar: {error}") from error
        record = 0
        for group in groups:
            items = _tar_items(archive, source, record, group)
            yield from items
            record += len(items)


@dataclass
class _TarGroup:
    """The members of one WebDataset key, by part name; ``offset``: its first header's."""

    key: str
    offset: int
    parts: dict[str, tarfile.TarInfo] = field(default_factory=dict)

    def member(self, name: str) -> tarfile.TarInfo | None:
        """The part ``name`` (WebDataset readers lower-case suffixes: a case-blind match)."""
        if name in self.parts:
            return self.parts[name]
        lower = name.lower()
        return next((info for part, info in self.parts.items() if part.lower() == lower), None)


def _tar_key(member: tarfile.TarInfo) -> tuple[str | None, str]:
    """``(sample key, part name)`` of a WebDataset member; key None for members to skip."""
    if not member.isfile():
        return None, ""
    directory, _, base = member.name.rpartition("/")
    stem, dot, part = base.partition(".")
    if not dot:
        return None, ""
    return (f"{directory}/{stem}" if directory else stem), part


def _extension(part: str) -> str:
    return part.rsplit(".", 1)[-1].lower()


def _tar_images(
    archive: tarfile.TarFile, source: Source, group: _TarGroup, names: list[str]
) -> tuple[list[ImageRef], list[bytes]]:
    images, data = [], []
    for name in names:
        member = group.member(name)
        if member is None:
            raise BadSample(
                MISSING_IMAGE, f"no member {group.key}.{name} (parts {sorted(group.parts)})"
            )
        images.append(ImageRef(source.path, offset=member.offset_data, size=member.size))
        stream = archive.extractfile(member)
        data.append(stream.read() if stream else b"")
    return images, data


def _tar_items(
    archive: tarfile.TarFile, source: Source, first: int, group: _TarGroup, pair: int | None = None
) -> list[RawSample | BadSample]:
    """The samples of one tar key, numbered from record ``first``: one, or one per pair of a
    packed caption record; with ``pair``, only that pair's sample (re-reading one sample reads
    only its own image)."""
    where, name = f"{source.path}:{group.key} (tar sample {first})", None
    try:
        json_member = group.member("json")
        if json_member is None:
            raise BadSample(MALFORMED_RECORD, f"no json member, parts {sorted(group.parts)}")
        json_file = archive.extractfile(json_member)
        try:
            record = json.loads(json_file.read() if json_file else b"")
        except json.JSONDecodeError as error:
            raise BadSample(MALFORMED_RECORD, f"invalid JSON: {error}") from error
        where, name = _with_id(where, record), record_source_name(record)
        if is_packed_captions(record):
            return _caption_items(archive, source, first, group, record, where, name, pair)
        video_parts = [part for part in group.parts if _extension(part) in VIDEO_EXTENSIONS]
        if video_parts and not source.videos:
            raise BadSample(VIDEO_NOT_SUPPORTED, f"video members {sorted(video_parts)}")
        messages, names = parse_record(record, where, source.videos)
        video_names: list[Any] = sorted(video_parts, key=_natural_key)
        if is_release_mix(record):
            video_names = video_entries(record, where) if source.videos else []
        else:  # all image members, in natural order
            names = [part for part in group.parts if _extension(part) in IMAGE_EXTENSIONS]
            names.sort(key=_natural_key)
        images, data = _tar_images(archive, source, group, names)
        try:
            video_files, video_data = _tar_images(archive, source, group, video_names)
        except BadSample as error:
            raise BadSample(MISSING_VIDEO, error.message) from error
    except BadSample as error:
        return [_bad(error, source, first, where, name)]
    sample = RawSample(
        source.index,
        first,
        where,
        messages,
        images,
        data,
        loc=group.offset * TAR_LOC_STRIDE,
        source_name=name or source.name,
        videos=[VideoRef(file=ref) for ref in video_files],
        video_data=list(video_data),
    )
    return [sample]


def _caption_items(
    archive: tarfile.TarFile,
    source: Source,
    first: int,
    group: _TarGroup,
    record: dict[str, Any],
    where: str,
    name: str | None,
    pair: int | None,
) -> list[RawSample | BadSample]:
    """A packed caption record's pairs (or only pair ``pair``), each a sample of member
    ``img{i}.jpg``, of source ``name`` (the record's ``data_source``) or the file's."""
    pairs = caption_pairs(record, where)
    if len(pairs) > TAR_LOC_STRIDE:
        raise BadSample(MALFORMED_RECORD, f"{len(pairs)} captions > {TAR_LOC_STRIDE}")
    name = name or source.name
    chosen = range(len(pairs)) if pair is None else range(pair, min(pair + 1, len(pairs)))
    items: list[RawSample | BadSample] = []
    for index in chosen:
        prompt, caption, path = pairs[index]
        part = f"img{index}.jpg"
        image = f", image {path}" if path else ""
        origin = f"{source.path}:{group.key}.{part} (tar sample {first + index}{image})"
        try:
            images, data = _tar_images(archive, source, group, [part])
        except BadSample as error:
            items.append(_bad(error, source, first + index, origin, name))
            continue
        messages = [Message("user", prompt), Message("assistant", caption)]
        loc = group.offset * TAR_LOC_STRIDE + index
        items.append(
            RawSample(source.index, first + index, origin, messages, images, data, loc, name)
        )
    return items


def _reread_tar_sample(source: Source, record_index: int, loc: int) -> RawSample | BadSample:
    offset, index = divmod(loc, TAR_LOC_STRIDE)
    with open(source.path, "rb") as stream:
        stream.seek(offset)
        with tarfile.open(fileobj=stream, mode="r:") as archive:
            group = None
            for member in archive:
                key, part = _tar_key(member)
                if key is None:
                    continue
                if group is not None and key != group.key:
                    break
                group = group or _TarGroup(key, offset)
                group.parts[part] = member
            items = (
                []
                if group is None
                else _tar_items(archive, source, record_index - index, group, pair=index)
            )
            # A packed caption record gives the one pair asked for; any other record gives its
            # one sample, which only pair 0 may name.
            if len(items) != 1 or (index and items[0].record != record_index):
                raise ValueError(f"{source.path}@{offset}: no tar sample there (file changed?)")
            return items[0]


def _parquet_cell_image(cell: Any, index: int, what: str = "image") -> bytes:
    value = cell[index] if index >= 0 else cell
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, bytes | bytearray) or not value:
        reason = MISSING_IMAGE if what == "image" else MISSING_VIDEO
        raise BadSample(reason, f"no {what} bytes in parquet cell")
    return bytes(value)


@functools.lru_cache(maxsize=2)
def _parquet_rows(path: str, row_group: int) -> tuple[list[dict[str, Any]], str]:
    """Rows of one row group (kept for the last two asked for) and the image column name."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = set(parquet.schema_arrow.names)
    image_column = "images" if "images" in names else ("image" if "image" in names else "")
    return parquet.read_row_group(row_group).to_pylist(), image_column


#: Parquet columns that hold video bytes (read with ``--videos pack``).
VIDEO_COLUMNS = ("video", "videos")


def _parquet_cells(
    source: Source, row_group: int, offset: int, column: str, cell: Any, what: str
) -> tuple[list[ImageRef], list[bytes]]:
    """The refs and bytes of one media cell: one value, a list of them, or null."""
    if isinstance(cell, dict) and cell.get("bytes") is None and cell.get("path") is None:
        cell = None  # a null struct, as a row without this medium may hold
    indices = range(len(cell)) if isinstance(cell, list) else [] if cell is None else [-1]
    refs, data = [], []
    for index in indices:
        refs.append(
            ImageRef(source.path, row_group=row_group, row=offset, column=column, index=index)
        )
        data.append(_parquet_cell_image(cell, index, what))
    return refs, data


def _read_parquet_group(source: Source, row_group: int) -> Iterator[RawSample | BadSample]:
    rows, _ = _parquet_rows(source.path, row_group)
    for offset in range(len(rows)):
        yield _parquet_sample(source, row_group, offset)


def _parquet_sample(source: Source, row_group: int, offset: int) -> RawSample | BadSample:
    rows, image_column = _parquet_rows(source.path, row_group)
    row = rows[offset]
    record_index = _parquet_group_starts(source.path)[row_group] + offset
    where = _with_id(f"{source.path}:row {record_index}", row)
    name = record_source_name(row) or source.name
    media = ("image", "images", *VIDEO_COLUMNS) if source.videos else ("image", "images")
    try:
        text_record = {k: v for k, v in row.items() if k not in media}
        messages, _ = parse_record(text_record, where, source.videos)
        cell = row.get(image_column) if image_column else None
        images, data = _parquet_cells(source, row_group, offset, image_column, cell, "image")
        videos, video_data = [], []
        for column in VIDEO_COLUMNS if source.videos else ():
            refs, cells = _parquet_cells(
                source, row_group, offset, column, row.get(column), "video"
            )
            videos += [VideoRef(file=ref) for ref in refs]
            video_data += cells
    except BadSample as error:
        return _bad(error, source, record_index, where, name)
    return RawSample(
        source.index,
        record_index,
        where,
        messages,
        images,
        data,
        source_name=name,
        videos=videos,
        video_data=list(video_data),
    )


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


def corrupt_video_error(ref: VideoRef, detail: str) -> BadSample:
    """A :class:`BadSample` for a video (or frame image) that cannot be decoded."""
    return BadSample(CORRUPT_VIDEO, f"{ref.describe()}: {detail}")
