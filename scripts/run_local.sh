#!/usr/bin/env bash
# Train on one machine without Slurm: torchrun --standalone over its GPUs (or CPU processes).
#
#   scripts/run_local.sh [--dry-run] CONFIG [key.sub=value ...]
#
#   CONFIG   any config in configs/, e.g. configs/llava_ov_1_5/4b/stage1_alignment.yaml or
#            configs/tiny/stage1.yaml; paths are overrides, e.g. data.path=DIR
#            checkpoint.save=DIR checkpoint.pretrained=DIR
#   NPROC    ranks to start (default: auto = torchrun's choice, one per GPU, else per CPU core)
#   PYTHON   interpreter for --dry-run's --print-config (default: python)
#
# --dry-run prints the resolved config and the torchrun command instead of running it.
set -euo pipefail

die() {
  echo "run_local.sh: error: $*" >&2
  exit 2
}

DRY_RUN=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
      exit 0
      ;;
    *) ARGS+=("$arg") ;;
  esac
done
[[ ${#ARGS[@]} -ge 1 ]] || die "expected a CONFIG (usage: run_local.sh [--dry-run] CONFIG [key=value ...])"
CONFIG="${ARGS[0]}"
OVERRIDES=("${ARGS[@]:1}")
[[ -f "$CONFIG" ]] || die "config $CONFIG not found"
for o in "${OVERRIDES[@]}"; do
  [[ "$o" == *=* ]] || die "'$o' is not a key.sub=value override"
done

CMD=(
  torchrun --standalone --nproc-per-node "${NPROC:-auto}"
  -m lov15_megatron.train --config "$CONFIG" "${OVERRIDES[@]}"
)
if [[ $DRY_RUN -eq 1 ]]; then
  "${PYTHON:-python}" -m lov15_megatron.train --config "$CONFIG" --print-config "${OVERRIDES[@]}"
  echo "==== command (dry run: not started) ===="
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
printf '%q ' "${CMD[@]}"
echo
exec "${CMD[@]}"
