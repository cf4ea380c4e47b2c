#!/usr/bin/env bash
# One node without Slurm: torchrun --standalone over the local GPUs (or NPROC ranks).
#   scripts/run_local.sh CONFIG [--dry-run] [key.sub=value ...]
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: run_local.sh CONFIG [--dry-run] [key.sub=value ...]" >&2; exit 2; }
CONFIG="$1"; shift
[[ -f "$CONFIG" ]] || { echo "error: config $CONFIG not found" >&2; exit 2; }
DRY_RUN=0; ARGS=()
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && DRY_RUN=1 || ARGS+=("$arg"); done
if [[ -z "${NPROC:-}" ]]; then
  NPROC="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
  [[ "$NPROC" -ge 1 ]] || NPROC=1
fi
CMD=(python -m torch.distributed.run --standalone --nproc-per-node "$NPROC"
     -m lov15_megatron.train --config "$CONFIG" "${ARGS[@]}")
if [[ $DRY_RUN == 1 ]]; then
  python -m lov15_megatron.train --config "$CONFIG" --print-config "${ARGS[@]}"
  echo "launch command:"; printf ' %q' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
