#!/usr/bin/env bash
# The second test environment: Python 3.12 with megatron-core 0.19.2 and torch 2.14.1 (what
# pyproject.toml's markers give Python >= 3.12), in its own virtual environment ./.venv-py312.
# Runs the compatibility subset (the tests marked `compat` in tests/: parallel equivalence,
# conversion, training/resume, LoRA, MoE, runtime and Megatron-Core compatibility; the
# quickstart runs in the pinned suite, the environment scripts/quickstart.sh installs) with the
# given pytest options, or the test files the arguments name:
#   bash scripts/test_py312.sh [pytest args…]
# PYTHON312=/path/to/python3.12 picks the interpreter (default: python3.12 on PATH, else
# pyenv's newest 3.12). PyPI's torch 2.14.1 is a CUDA build (about 5.5 GB in the venv; it runs
# on the CPU here): the venv is reused until pyproject.toml changes (pip's wheel cache is not
# written on the CI machines, so the venv itself is the cache).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv-py312"
# The subset is the `compat` marker (pyproject.toml [tool.pytest.ini_options]): what differs
# between the Megatron-Core releases (the CPU backend, the private touch points, the distributed
# optimizer and grad sync, dist checkpoints, the MoE router), each once. The pinned suite keeps
# the rest (bad-input messages, the other resume/signal cases, HF parity).

find_python312() {
  local candidate pyenv_312=()
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12; do
    pyenv_312=("$candidate" "${pyenv_312[@]}")  # newest first (the glob sorts ascending)
  done
  for candidate in "${PYTHON312:-}" "$(command -v python3.12 || true)" "${pyenv_312[@]}"; do
    if [[ -n "$candidate" && -x "$candidate" ]] \
        && "$candidate" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
  if ! PY312="$(find_python312)"; then
    echo "[test-py312] error: no Python 3.12 interpreter found (looked at \$PYTHON312, python3.12" \
         "on PATH, ${PYENV_ROOT:-$HOME/.pyenv}/versions/3.12.*); install one or set PYTHON312" >&2
    exit 2
  fi
  echo "[test-py312] creating virtual environment in .venv-py312 with $PY312"
  "$PY312" -m venv "$VENV"
fi
# Use this venv, not whatever is active; _venv.sh installs the package into it (skipped when
# pyproject.toml has not changed) and sets one thread per rank.
unset VIRTUAL_ENV
# shellcheck disable=SC1091
source "$VENV/bin/activate"
t0=$SECONDS
# shellcheck disable=SC1091
source "$ROOT/scripts/_venv.sh"
python - <<'PY'
import sys
from importlib.metadata import version
if sys.version_info[:2] != (3, 12):
    sys.exit(f".venv-py312 runs Python {sys.version.split()[0]}, not 3.12: remove it and rerun")
print(f"[test-py312] Python {sys.version.split()[0]}, torch {version('torch')}, "
      f"megatron-core {version('megatron-core')}")
PY
echo "[test-py312] environment ready in $((SECONDS - t0)) s ($(du -sh "$VENV" | cut -f1))"
# Like pytest's testpaths: the subset unless an argument names a test file or folder.
paths=0
for arg in "$@"; do
  if [[ -e "${arg%%::*}" ]]; then
    paths=1
  fi
done
if [[ $paths -eq 0 ]]; then
  set -- -m compat "$@"
fi
echo "[test-py312] pytest $*"
python -m pytest "$@"
