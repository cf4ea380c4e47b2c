#!/usr/bin/env bash
# Install (if needed) and run the whole test suite: lint, format check, type check, pytest.
#   bash scripts/test.sh [pytest args…]
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
echo "[test] ruff check"
ruff check .
echo "[test] ruff format --check"
ruff format --check .
echo "[test] mypy (the modules listed in pyproject.toml's [tool.mypy])"
mypy
echo "[test] pytest"
python -m pytest "$@"
