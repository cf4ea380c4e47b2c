"""The packer's columnar sample table: one fixed-size row per usable sample, on disk.

Rows (:data:`SAMPLE_DTYPE`, 44 bytes) hold where a sample is (``source``, ``record``, ``loc``)
and what packing needs (``length``, ``patches``, ``patches_sq``, ``image_bytes``); never text or
image bytes, so the table's size depends only on the number of samples.

The video table (:data:`VIDEO_DTYPE`, 56 bytes a video, none for image and text samples) keeps
what measuring decoded from each video (frame count, frame rate, size, container) with its
sample's row, sorted by row: the write phase plans the same frames from it
(:func:`.measure.replan_video`), so a packer run decodes each video once.

The measure phase writes one table per work unit (``measure/u0000042.npy``, plus
``u0000042.videos.npy`` when the unit has videos and ``u0000042.skips.json`` listing its bad
samples when there are any). Each file appears under its final name only when complete (temp
name, fsync, rename), the unit table last, so a killed task leaves finished units that a re-run
skips. The plan phase concatenates the unit tables, in unit order, into one ``samples.npy`` (and
``videos.npy``) that later phases memory-map.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .measure import MeasuredSample, MeasuredVideo, replan_video
from .video import VideoConfig

SAMPLE_DTYPE = np.dtype(
    [
        ("source", "<i4"),
        ("length", "<i4"),
        ("patches", "<i4"),
        ("record", "<i8"),
        ("loc", "<i8"),
        ("patches_sq", "<i8"),
        ("image_bytes", "<i8"),
    ]
)
#: One measured video: its sample's row in the sample table, decoded frames (or frame images),
#: the stream's average frame rate (NaN for frame images), original size, encoded bytes,
#: container extension ("" for frame images).
VIDEO_DTYPE = np.dtype(
    [
        ("sample", "<i8"),
        ("total_frames", "<i8"),
        ("fps", "<f8"),
        ("width", "<i4"),
        ("height", "<i4"),
        ("num_bytes", "<i8"),
        ("extension", "S16"),
    ]
)
MEASURE_DIR = "measure"
TABLE_NAME = "samples.npy"
VIDEO_TABLE_NAME = "videos.npy"
#: How many skipped samples the report names (all are counted).
MAX_SKIP_EXAMPLES = 50


def unit_table(directory: Path, unit: int) -> Path:
    return directory / f"u{unit:07d}.npy"


def unit_videos(directory: Path, unit: int) -> Path:
    return directory / f"u{unit:07d}.videos.npy"


def unit_skips(directory: Path, unit: int) -> Path:
    return directory / f"u{unit:07d}.skips.json"


def atomic_write(path: Path, write: Any, shared: bool = False) -> None:
    """``write(stream)`` into ``path`` so that ``path`` only ever exists complete. The temp name
    is ``path.tmp``; ``shared`` (a file several tasks may write at once) adds the process id."""
    suffix = f".tmp.{os.getpid()}" if shared else ".tmp"
    temp = path.with_name(path.name + suffix)
    with open(temp, "wb") as stream:
        write(stream)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temp, path)


def rows_of(samples: Sequence[MeasuredSample]) -> np.ndarray:
    rows = np.zeros(len(samples), dtype=SAMPLE_DTYPE)
    for name in SAMPLE_DTYPE.names or ():
        rows[name] = [getattr(sample, _FIELD.get(name, name)) for sample in samples]
    return rows


_FIELD = {"patches": "num_patches"}


def video_rows_of(samples: Sequence[MeasuredSample]) -> np.ndarray:
    """The video table rows of the samples' videos, in order (``sample``: index in ``samples``)."""
    videos = [(i, video) for i, sample in enumerate(samples) for video in sample.measured_videos]
    rows = np.zeros(len(videos), dtype=VIDEO_DTYPE)
    for row, (sample, video) in zip(rows, videos, strict=True):
        row["sample"] = sample
        row["total_frames"], row["width"], row["height"] = (
            video.total_frames,
            video.width,
            video.height,
        )
        row["fps"] = np.nan if video.fps is None else video.fps
        row["num_bytes"], row["extension"] = video.num_bytes, video.extension.encode()
    return rows


