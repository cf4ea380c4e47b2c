"""The packer's columnar sample table: one fixed-size row per usable sample, on disk.

Rows (:data:`SAMPLE_DTYPE`, 44 bytes) hold where a sample is (``source``, ``record``, ``loc``)
and what packing needs (``length``, ``patches``, ``patches_sq``, ``image_bytes``); never text or
image bytes, so the table's size depends only on the number of samples.

The measure phase writes one table per work unit (``measure/u0000042.npy``, plus
``u0000042.skips.json`` listing its bad samples when there are any). Each file appears under its
final name only when complete (temp name, fsync, rename), so a killed task leaves finished units
that a re-run skips. The plan phase concatenates the unit tables, in unit order, into one
``samples.npy`` that later phases memory-map.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .measure import MeasuredSample

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
MEASURE_DIR = "measure"
TABLE_NAME = "samples.npy"
#: How many skipped samples the report names (all are counted).
MAX_SKIP_EXAMPLES = 50


def unit_table(directory: Path, unit: int) -> Path:
    return directory / f"u{unit:07d}.npy"


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


def write_unit(
    directory: Path,
    unit: int,
    samples: Sequence[MeasuredSample],
    skips: Sequence[tuple[int, int, str, str]],
) -> None:
    """Store one measured unit: its rows and its ``(source, record, reason, message)`` skips."""
    if skips:
        atomic_write(unit_skips(directory, unit), lambda s: s.write(json.dumps(skips).encode()))
    rows = rows_of(samples)
    atomic_write(unit_table(directory, unit), lambda stream: np.save(stream, rows))


def missing_units(directory: Path, units: Iterable[int]) -> list[int]:
    return [unit for unit in units if not unit_table(directory, unit).is_file()]


def merge_units(directory: Path, num_units: int, table: Path) -> np.ndarray:
    """Concatenate the unit tables into ``table`` (streaming) and memory-map it."""
    counts = [np.load(unit_table(directory, u), mmap_mode="r").shape[0] for u in range(num_units)]
    temp = table.with_name(table.name + ".tmp")
    merged = np.lib.format.open_memmap(temp, mode="w+", dtype=SAMPLE_DTYPE, shape=(sum(counts),))
    start = 0
    for unit, count in enumerate(counts):
        merged[start : start + count] = np.load(unit_table(directory, unit))
        start += count
    merged.flush()
    del merged
    with open(temp, "rb+") as stream:
        os.fsync(stream.fileno())
    os.replace(temp, table)
    return load_table(table)


def load_table(table: Path) -> np.ndarray:
    return np.load(table, mmap_mode="r")


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
