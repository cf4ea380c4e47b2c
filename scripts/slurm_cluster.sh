#!/usr/bin/env bash
# A throw-away Slurm cluster on this machine: one controller and N node daemons (slurmd -N),
# for running the stage scripts through real sbatch/srun (tests/test_slurm.py) without a cluster.
#
#   scripts/slurm_cluster.sh up [--nodes N] [--cpus C] [--gpus G] [--dir DIR]
#   scripts/slurm_cluster.sh status [--dir DIR]
#   scripts/slurm_cluster.sh down [--dir DIR]
#
#   --nodes N   node daemons n1..nN (default 2)
#   --cpus C    CPUs each node declares (default 1)
#   --gpus G    GPUs each node declares (default 8; devices linked to /dev/null), so that the stage
#               scripts' #SBATCH --gpus-per-node=8 is accepted on GPU-less nodes; a job's
#               --gpus-per-node=K is how many ranks per node launch.sh starts
#   --dir DIR   everything the cluster writes: config, munge key and socket, controller state,
#               spool, logs, pid files (default: $LOV15_SLURM_DIR, else /tmp/lov15-slurm)
#
# Needs root (Debian/Ubuntu: installs slurmctld, slurmd, slurm-client and munge with apt-get if
# they are missing). `up` starts its own munged on its own socket and key, the controller and
# the node daemons, adds the node names to /etc/hosts (one marked line) and waits until every
# node is idle. Use the cluster with SLURM_CONF=DIR/slurm.conf (printed by `up`). `down`
# cancels the cluster's jobs, stops exactly the daemons `up` started (by their pid files) and
# any process a job left behind (found by its SLURM_CONF and SLURM_JOB_ID), removes the
# /etc/hosts line and keeps DIR/log for inspection; the next `up` wipes DIR.
set -euo pipefail

die() {
  echo "slurm_cluster.sh: error: $*" >&2
  exit 2
}
usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

ACTION="${1:-}"
[[ $# -gt 0 ]] && shift
NODES=2
CPUS=1
GPUS=8
DIR="${LOV15_SLURM_DIR:-/tmp/lov15-slurm}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="${2:?--nodes needs a value}"; shift 2 ;;
    --cpus) CPUS="${2:?--cpus needs a value}"; shift 2 ;;
    --gpus) GPUS="${2:?--gpus needs a value}"; shift 2 ;;
    --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