def replan_videos(videos: np.ndarray, sample: int, config: VideoConfig) -> list[MeasuredVideo]:
    """The measured videos of the sample in row ``sample``, planned again from the video table
    ``videos`` (sorted by ``sample``)."""
    first, end = np.searchsorted(videos["sample"], [sample, sample + 1])
    return [
        replan_video(
            int(video["total_frames"]),
            None if np.isnan(video["fps"]) else float(video["fps"]),
            int(video["width"]),
            int(video["height"]),
            bytes(video["extension"]).decode(),
            int(video["num_bytes"]),
            config,
        )
        for video in videos[first:end]
    ]


def write_unit(
    directory: Path,
    unit: int,
    samples: Sequence[MeasuredSample],
    skips: Sequence[tuple[int, int, str, str]],
) -> None:
    """Store one measured unit: its rows and its ``(source, record, reason, message)`` skips."""
    if skips:
        atomic_write(unit_skips(directory, unit), lambda s: s.write(json.dumps(skips).encode()))
    videos = video_rows_of(samples)
    if len(videos):
        atomic_write(unit_videos(directory, unit), lambda stream: np.save(stream, videos))
    rows = rows_of(samples)
    atomic_write(unit_table(directory, unit), lambda stream: np.save(stream, rows))


def missing_units(directory: Path, units: Iterable[int]) -> list[int]:
    return [unit for unit in units if not unit_table(directory, unit).is_file()]


def merge_units(directory: Path, num_units: int, table: Path) -> np.ndarray:
    """Concatenate the unit tables into ``table`` and their video tables into
    :data:`VIDEO_TABLE_NAME` beside it (streaming, ``sample`` made a row of ``table``);
    memory-map ``table``. The video table is written first: ``table`` marks the merge done."""
    units = range(num_units)
    counts = [np.load(unit_table(directory, u), mmap_mode="r").shape[0] for u in units]
    video_counts = [
        np.load(unit_videos(directory, u), mmap_mode="r").shape[0]
        if unit_videos(directory, u).is_file()
        else 0
        for u in units
    ]
    video_offsets = np.cumsum([0, *video_counts])
    merged_videos = _open_merged(table.with_name(VIDEO_TABLE_NAME), VIDEO_DTYPE, video_offsets[-1])
    merged = _open_merged(table, SAMPLE_DTYPE, sum(counts))
    start = 0
    for unit, count in enumerate(counts):
        merged[start : start + count] = np.load(unit_table(directory, unit))
        if video_counts[unit]:
            videos = np.load(unit_videos(directory, unit))
            videos["sample"] += start
            merged_videos[video_offsets[unit] : video_offsets[unit + 1]] = videos
        start += count
    merged_videos.flush()
    merged.flush()
    del merged_videos, merged
    _commit(table.with_name(VIDEO_TABLE_NAME))
    _commit(table)
    return load_table(table)


def _open_merged(path: Path, dtype: np.dtype, length: int) -> np.memmap:
    temp = path.with_name(path.name + ".tmp")
    return np.lib.format.open_memmap(temp, mode="w+", dtype=dtype, shape=(int(length),))


def _commit(path: Path) -> None:
    """Fsync and rename a table made (and flushed) by :func:`_open_merged`."""
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "rb+") as stream:
        os.fsync(stream.fileno())
    os.replace(temp, path)


def load_table(table: Path) -> np.ndarray:
    return np.load(table, mmap_mode="r")


def load_video_table(table: Path) -> np.ndarray:
    """The merged video table beside the sample table ``table`` (empty when a partial run was
    planned before there was one: its video samples then stop the write in one line)."""
    path = table.with_name(VIDEO_TABLE_NAME)
    return np.load(path, mmap_mode="r") if path.is_file() else np.zeros(0, VIDEO_DTYPE)


def skip_summary(directory: Path, num_units: int) -> tuple[dict[str, int], list[str], int]:
    """``(count by reason, first messages in (source, record) order, total)`` of the skips."""
    reasons: Counter[str] = Counter()
    examples: list[str] = []
    for unit in range(num_units):
        path = unit_skips(directory, unit)
        if not path.is_file():
            continue
        for _source, _record, reason, message in json.loads(path.read_text()):
            reasons[reason] += 1
            if len(examples) < MAX_SKIP_EXAMPLES:
                examples.append(message)
    return dict(sorted(reasons.items())), examples, sum(reasons.values())
