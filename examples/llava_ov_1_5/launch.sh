#!/usr/bin/env bash
# Launch one LLaVA-OV-1.5 training stage on the nodes of the current Slurm job: the one
# parametrised launcher behind stage1_alignment.sbatch, stage1_5_mid_training.sbatch and
# stage2_instruct.sbatch (which only add #SBATCH headers).
#
#   launch.sh [--dry-run] STAGE SIZE [key.sub=value ...]
#
#   STAGE  stage1_alignment | stage1_5_mid_training | stage2_instruct
#   SIZE   4b | 8b | 14b | 30b_a3b -> configs/llava_ov_1_5/SIZE/STAGE.yaml
#          tiny               -> configs/tiny/{stage1,stage1_5,stage2}.yaml (the CPU test model)
#          PATH.yaml          -> that config; checkpoints under its directory's name
#   key.sub=value             extra config overrides, passed to lov15_megatron.train last
#
# Inputs (environment variables; besides these only Slurm's own SLURM_* are read):
#   LOV15_DATA       required: the stage's packed energon dataset (tools/pack_offline.py output)
#                    or a metadataset YAML
#   LOV15_CKPT_ROOT  required: checkpoint root; this stage saves to $LOV15_CKPT_ROOT/NAME/STAGE,
#                    NAME = SIZE (4b, 8b, 14b, 30b_a3b, tiny) or the name of the directory of a config PATH
#   LOV15_PREV_CKPT  the checkpoint this stage starts from (weights only, fresh optimizer).
#                    Default: $LOV15_CKPT_ROOT/SIZE/stage0 for stage 1 (the converted stage-0
#                    checkpoint), else the previous stage's directory. Not needed when the
#                    stage's own directory already holds a checkpoint: the run then resumes.
#   LOV15_CONTAINER  optional: container image for srun (pyxis --container-image); with
#                    LOV15_CONTAINER_MOUNTS (optional, srun --container-mounts syntax)
#   MASTER_PORT      optional rendezvous port (default: 20000 + job id mod 20000)
#   PYTHON           optional: interpreter for the pre-flight checks (default: python)
#
# Ranks per node = the GPUs per node the job asked for (sbatch --gpus-per-node, 8 in the stage
# scripts; SLURM_GPUS_PER_NODE, else SLURM_GPUS_ON_NODE, else 8); on CPU nodes
# (runtime.device: cpu, gloo) the same number of CPU processes.
#
# --dry-run prints the resolved config and the exact srun/torchrun command instead of running
# them; outside a Slurm job the Slurm-derived values are shown as placeholders.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}
die() {
  echo "launch.sh: error: $*" >&2
  exit 2
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python}"

DRY_RUN=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) ARGS+=("$arg") ;;
  esac
done
if [[ ${#ARGS[@]} -lt 2 ]]; then
  usage >&2
  die "expected STAGE and SIZE (4b, 8b, 14b, 30b_a3b, tiny or a config .yaml), got: ${ARGS[*]:-nothing}"
fi
STAGE="${ARGS[0]}"
SIZE="${ARGS[1]}"
OVERRIDES=("${ARGS[@]:2}")

case "$STAGE" in
  stage1_alignment) PREV_STAGE=stage0 TINY=stage1 ;;
  stage1_5_mid_training) PREV_STAGE=stage1_alignment TINY=stage1_5 ;;
  stage2_instruct) PREV_STAGE=stage1_5_mid_training TINY=stage2 ;;
  *) die "unknown STAGE '$STAGE'; expected stage1_alignment, stage1_5_mid_training" \
    "or stage2_instruct" ;;
esac
case "$SIZE" in
  4b | 8b | 14b | 30b_a3b) CONFIG="$REPO/configs/llava_ov_1_5/$SIZE/$STAGE.yaml" NAME="$SIZE" ;;
  tiny) CONFIG="$REPO/configs/tiny/$TINY.yaml" NAME=tiny ;;
  *.yaml | *.yml)
    [[ -f "$SIZE" ]] || die "config $SIZE not found"
    CONFIG="$(cd "$(dirname "$SIZE")" && pwd)/$(basename "$SIZE")"
    NAME="$(basename "$(dirname "$CONFIG")")"
    ;;
  *) die "unknown SIZE '$SIZE'; expected 4b, 8b, 14b, 30b_a3b, tiny or a config .yaml" ;;
esac
for o in "${OVERRIDES[@]}"; do
  [[ "$o" == *=* ]] || die "'$o' is not a key.sub=value override"
done
[[ -f "$CONFIG" ]] || die "config $CONFIG not found"

# ---- inputs ---------------------------------------------------------------------------------
[[ -n "${LOV15_DATA:-}" ]] || die "LOV15_DATA is not set: point it at the packed energon" \
  "dataset for $STAGE (the output directory of tools/pack_offline.py, or a metadataset YAML)"
