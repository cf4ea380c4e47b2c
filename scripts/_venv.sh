# Sourced by scripts/*.sh: use the active virtual environment, or create ./.venv, and install
# this package with its pinned dependencies (skipped when pyproject.toml has not changed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON_BIN="${PYTHON:-python3}"
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    echo "[setup] creating virtual environment in .venv"
    "$PYTHON_BIN" -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"lov15-megatron needs Python >= 3.11, this is {sys.version.split()[0]}")
PY
STAMP="$VIRTUAL_ENV/.lov15-installed"
WANT="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  echo "[setup] installing lov15-megatron and its pinned dependencies (about a minute)"
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e ".[dev]"
  echo "$WANT" > "$STAMP"
fi
# Multi-rank CPU runs: one thread per rank keeps 2-core machines from oversubscribing.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