for pair in "--nodes:$NODES" "--cpus:$CPUS" "--gpus:$GPUS"; do
  [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || die "${pair%%:*}: expected a positive integer, got '${pair#*:}'"
done
[[ "$DIR" == /* ]] || die "--dir: expected an absolute path, got '$DIR'"

CONF="$DIR/slurm.conf"
SOCKET="$DIR/munge/munge.socket"
HOSTS_MARK="# lov15-slurm-test $DIR"
CTLD_PORT=16817
NODE_PORT0=17000
export SLURM_CONF="$CONF"

alive() { # pid file -> 0 if its process runs
  [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_names() { # the node names of the running configuration
  sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF"
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  [[ ${#missing[@]} -eq 0 ]] && return
  command -v apt-get >/dev/null ||
    die "missing ${missing[*]} and no apt-get: install Slurm (slurmctld, slurmd, client) and munge"
  local t0=$SECONDS
  echo "[slurm] installing ${missing[*]} (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge \
    >/dev/null
  echo "[slurm] installed in $((SECONDS - t0)) s"
}

write_config() {
  local host nodes=() i
  host="$(hostname)"
  for ((i = 1; i <= NODES; i++)); do nodes+=("n$i"); done
  local list
  list="$(IFS=,; echo "${nodes[*]}")"
  {
    echo "# Written by scripts/slurm_cluster.sh: a throw-away test cluster on $host."
    echo "ClusterName=lov15-test"
    echo "SlurmctldHost=$host"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "AuthInfo=socket=$SOCKET"
    echo "StateSaveLocation=$DIR/state"
    echo "SlurmdSpoolDir=$DIR/spool/%n"
    echo "SlurmctldPidFile=$DIR/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/slurmd-%n.pid"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
    echo "SlurmctldPort=$CTLD_PORT"
    # no cgroups (they need not work inside a container); linuxproc tracks a job's processes
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "GresTypes=gpu"
    echo "MpiDefault=none"
    echo "ReturnToService=2"
    # the declared CPUs/GPUs count, whatever the hardware has
    echo "SlurmdParameters=config_overrides"
    # after a job's first SIGTERM, SIGKILL what is left this many seconds later
    echo "KillWait=10"
    echo "SchedulerParameters=sched_interval=2"
    # sbatch --wait polls every 2 s with MinJobAge <= 4 (with the default 300 it backs off to
    # 32 s between polls); finished jobs are forgotten 4 s after they end
    echo "MinJobAge=4"
    for ((i = 1; i <= NODES; i++)); do
      echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((NODE_PORT0 + i))" \
        "CPUs=$CPUS Gres=gpu:$GPUS State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$list Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
  # GPU-less nodes: Slurm counts GPUs only with device files (a File-less gpu GRES reports 0
  # and drains the node), so each node's "GPUs" are links to /dev/null
  mkdir -p "$DIR/dev"
  for ((i = 0; i < GPUS; i++)); do ln -s /dev/null "$DIR/dev/gpu$i"; done
  echo "NodeName=$list Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]" >"$DIR/gres.conf"
}

start_munge() {
  mkdir -p "$DIR/munge"
  chmod 700 "$DIR/munge"
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge/munge.key"
  munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed"
  munge -S "$SOCKET" -n | unmunge -S "$SOCKET" >/dev/null ||
    die "munged does not answer on $SOCKET (see $DIR/log/munged.log)"
}

add_hosts() { # the node names resolve to this machine (the launcher's MASTER_ADDR is one)
  remove_hosts
  echo "127.0.0.1 $(node_names | tr '\n' ' ')$HOSTS_MARK" >>/etc/hosts
}

remove_hosts() { # rewrite in place: /etc/hosts may be a bind mount that cannot be replaced
  if grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
    local kept
    kept="$(grep -vF "$HOSTS_MARK" /etc/hosts)"
    printf '%s\n' "$kept" >/etc/hosts
  fi
}

wait_idle() {
  local deadline=$((SECONDS + 60)) states
  while true; do
    states="$(sinfo -h -N -o '%t' 2>/dev/null | sort -u | tr '\n' ' ')"
    [[ "$states" == "idle " ]] && return
    if [[ $SECONDS -ge $deadline ]]; then
      tail -n 20 "$DIR"/log/*.log >&2 || true
      die "nodes not idle after 60 s (states: ${states:-none}); logs above and in $DIR/log"
    fi
    sleep 1
  done
}

up() {
  [[ $EUID -eq 0 ]] || die "run as root (it starts munged, slurmctld and slurmd)"
  if alive "$DIR/slurmctld.pid"; then
    echo "[slurm] already up ($CONF)"
    status
    return
  fi
  local t0=$SECONDS
  install_packages
  rm -rf "$DIR"
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  write_config
  start_munge
  add_hosts
  slurmctld -f "$CONF"
  local node
  for node in $(node_names); do
    mkdir -p "$DIR/spool/$node"
    slurmd -f "$CONF" -N "$node"
  done
  wait_idle
  echo "[slurm] up in $((SECONDS - t0)) s: $NODES nodes x $CPUS CPU(s), $GPUS GPU(s) declared" \
    "each; partition debug"
  sinfo -N -o '%N %t %c %G'
  echo "[slurm] use it with: export SLURM_CONF=$CONF   (stop: scripts/slurm_cluster.sh down)"
}

status() {
  if ! alive "$DIR/slurmctld.pid"; then
    echo "[slurm] not running (no live slurmctld for $DIR; start: scripts/slurm_cluster.sh up)"
    return 1
  fi
  echo "[slurm] config $CONF"
  sinfo -N -o '%N %t %c %G'
  squeue
}

stop_pidfile() { # TERM, then KILL after 10 s
  local file="$1" pid i
  alive "$file" || return 0
  pid="$(cat "$file")"
  kill "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
}

kill_job_leftovers() { # processes of the cluster's jobs that outlived them
  # proctrack/linuxproc follows a job's processes by parentage, so a child orphaned by a killed
  # rank (e.g. a multiprocessing manager) escapes it; proctrack/cgroup on a real cluster does not
  local p env pids=()
  for p in /proc/[0-9]*; do
    env="$({ tr '\0' '\n' <"$p/environ"; } 2>/dev/null)" || continue
    if grep -qxF "SLURM_CONF=$CONF" <<<"$env" && grep -q '^SLURM_JOB_ID=' <<<"$env"; then
      pids+=("${p#/proc/}")
    fi
  done
  [[ ${#pids[@]} -eq 0 ]] && return
  echo "[slurm] stopping ${#pids[@]} process(es) left behind by the cluster's jobs"
  kill "${pids[@]}" 2>/dev/null || true
  sleep 1
  kill -9 "${pids[@]}" 2>/dev/null || true
}

down() {
  [[ -d "$DIR" ]] || { echo "[slurm] nothing to stop ($DIR does not exist)"; return; }
  if alive "$DIR/slurmctld.pid"; then
    scancel --full --signal=KILL --state=RUNNING --user=root 2>/dev/null || true
    scancel --user=root 2>/dev/null || true
    local i
    for ((i = 0; i < 50; i++)); do
      [[ -z "$(squeue -h 2>/dev/null)" ]] && break
      sleep 0.2
    done
  fi
  local file
  for file in "$DIR"/slurmd-*.pid; do
    [[ -e "$file" ]] && stop_pidfile "$file"
  done
  stop_pidfile "$DIR/slurmctld.pid"
  stop_pidfile "$DIR/munged.pid"
  kill_job_leftovers
  remove_hosts
  echo "[slurm] down (logs kept in $DIR/log)"
}

case "$ACTION" in
  up) up ;;
  down) down ;;
  status) status ;;
  -h | --help) usage ;;
  *) usage >&2; die "expected up, down or status, got '${ACTION:-nothing}'" ;;
esac
