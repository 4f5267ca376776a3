#!/usr/bin/env bash
# slurm_ci.sh - bring a REAL Slurm cluster (Debian bookworm slurm-wlm 22.05 + munge)
# up on localhost for CI, fake N compute nodes on one machine, and tear it down.
#
#   bash slurm_ci.sh up            # install (if needed), start munged, slurmctld, N x slurmd
#   bash slurm_ci.sh smoke         # sbatch a 2-task job and check its output
#   bash slurm_ci.sh wait JOBID    # block until JOBID ends; exit 0 iff COMPLETED with 0:0
#   bash slurm_ci.sh status
#   bash slurm_ci.sh down          # cancel jobs, stop daemons started by `up` (by PID)
#
# After `up`:  source "$SLURM_CI_ROOT/env.sh"   (exports SLURM_CONF)
#
# Knobs (env): SLURM_CI_ROOT (/tmp/slurm-ci), SLURM_CI_NODES (2), SLURM_CI_CPUS (nproc),
#   SLURM_CI_PORT (6817: slurmctld; slurmd i uses PORT+i), SLURM_CI_MPI (1: also install
#   openmpi-bin libopenmpi-dev, which brings libpmix2 for `srun --mpi=pmix`).
#
# Sandbox notes: no systemd (daemons are started directly, as root, SlurmUser=root);
# no cgroups used (proctrack/linuxproc, task/none); apt's policy-rc.d keeps postinst from
# starting services. Node names ci-node1..N resolve to 127.0.0.1 through a marked
# /etc/hosts line (removed by `down`); slurmd i listens on its own port (NodeName Port=).
set -euo pipefail

ROOT=${SLURM_CI_ROOT:-/tmp/slurm-ci}
NODES=${SLURM_CI_NODES:-2}
CPUS=${SLURM_CI_CPUS:-$(nproc)}
PORT=${SLURM_CI_PORT:-6817}
WANT_MPI=${SLURM_CI_MPI:-1}
CONF=$ROOT/etc/slurm.conf
HOSTS_TAG="# slurm-ci-fake-nodes"
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

log() { printf '[slurm_ci %(%T)T] %s\n' -1 "$*" >&2; }
node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "ci-node$i"; done; }

