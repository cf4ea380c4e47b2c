"""Per-source sample counts for ``pack_report.json`` (``samples_per_source``), and the video
totals (``videos``).

A sample's source name is the data set it came from (:attr:`.sources.RawSample.source_name`:
the record's ``data_source``, else the folder or file it was read from). The measure phase
stores, per work unit, ``measure/u0000042.sources.json`` = ``{name: {"packed": n, reason: n}}``
(written before the unit's table, so a finished unit always has it); the plan phase merges them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from .sample_store import atomic_write

#: The count of a source's usable samples (all of them are packed); other keys are reasons.
PACKED = "packed"


def unit_counts_path(directory: Path, unit: int) -> Path:
    return directory / f"u{unit:07d}.sources.json"


class SourceCounts:
    """Counts of one work unit: usable samples and skips by reason, per source name."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = {}

    def add(self, name: str, outcome: str) -> None:
        """One sample of source ``name``: :data:`PACKED` or the reason it was skipped."""
        self.counts.setdefault(name, Counter())[outcome] += 1

    def save(self, directory: Path, unit: int) -> None:
        data = {name: dict(sorted(c.items())) for name, c in sorted(self.counts.items())}
        text = json.dumps(data, sort_keys=True).encode()
        atomic_write(unit_counts_path(directory, unit), lambda stream: stream.write(text))


def _read_unit_file(path: Path) -> dict[str, Any]:
    """One unit's counts file; a finished unit always has it (else: an older version's)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing (the unit was measured by an older version); remove the "
            "partial output and run again"
        )
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def merge_source_counts(directory: Path, num_units: int) -> dict[str, dict[str, Any]]:
    """``{name: {"in", "packed", "skipped": {reason: n}}}`` over all units, sorted by name."""
    totals: dict[str, Counter[str]] = {}
    for unit in range(num_units):
        for name, counts in _read_unit_file(unit_counts_path(directory, unit)).items():
            totals.setdefault(name, Counter()).update(counts)
    return {
        name: {
            "in": sum(counts.values()),
            PACKED: counts[PACKED],
            "skipped": {r: n for r, n in sorted(counts.items()) if r != PACKED},
        }
        for name, counts in sorted(totals.items())
    }


#: The report's media totals (``videos``): videos packed and their sampled frames.
MEDIA_KEYS = ("videos", "frames")


def unit_media_path(directory: Path, unit: int) -> Path:
    return directory / f"u{unit:07d}.media.json"


def save_media_counts(directory: Path, unit: int, counts: dict[str, int]) -> None:
    """One unit's totals of :data:`MEDIA_KEYS` over its usable samples (written before its
    table, as the source counts are)."""
    text = json.dumps({key: int(counts.get(key, 0)) for key in MEDIA_KEYS}).encode()
    atomic_write(unit_media_path(directory, unit), lambda stream: stream.write(text))


def merge_media_counts(directory: Path, num_units: int) -> dict[str, int]:
    """:data:`MEDIA_KEYS` summed over all units."""
    totals: Counter[str] = Counter({key: 0 for key in MEDIA_KEYS})
    for unit in range(num_units):
        totals.update(_read_unit_file(unit_media_path(directory, unit)))
    return {key: totals[key] for key in MEDIA_KEYS}
