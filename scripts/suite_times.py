"""Where a pytest run's time went, per test file, from its JUnit XML (``--junitxml=FILE``).

    python scripts/suite_times.py RUN.xml [BASELINE.xml] [--top N]

Each test file's seconds are the sum of its test cases' ``time`` (pytest counts a test's setup,
call and teardown there, so a fixture's set-up is charged to the first test that uses it, and a
session fixture to the first file). With a baseline, the table shows both runs and the change,
sorted by the baseline's time. Plain Python (no dependency beyond the standard library).
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


class BadReport(Exception):
    """A JUnit XML that cannot be read (one line for the user, exit 2)."""


def file_of(case: ET.Element) -> str:
    """``tests/test_x.py`` for a test case (its ``file`` attribute, else from ``classname``)."""
    if case.get("file"):
        return str(case.get("file"))
    module = (case.get("classname") or "").split(".")
    # classname is "tests.test_x" or "tests.test_x.TestClass"
    parts = [p for p in module if not p[:1].isupper()]
    return "/".join(parts) + ".py"


def per_file(path: Path) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds and test counts per test file of one JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise BadReport(f"{path}: not a readable JUnit XML file ({e})") from None
    seconds: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for case in root.iter("testcase"):
        name = file_of(case)
        seconds[name] += float(case.get("time") or 0.0)
        counts[name] += 1
    if not counts:
        raise BadReport(f"{path}: no <testcase> elements")
    return dict(seconds), dict(counts)


def table(runs: list[Path], top: int) -> str:
    """A Markdown table: per file, tests and seconds of each run (and the change for two)."""
    data = [per_file(p) for p in runs]
    first_seconds = data[0][0]
    files = sorted(set().union(*(s for s, _ in data)), key=lambda f: -first_seconds.get(f, 0.0))
    labels = ["run"] if len(runs) == 1 else ["before", "after"]
    header = ["file", *(f"{label} {what}" for label in labels for what in ("tests", "s"))]
    if len(runs) == 2:
        header.append("change s")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    totals = [0.0] * len(runs)
    for rank, name in enumerate(files):
        cells = [name]
        for i, (seconds, counts) in enumerate(data):
            totals[i] += seconds.get(name, 0.0)
            cells += [str(counts.get(name, 0)), f"{seconds.get(name, 0.0):.1f}"]
        if len(runs) == 2:
            cells.append(f"{data[1][0].get(name, 0.0) - data[0][0].get(name, 0.0):+.1f}")
        if rank < top:
            lines.append("| " + " | ".join(cells) + " |")
    rest = len(files) - min(top, len(files))
    total = ["all" + (f" ({rest} more files)" if rest else "")]
    for i, (_, counts) in enumerate(data):
        total += [str(sum(counts.values())), f"{totals[i]:.1f}"]
    if len(runs) == 2:
        total.append(f"{totals[1] - totals[0]:+.1f}")
    lines.append("| " + " | ".join(total) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("xml", type=Path, help="JUnit XML of the run")
    parser.add_argument("baseline", type=Path, nargs="?", help="JUnit XML to compare against")
    parser.add_argument("--top", type=int, default=20, help="files listed (default 20)")
    args = parser.parse_args(argv)
    runs = [args.baseline, args.xml] if args.baseline else [args.xml]
    try:
        print(table(runs, args.top))
    except BadReport as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
