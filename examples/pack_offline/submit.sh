#!/usr/bin/env bash
# Pack a large corpus on a Slurm cluster: measure (job array) -> plan -> write (job array) ->
# finalise, each job starting when the previous one succeeded (afterok).
#
#   bash examples/pack_offline/submit.sh [--dry-run] TASKS -- PACK_OFFLINE_ARGS...
#   bash examples/pack_offline/submit.sh 64 -- --input /data/mid-85m --output /data/packed/s15 \
#       --tokenizer /ckpt/qwen3-4b --kind caption --seq-len 8192
#
# TASKS: elements of the measure and write arrays. A failed or killed element: resubmit it alone
# with the same arguments (sbatch --array=I examples/pack_offline/pack_phase.sbatch --phase
# measure --num-tasks TASKS ARGS), then the jobs after it; finished work is kept.
# Extra sbatch options for every job: $SBATCH_ARGS (e.g. "--partition=cpu --account=me"),
# given last, so they win over the options this script and pack_phase.sbatch set.
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ || "$2" != "--" ]]; then
  echo "submit.sh: error: usage: submit.sh [--dry-run] TASKS -- PACK_OFFLINE_ARGS..." >&2
  exit 2
fi
tasks=$1
shift 2
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
job="$here/pack_phase.sbatch"
read -r -a extra <<<"${SBATCH_ARGS:-}"
submit() {  # submit NAME [sbatch options] -- [pack_offline options]; prints the job id
  local name=$1 options=()
  shift
  while [[ "$1" != "--" ]]; do
    options+=("$1")
    shift
  done
  shift
  if ((dry_run)); then
    echo "sbatch --parsable ${options[*]} ${extra[*]} $job $* $(printf '%q ' "${args[@]}")" >&2
    echo "<$name-job-id>"
  else
    sbatch --parsable "${options[@]}" "${extra[@]}" "$job" "$@" "${args[@]}"
  fi
}

args=("$@")
last=$((tasks - 1))
measure=$(submit measure --array="0-$last" -- --phase measure --num-tasks "$tasks")
plan=$(submit plan --dependency="afterok:$measure" --cpus-per-task=2 -- --phase plan)
write=$(submit write --array="0-$last" --dependency="afterok:$plan" -- --phase write --num-tasks "$tasks")
final=$(submit finalise --dependency="afterok:$write" -- --phase finalise)
echo "measure $measure  plan $plan  write $write  finalise $final"
