#!/usr/bin/env bash
# Launch one training stage on the nodes of the current Slurm allocation (or print what it would
# run with --dry-run). The per-stage *.sbatch files call this; it can also be run inside salloc.
#
#   examples/llava_ov_1_5/launch.sh CONFIG [--dry-run] [key.sub=value ...]
#
# Paths come from the environment (nothing is hard-coded):
#   LOV15_DATA        energon dataset dir or metadataset YAML for this stage   (required)
#   LOV15_SAVE        checkpoint dir of this stage; resumes from it if it holds one (required)
#   LOV15_PRETRAINED  checkpoint to start from, weights only: the previous stage's LOV15_SAVE, or
#                     the converted stage-0 for stage 1 (required unless LOV15_SAVE holds a
#                     checkpoint to resume)
#   LOV15_TOKENIZER   HF tokenizer dir (default: qwen-offline, the bundled Qwen vocabulary)
#   LOV15_REPO        this repository (default: $SLURM_SUBMIT_DIR, else the current dir)
#   LOV15_CONTAINER   optional container image for srun --container-image (pyxis)
#   GPUS_PER_NODE     default 8; MASTER_PORT default 29500
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }
[[ $# -ge 1 ]] || die "usage: launch.sh CONFIG [--dry-run] [key.sub=value ...]"
CONFIG="$1"; shift
DRY_RUN=0
ARGS=()
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$arg"); fi
done

REPO="${LOV15_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "$REPO" || die "LOV15_REPO=$REPO is not a directory"
[[ -f "$CONFIG" ]] || die "config $CONFIG not found (relative to LOV15_REPO=$REPO)"
[[ -n "${LOV15_DATA:-}" ]] || die "LOV15_DATA is not set: point it at the packed energon dataset (tools/pack_offline.py --output) or a metadataset YAML"
[[ -n "${LOV15_SAVE:-}" ]] || die "LOV15_SAVE is not set: the checkpoint directory of this stage"
if [[ ! -f "$LOV15_SAVE/latest_checkpointed_iteration.txt" && -z "${LOV15_PRETRAINED:-}" ]]; then
  die "LOV15_PRETRAINED is not set and $LOV15_SAVE holds no checkpoint to resume: set it to the previous stage's checkpoint (stage 1: the converted stage-0)"
fi
[[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "not inside a Slurm allocation (SLURM_JOB_NODELIST unset); use scripts/run_local.sh on one node"

NNODES="${SLURM_NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-29500}"
OVERRIDES=("data.path=$LOV15_DATA" "checkpoint.save=$LOV15_SAVE"
           "data.tokenizer=${LOV15_TOKENIZER:-qwen-offline}")
[[ -n "${LOV15_PRETRAINED:-}" ]] && OVERRIDES+=("checkpoint.pretrained=$LOV15_PRETRAINED")
OVERRIDES+=("${ARGS[@]}")

SRUN=(srun --nodes "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1)
[[ -n "${LOV15_CONTAINER:-}" ]] && SRUN+=(--container-image "$LOV15_CONTAINER" --container-mounts "$REPO:$REPO" --container-workdir "$REPO")
CMD=("${SRUN[@]}" python -m torch.distributed.run
     --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
     --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${SLURM_JOB_ID:-0}"
     -m lov15_megatron.train --config "$CONFIG" "${OVERRIDES[@]}")

if [[ $DRY_RUN == 1 ]]; then
  python -m lov15_megatron.train --config "$CONFIG" --print-config "${OVERRIDES[@]}"
  echo "launch command:"
  printf ' %q' "${CMD[@]}"; echo
  exit 0
fi
mkdir -p "$LOV15_SAVE"
echo "[launch] $(date -Is) job ${SLURM_JOB_ID:-?} on $NNODES node(s) x $GPUS_PER_NODE GPU(s), master $MASTER_ADDR:$MASTER_PORT"
exec "${CMD[@]}"
