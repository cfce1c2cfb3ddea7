#!/usr/bin/env bash
# A single-node Slurm on this machine, for tests/test_slurm.py and for trying the Slurm profile
# by hand (Debian's slurm-wlm and munge; needs root, which CI and the test machines have).
#
#   scripts/slurm_local.sh start [DIR]   # DIR default: $SLURM_LOCAL_DIR or /tmp/refilled-slurm
#   export PATH=DIR/bin:$PATH            # sbatch, srun, squeue, scontrol, sinfo, scancel of this cluster
#                                        # (wrappers that set SLURM_CONF=DIR/slurm.conf)
#   scripts/slurm_local.sh stop [DIR]    # ends exactly the munged, slurmctld and slurmd it started
#   scripts/slurm_local.sh install       # apt-get install slurm-wlm munge (root only)
#
# Everything lives in DIR: the generated slurm.conf and gres.conf, a munge key and socket, the
# controller's state, the daemons' logs and pid files. Nothing under /etc is read or written, and
# another Slurm or munged on this machine is left alone (own ports, own munge socket).
#
# The node: no cgroups (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none), no accounting
# database (so `sacct` does not work: the executor plugin must be told `--slurm-status-command
# squeue`), one partition `gpu` (default). It declares 16 CPUs, 64 GB and two GPUs whatever the
# machine has (SlurmdParameters=config_overrides), so that the repository's Slurm profile
# (workflow/profiles/slurm: cpus_per_gpu 8, mem_mb 32000, one GPU per training job) is accepted
# unchanged; the GPUs are placeholders (DIR/dev/gpu0, gpu1, links to /dev/null), enough for Slurm to hand one to
# each job and set CUDA_VISIBLE_DEVICES, which is what `refilled pin` must respect. With the
# smoke profile the jobs use one real core each. `start` returns once `sinfo` shows the node idle.
set -euo pipefail

cmd=${1:-}
DIR=${2:-${SLURM_LOCAL_DIR:-/tmp/refilled-slurm}}
PORT_CTLD=${SLURM_LOCAL_CTLD_PORT:-16817}
PORT_D=${SLURM_LOCAL_D_PORT:-16818}

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

find_bin() {  # daemons live in /usr/sbin, which a non-login root shell may lack in PATH
  local b
  for b in "$(command -v "$1" 2>/dev/null || true)" "/usr/sbin/$1" "/usr/bin/$1"; do
    [ -n "$b" ] && [ -x "$b" ] && { echo "$b"; return 0; }
  done
  return 1
}

have_slurm() { find_bin slurmctld >/dev/null && find_bin slurmd >/dev/null && find_bin munged >/dev/null \
  && command -v sbatch >/dev/null && command -v sinfo >/dev/null; }

install() {
  have_slurm && return 0
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed and we are not root"
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  have_slurm || die "apt-get install slurm-wlm munge did not provide slurmctld, slurmd, munged, sbatch, sinfo"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {
  [ -d "$DIR" ] || return 0
  local f pid
  # slurmd first (it reports to slurmctld), munged last (both daemons authenticate through it)
  for f in slurmd slurmctld munged; do
    [ -f "$DIR/run/$f.pid" ] || continue
    pid=$(cat "$DIR/run/$f.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/run/$f.pid"
  done
  # what slurmd started and that outlived it (stopped mid-job): slurmstepd and the job's processes
  # of this cluster only (SLURM_CONF=DIR/slurm.conf in their environment, and a job id or
  # slurmstepd's name), never this script or its callers (they may have SLURM_CONF set too)
  local self_and_callers=" $$ " q=$$
  while [ "$q" -gt 1 ] 2>/dev/null; do
    q=$(awk '{print $4}' "/proc/$q/stat" 2>/dev/null || echo 1); self_and_callers+="$q "
  done
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    case "$self_and_callers" in *" $pid "*) continue ;; esac
    grep -qzx "SLURM_CONF=$DIR/slurm.conf" "$p/environ" 2>/dev/null || continue
    if grep -qz "^SLURM_JOB_ID=" "$p/environ" 2>/dev/null || grep -qz "^slurmstepd" "$p/cmdline" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  return 0
}

start() {
  have_slurm || die "Slurm is not installed (run: $0 install, as root)"
  [ "$(id -u)" = 0 ] || die "start needs root (slurmd runs jobs as their submitting user)"
  if pid_alive "$DIR/run/slurmctld.pid"; then
    die "a Slurm started by this script runs already in $DIR (stop it first: $0 stop $DIR)"
  fi
  stop
  rm -rf "$DIR"
  mkdir -p "$DIR"/{run,log,state,spool,munge,dev}
  chmod 700 "$DIR/munge"
  local host cpus
  host=$(hostname -s)
  cpus=16

  # munge: own key, socket and pid file
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge/munge.key"
  "$(find_bin munged)" --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"
  for _ in $(seq 50); do [ -S "$DIR/munge/munge.socket" ] && break; sleep 0.1; done
  [ -S "$DIR/munge/munge.socket" ] || die "munged did not start; see $DIR/log/munged.log"

  # Slurm wants a character device per GPU; links to /dev/null need no mknod
  ln -s /dev/null "$DIR/dev/gpu0"; ln -s /dev/null "$DIR/dev/gpu1"
  cat > "$DIR/gres.conf" <<EOF
# placeholder GPUs (links to /dev/null): Slurm allocates them and sets CUDA_VISIBLE_DEVICES
NodeName=$host Name=gpu File=$DIR/dev/gpu[0-1]
EOF
  cat > "$DIR/slurm.conf" <<EOF
# generated by scripts/slurm_local.sh (a one-node test cluster)
ClusterName=refilled-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT_CTLD
SlurmdPort=$PORT_D
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=64000 Gres=gpu:2 State=UNKNOWN
PartitionName=gpu Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  # Client commands that find this cluster without SLURM_CONF: Snakemake's jobstep plugin drops
  # every SLURM_* variable but a few (SLURM_CONF among them) before it calls `srun` inside a job,
  # and a real cluster's clients read /etc/slurm/slurm.conf instead. Put DIR/bin first in PATH.
  mkdir -p "$DIR/bin"
  local c real
  for c in sbatch srun squeue scontrol sinfo scancel sacct; do
    real=$(find_bin "$c") || continue
    printf '#!/bin/sh\nSLURM_CONF=%s exec %s "$@"\n' "$DIR/slurm.conf" "$real" > "$DIR/bin/$c"
    chmod +x "$DIR/bin/$c"
  done
  export SLURM_CONF="$DIR/slurm.conf"
  "$(find_bin slurmctld)" -f "$SLURM_CONF"
  "$(find_bin slurmd)" -f "$SLURM_CONF"
  local state=""
  for _ in $(seq 300); do
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)
    [ "$state" = idle ] && break
    sleep 0.1
  done
  if [ "$state" != idle ]; then
    echo "node state: ${state:-unknown}; last lines of the logs:" >&2
    tail -n 5 "$DIR"/log/*.log >&2 || true
    stop
    die "the node did not become idle within 30 s"
  fi
  echo "Slurm is up in $DIR (node $host idle); export PATH=$DIR/bin:\$PATH (or SLURM_CONF=$SLURM_CONF)"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  install) install ;;
  *) die "usage: $0 start|stop|install [DIR]" ;;
esac
