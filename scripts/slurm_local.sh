#!/usr/bin/env bash
# A one-node SLURM on this machine, for the tests marked `slurm` (tests/test_slurm.py) and for
# trying --launcher slurm by hand. Run as root; no systemd needed (Debian 12's packages).
#
#   scripts/slurm_local.sh up               install if needed; start munge, slurmctld, slurmd
#   scripts/slurm_local.sh up --accounting  the same with slurmdbd (MariaDB): sacct works
#   scripts/slurm_local.sh down             stop what `up` started (by the pids it recorded)
#
# The node is this host with its CPUs, in one partition `debug`; KillWait is 5 s (30 s is
# SLURM's default), so a cancelled task's processes are killed quickly.
set -euo pipefail

STATE=/var/lib/slurm-local        # spool, state and the pids of what `up` started
LOGS=/var/log/slurm-local
CONF=/etc/slurm/slurm.conf

say() { echo "slurm_local: $*" >&2; }

install() {
  local packages=(slurmctld slurmd slurm-client munge)
  [ "$1" = yes ] && packages+=(slurmdbd mariadb-server)
  local missing=()
  for package in "${packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Start "$@" in the background and record its pid under the name $1 (of the daemon).
start() {
  local name=$1
  shift
  "$@" >>"$LOGS/$name.out" 2>&1 &
  echo $! >"$STATE/$name.pid"
}

wait_for() {  # seconds, description, command...
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq $((seconds * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  say "$what did not come up in $seconds s; see $LOGS"
  exit 1
}

write_config() {
  local host=$1 accounting=$2 cpus memory
  cpus=$(nproc)
  memory=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
  mkdir -p /etc/slurm
  cat >"$CONF" <<EOF
# Written by moe-cl's scripts/slurm_local.sh: a one-node SLURM for tests.
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.daemon.pid
SlurmdPidFile=$STATE/slurmd.daemon.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
EOF
  if [ "$accounting" = yes ]; then
    cat >>"$CONF" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$host
EOF
  else
    echo "AccountingStorageType=accounting_storage/none" >>"$CONF"
  fi
  cat >>"$CONF" <<EOF
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  if [ "$accounting" = yes ]; then
    cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=$host
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$STATE/slurmdbd.daemon.pid
LogFile=$LOGS/slurmdbd.log
EOF
    chmod 600 /etc/slurm/slurmdbd.conf
  fi
}

start_accounting() {
  mkdir -p /run/mysqld
  chown mysql:mysql /run/mysqld
  start mariadbd mariadbd --user=mysql --skip-networking=0 --bind-address=127.0.0.1 \
      --log-error="$LOGS/mariadb.log"
  wait_for 30 MariaDB mysqladmin ping
  mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  start slurmdbd slurmdbd -D
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster local >/dev/null 2>&1 || true
}

up() {
  local accounting=no
  [ "${1:-}" = "--accounting" ] && accounting=yes
  [ "$(id -u)" = 0 ] || { say "run as root"; exit 1; }
  if [ -e "$STATE/slurmctld.pid" ]; then
    say "already up (scripts/slurm_local.sh down first)"
    exit 1
  fi
  install "$accounting"
  local host
  host=$(hostname -s 2>/dev/null || cat /proc/sys/kernel/hostname)
  mkdir -p "$STATE/ctld" "$STATE/d" "$LOGS"
  rm -rf "${STATE:?}/ctld/"* "${STATE:?}/d/"*  # no jobs left from an earlier `up`
  write_config "$host" "$accounting"
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  start munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground
  wait_for 10 munge munge -n
  if [ "$accounting" = yes ]; then start_accounting; fi
  start slurmctld slurmctld -D -i
  wait_for 20 slurmctld scontrol ping
  start slurmd slurmd -D -N "$host"
  wait_for 30 "the node" bash -c "sinfo -h -o %t | grep -qx idle"
  say "up: node $host ($(nproc) CPUs), partition debug, accounting $accounting"
}

down() {
  local name pid
  for name in slurmd slurmctld slurmdbd mariadbd munged; do
    [ -e "$STATE/$name.pid" ] || continue
    pid=$(cat "$STATE/$name.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$STATE/$name.pid"
  done
  say "down"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  *) echo "usage: $0 up [--accounting] | down" >&2; exit 2 ;;
esac