install_pkgs() {
  local pkgs=()
  for b in slurmctld slurmd sbatch munged; do command -v "$b" >/dev/null || { pkgs+=(slurmctld slurmd slurm-client munge); break; }; done
  local mpi=()
  if [[ $WANT_MPI == 1 ]] && ! command -v mpirun >/dev/null; then mpi=(openmpi-bin libopenmpi-dev); fi
  if ((${#pkgs[@]} + ${#mpi[@]})); then
    log "apt-get install ${pkgs[*]} ${mpi[*]}"
    apt-get update -qq
    export DEBIAN_FRONTEND=noninteractive
    # OpenMPI first: it brings libpmix2, which slurmd's mpi/pmix plugin needs at slurmd start.
    # (installed with Recommends, as tested: ~25 MB, ~11 s)
    if ((${#mpi[@]})); then apt-get install -y -qq "${mpi[@]}" >/dev/null; fi
    if ((${#pkgs[@]})); then apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; fi
  fi
  return 0
}

start_munge() {
  if [[ ! -s /etc/munge/munge.key ]]; then
    install -d -o munge -g munge -m 700 /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running; reusing it"; return
  fi
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null
  cat /run/munge/munged.pid > "$ROOT/state/munged.pid.ours"   # down stops it only if we started it
  log "munged started (pid $(cat /run/munge/munged.pid))"
}

write_conf() {
  local host; host=$(hostname -s)
  mkdir -p "$ROOT"/{etc,log,state/ctld,state/spool,tmp}
  cat > "$CONF" <<EOF
# written by slurm_ci.sh
ClusterName=ci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=${PORT}
SlurmdPort=$((PORT + 1))
StateSaveLocation=${ROOT}/state/ctld
SlurmdSpoolDir=${ROOT}/state/spool/%n
SlurmctldPidFile=${ROOT}/state/slurmctld.pid
SlurmdPidFile=${ROOT}/state/slurmd-%n.pid
SlurmctldLogFile=${ROOT}/log/slurmctld.log
SlurmdLogFile=${ROOT}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
DebugFlags=NO_CONF_HASH
TmpFS=${ROOT}/tmp/shared
EOF
  local i
  for ((i = 1; i <= NODES; i++)); do
    echo "NodeName=ci-node$i NodeHostname=${host} NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=${CPUS} State=UNKNOWN" >> "$CONF"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >> "$CONF"
  # Per-node copy differing only in TmpFS: the mpi/pmix plugin puts spmix_appdir_<uid>_<job>.<step>
  # under TmpFS, and two fake nodes on one host would collide on it ("File exists").
  for n in $(node_names); do
    mkdir -p "$ROOT/etc/$n" "$ROOT/tmp/$n"
    sed "s#^TmpFS=.*#TmpFS=${ROOT}/tmp/$n#" "$CONF" > "$ROOT/etc/$n/slurm.conf"
  done
  mkdir -p "$ROOT/tmp/shared"
  echo "export SLURM_CONF=$CONF" > "$ROOT/env.sh"
}

hosts_add() {
  sed -i "/${HOSTS_TAG}\$/d" /etc/hosts 2>/dev/null || true
  echo "127.0.0.1 $(node_names | tr '\n' ' ') ${HOSTS_TAG}" >> /etc/hosts
}
hosts_del() { sed -i "/${HOSTS_TAG}\$/d" /etc/hosts 2>/dev/null || true; }

pid_alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

stop_pidfile() {  # stop the daemon whose pid is in file $1, wait, then SIGKILL
  local f=$1 pid
  [[ -f $f ]] || return 0
  pid=$(cat "$f"); rm -f "$f"
  pid_alive "$pid" || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do pid_alive "$pid" || break; sleep 0.1; done
  pid_alive "$pid" && kill -9 "$pid" 2>/dev/null || true
  echo "$pid"
}

cmd_up() {
  local t0=$SECONDS
  install_pkgs
  cmd_down quiet || true
  rm -rf "$ROOT/state" "$ROOT/log" "$ROOT/tmp"
  mkdir -p "$ROOT/state"
  start_munge
  write_conf
  hosts_add
  export SLURM_CONF=$CONF
  # absolute -f paths: a relative one makes batch launches hang 60 s, then "launch failed requeued held"
  /usr/sbin/slurmctld -f "$CONF"
  for n in $(node_names); do /usr/sbin/slurmd -f "$ROOT/etc/$n/slurm.conf" -N "$n"; done
  local want=$NODES idle=0
  for _ in $(seq 600); do
    idle=$(sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2=="idle"' | sort -u | wc -l)
    ((idle >= want)) && break
    sleep 0.1
  done
  if ((idle < want)); then
    log "nodes not idle after 60 s"; sinfo -N >&2 || true
    tail -n 20 "$ROOT"/log/*.log >&2 || true
    return 1
  fi
  log "up: $NODES node(s) idle in $((SECONDS - t0)) s; source $ROOT/env.sh"
  sinfo -N >&2
}

cmd_down() {
  local quiet=${1:-}
  export SLURM_CONF=$CONF
  if [[ -f $ROOT/state/slurmctld.pid ]] && pid_alive "$(cat "$ROOT/state/slurmctld.pid")"; then
    scancel --quiet --user=root 2>/dev/null || true
    for _ in $(seq 50); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.2; done
  fi
  local stopped=() p f
  for f in "$ROOT"/state/slurmd-*.pid "$ROOT/state/slurmctld.pid"; do
    [[ -e $f ]] || continue
    p=$(stop_pidfile "$f"); [[ -n $p ]] && stopped+=("$p")
  done
  if [[ -f $ROOT/state/munged.pid.ours ]]; then
    p=$(stop_pidfile "$ROOT/state/munged.pid.ours"); [[ -n $p ]] && stopped+=("$p")
  fi
  hosts_del
  [[ -z $quiet ]] && log "down: stopped pids: ${stopped[*]:-none}"
  return 0
}

# wait JOBID [timeout_s]: poll (sbatch --wait backs off to 10-30 s polls; this polls at 0.5 s)
cmd_wait() {
  local jid=$1 timeout=${2:-600} st="" t0=$SECONDS
  export SLURM_CONF=$CONF
  while ((SECONDS - t0 < timeout)); do
    st=$(scontrol show job -o "$jid" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
    case $st in
      PENDING|CONFIGURING|RUNNING|COMPLETING|SUSPENDED|REQUEUED|"") sleep 0.5 ;;
      *) break ;;
    esac
  done
  local line; line=$(scontrol show job -o "$jid" 2>/dev/null)
  local ec; ec=$(grep -o ' ExitCode=[0-9:]*' <<<"$line" | cut -d= -f2)
  log "job $jid: state=$st exit=$ec after $((SECONDS - t0)) s"
  [[ $st == COMPLETED && $ec == 0:0 ]]
}

cmd_smoke() {
  export SLURM_CONF=$CONF
  local d=$ROOT/smoke; mkdir -p "$d"
  cat > "$d/job.sbatch" <<'EOF'
#!/bin/bash
#SBATCH --job-name=smoke
#SBATCH --ntasks=2
#SBATCH --time=00:02:00
set -euo pipefail
echo "nodelist=$SLURM_JOB_NODELIST hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd,)"
srun bash -c 'echo "task $SLURM_PROCID/$SLURM_NTASKS local=$SLURM_LOCALID node=$SLURMD_NODENAME"'
EOF
  local jid; jid=$(sbatch --parsable --output="$d/smoke-%j.out" "$d/job.sbatch")
  cmd_wait "$jid" 120
  cat "$d/smoke-$jid.out"
  [[ $(grep -c '^task ' "$d/smoke-$jid.out") == 2 ]]
}

cmd_status() { export SLURM_CONF=$CONF; sinfo -N; squeue; }

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  smoke) cmd_smoke ;;
  wait) shift; cmd_wait "$@" ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|smoke|wait JOBID [timeout]|status" >&2; exit 2 ;;
esac
