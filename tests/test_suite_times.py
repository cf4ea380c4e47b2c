"""scripts/suite_times.py: per-file seconds from a JUnit XML written here by hand in pytest's
layout (``classname`` = dotted module path, optionally a class; ``time`` in seconds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("suite_times", ROOT / "scripts" / "suite_times.py")
suite_times = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite_times)

BEFORE = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_a" name="test_one" time="1.5"/>
<testcase classname="tests.test_a" name="test_two[x]" time="2.25"/>
<testcase classname="tests.test_b.TestGroup" name="test_three" time="10.0"/>
<testcase classname="tests.test_c" name="test_skipped" time="0.0"><skipped/></testcase>
</testsuite></testsuites>"""
AFTER = BEFORE.replace('time="10.0"', 'time="4.0"').replace('time="1.5"', 'time="2.5"')


def test_per_file_sums_and_comparison(tmp_path, capsys):
    before, after = tmp_path / "before.xml", tmp_path / "after.xml"
    before.write_text(BEFORE)
    after.write_text(AFTER)
    seconds, counts = suite_times.per_file(before)
    assert seconds == {"tests/test_a.py": 3.75, "tests/test_b.py": 10.0, "tests/test_c.py": 0.0}
    assert counts == {"tests/test_a.py": 2, "tests/test_b.py": 1, "tests/test_c.py": 1}

    assert suite_times.main([str(after), str(before), "--top", "2"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "| file | before tests | before s | after tests | after s | change s |"
    # sorted by the baseline's seconds; the rest summed in the last row
    assert rows[2:] == [
        "| tests/test_b.py | 1 | 10.0 | 1 | 4.0 | -6.0 |",
        "| tests/test_a.py | 2 | 3.8 | 2 | 4.8 | +1.0 |",
        "| all (1 more files) | 4 | 13.8 | 4 | 8.8 | -5.0 |",
    ]


@pytest.mark.parametrize("text", ["not xml", "<testsuites></testsuites>"])
def test_bad_report_is_one_line_exit_2(tmp_path, capsys, text):
    bad = tmp_path / "bad.xml"
    bad.write_text(text)
    assert suite_times.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and err.count("\n") == 1, err