[[ -e "$LOV15_DATA" ]] || die "LOV15_DATA=$LOV15_DATA does not exist"
[[ -n "${LOV15_CKPT_ROOT:-}" ]] || die "LOV15_CKPT_ROOT is not set: point it at the directory" \
  "that holds the checkpoints of all stages (this stage saves to \$LOV15_CKPT_ROOT/$NAME/$STAGE)"
SAVE="$LOV15_CKPT_ROOT/$NAME/$STAGE"
PREV="${LOV15_PREV_CKPT:-$LOV15_CKPT_ROOT/$NAME/$PREV_STAGE}"
if [[ -f "$SAVE/latest_checkpointed_iteration.txt" ]]; then
  START="resume: $SAVE holds iteration $(cat "$SAVE/latest_checkpointed_iteration.txt")"
  START+=" (model, optimizer, scheduler, RNG and data position restored)"
elif [[ -d "$PREV" ]]; then
  START="start: weights only from $PREV (fresh optimizer, iteration 0)"
else
  if [[ "$PREV_STAGE" == stage0 ]]; then
    what="the stage-0 checkpoint converted to Megatron (tools/convert_checkpoint.py"
    what+=" hf-to-mcore --model llava-ov-1.5 --hf-dir STAGE0_HF --save-dir $PREV)"
  else
    what="the checkpoint directory of $PREV_STAGE"
  fi
  msg="the checkpoint to start from, $PREV, does not exist: set LOV15_PREV_CKPT to $what"
  [[ $DRY_RUN -eq 1 ]] || die "$msg"
  echo "launch.sh: warning (a real run stops here): $msg" >&2
  START="start: weights only from $PREV (fresh optimizer, iteration 0) -- not there yet"
fi

TRAIN_ARGS=(
  -m lov15_megatron.train --config "$CONFIG"
  "data.path=$LOV15_DATA"
  "checkpoint.save=$SAVE"
  "checkpoint.pretrained=$PREV"
  "logging.tensorboard_dir=$SAVE/tensorboard"
  "${OVERRIDES[@]}"
)

