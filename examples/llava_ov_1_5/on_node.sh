#!/usr/bin/env bash
# What srun starts on every node of a stage job (see launch.sh): one line naming the node in the
# job log, then torchrun with this node's rank from Slurm (SLURM_NODEID).
#
#   on_node.sh torchrun [torchrun options] -m MODULE [args ...]
set -euo pipefail
: "${SLURM_NODEID:?on_node.sh runs inside srun (SLURM_NODEID is not set)}"
echo "node ${SLURMD_NODENAME:-$(hostname)}: node rank $SLURM_NODEID of ${SLURM_NNODES:-?}," \
  "starting $1"
exec "$1" --node-rank "$SLURM_NODEID" "${@:2}"