# ---- the Slurm job ----------------------------------------------------------------------------
IN_SLURM=0
if [[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  IN_SLURM=1
  NNODES="${SLURM_NNODES:?SLURM_NNODES is not set inside the Slurm job}"
  # what the job asked for (sbatch --gpus-per-node=[type:]K), not what --exclusive gave it
  NPROC="${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
  NPROC="${NPROC##*:}"
  [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "cannot read the GPUs per node from" \
    "SLURM_GPUS_PER_NODE='${SLURM_GPUS_PER_NODE:-}' (expected [type:]count)"
  # The first host of the job (= `scontrol show hostnames ... | head -n1`, without the SIGPIPE
  # that `head` can cause under pipefail).
  HOSTS="$(scontrol show hostnames "$SLURM_JOB_NODELIST")" ||
    die "scontrol show hostnames '$SLURM_JOB_NODELIST' failed"
  MASTER_ADDR="${HOSTS%%$'\n'*}"
  [[ -n "$MASTER_ADDR" ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' returned no host"
  MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
  CPUS="${SLURM_CPUS_PER_TASK:-}"
elif [[ $DRY_RUN -eq 1 ]]; then
  # shellcheck disable=SC2016  # placeholders, expanded inside the job
  NNODES='$SLURM_NNODES' NPROC='$SLURM_GPUS_PER_NODE' MASTER_ADDR='$MASTER_ADDR'
  # shellcheck disable=SC2016
  MASTER_PORT='$MASTER_PORT' CPUS='$SLURM_CPUS_PER_TASK'
else
  die "not inside a Slurm job (SLURM_JOB_ID/SLURM_JOB_NODELIST unset): submit with" \
    "sbatch examples/llava_ov_1_5/$STAGE.sbatch $SIZE, or use scripts/run_local.sh on one node"
fi

# torchrun forwards Slurm's SIGTERM (sbatch --signal) to the ranks and SIGKILLs them after this
# many seconds (default 30): leave time to write a checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-540}"
SRUN=(srun --ntasks-per-node=1 --kill-on-bad-exit=1)
[[ -n "$CPUS" ]] && SRUN+=("--cpus-per-task=$CPUS") # newer Slurm: srun does not inherit it
if [[ -n "${LOV15_CONTAINER:-}" ]]; then
  SRUN+=("--container-image=$LOV15_CONTAINER" "--container-workdir=$REPO")
  SRUN+=("--container-mounts=${LOV15_CONTAINER_MOUNTS:-$REPO:$REPO}")
fi
# Node rank, node count and rendezvous address come from Slurm: on_node.sh adds each node's
# --node-rank (SLURM_NODEID); node 0 (the first host of the job) hosts the rendezvous.
CMD=(
  "${SRUN[@]}" bash "$REPO/examples/llava_ov_1_5/on_node.sh"
  torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC"
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
  "${TRAIN_ARGS[@]}"
)

# ---- pre-flight: the config resolves, and its layout fits the allocation ------------------------
preflight() { # world size (or empty)
  local rc=0
  "$PYTHON" - "$1" "$DRY_RUN" "$CONFIG" "${TRAIN_ARGS[@]:4}" <<'PY' || rc=$?
import importlib.util
import sys

try:
    from lov15_megatron.config import ConfigError, load_config, validate_world_size
except ImportError as e:
    print(f"launch.sh: {sys.executable} cannot import lov15_megatron ({e})", file=sys.stderr)
    sys.exit(3)

world, dry_run, config, overrides = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4:]
try:
    cfg = load_config(config, overrides)
    if world:
        dp = validate_world_size(cfg, int(world))
        n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
        p = cfg.parallel
        print(f"layout: world {world} = TP {p.tensor_model_parallel_size} x PP "
              f"{p.pipeline_model_parallel_size} x CP {p.context_parallel_size} x DP {dp}; "
              f"{n_micro} micro-batch(es) per rank per step")
    if cfg.logging.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        what = "warning (a real run stops here)" if dry_run else "error"
        print(f"launch.sh: {what}: logging.tensorboard_dir: TensorBoard is not installed in "
              f"{sys.executable}'s environment: pip install tensorboard, or pass "
              "logging.tensorboard_dir=null", file=sys.stderr)
        if not dry_run:
            sys.exit(2)
except ConfigError as e:
    print(f"launch.sh: error: {e}", file=sys.stderr)
    sys.exit(2)
PY
  if [[ $rc -eq 3 && -n "${LOV15_CONTAINER:-}" && $DRY_RUN -eq 0 ]]; then
    echo "pre-flight skipped: the container checks the config when it starts"
  elif [[ $rc -eq 3 ]]; then
    die "activate the environment that has lov15_megatron installed, or set PYTHON to its python"
  elif [[ $rc -ne 0 ]]; then
    exit "$rc"
  fi
}
WORLD=""
[[ $IN_SLURM -eq 1 ]] && WORLD=$((NNODES * NPROC))

echo "==== llava-ov-1.5 $NAME $STAGE ===="
echo "config: $CONFIG"
echo "$START"
echo "checkpoints: $SAVE   tensorboard: $SAVE/tensorboard"
preflight "$WORLD"
if [[ $DRY_RUN -eq 1 ]]; then
  "$PYTHON" "${TRAIN_ARGS[@]}" --print-config
  echo "==== command (dry run: not started) ===="
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
mkdir -p "$SAVE"
cd "$REPO"
printf '%q ' "${CMD[@]}"
echo
STARTED=$(date +%s)
# srun runs in the background so that this shell outlives a SIGTERM sent to the whole job (a
# preemption): it passes the signal on, waits for the checkpoint and reports how the run ended.
"${CMD[@]}" &
SRUN_PID=$!
trap 'kill -TERM "$SRUN_PID" 2>/dev/null || true' TERM
RC=0
wait "$SRUN_PID" || RC=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do # wait was interrupted by the trapped signal
  RC=0
  wait "$SRUN_PID" || RC=$?
done
LATEST="none"
[[ -f "$SAVE/latest_checkpointed_iteration.txt" ]] &&
  LATEST="iteration $(cat "$SAVE/latest_checkpointed_iteration.txt")"
SUMMARY="$SAVE/train_summary.json"
if [[ -f "$SUMMARY" && $(stat -c %Y "$SUMMARY") -ge $STARTED ]] &&
  grep -q '"stopped_by_signal": true' "$SUMMARY"; then
  # torchrun itself exits 1 after passing SIGTERM on; the ranks saved and stopped cleanly. Not
  # 0 either way: the stage is not finished, and an afterok dependency must not start the next.
  echo "==== $STAGE stopped by SIGTERM (preemption or time limit): checkpoint $LATEST saved in" \
    "$SAVE; submit the same command again to resume (exit status 75) ===="
  exit 75
elif [[ $RC -eq 0 ]]; then
  echo "==== $STAGE finished: last checkpoint $LATEST in $SAVE ===="
else
  # torchrun's first "Root Cause" block in the job log names the rank that failed first
  LOG="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.*StdOut=\([^ ]*\).*/\1/p')"
  FIRST=""
  [[ -f "$LOG" ]] && FIRST="$(awk '/Root Cause/ { rc = 1 } rc && $1 == "rank" { rank = $3 }
    rc && $1 == "exitcode" { sub(/^ *exitcode *: */, ""); gsub(/  +/, " ")
      print "rank " rank " (exit code " $0 ")"; exit }' "$LOG")"
  echo "launch.sh: error: $STAGE failed (srun exit status $RC): first failed" \
    "${FIRST:-rank: see the srun and torchrun messages above}; the last complete checkpoint is" \
    "$LATEST in $SAVE, from which the same command resumes" >&2
  exit "$RC"
fi
