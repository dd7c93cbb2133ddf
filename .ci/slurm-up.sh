#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine for tests:
#   munged + slurmctld + slurmd, and (by default) slurmdbd on a private MariaDB
#   so that `sacct` works (submitit polls sacct to notice cancelled / killed jobs;
#   without it such jobs look "UNKNOWN" forever and job.result() never returns).
#
# Needs root and Debian's apt (packages: slurm-wlm munge [slurmdbd mariadb-server]).
# No systemd: the daemons run in the background; .ci/slurm-down.sh stops them.
# Idempotent: when the cluster is already up with the same config it only checks
# it (well under a second) and exits 0.
#
# Environment knobs:
#   SLURM_CI_ACCOUNTING=0   skip slurmdbd/MariaDB (sacct then says "accounting storage is disabled")
#   SLURM_CI_PARTITION      partition name (default: debug)
#   SLURM_CI_WAIT_S         seconds to wait for the node to become idle (default: 60)
#
# On success prints exactly one line:  slurm ready: <partition> <node> <cpus>
# On failure prints one line starting with "slurm-up: FAILED:" and exits non-zero.
set -euo pipefail

PARTITION="${SLURM_CI_PARTITION:-debug}"
CLUSTER="${SLURM_CI_CLUSTER:-plutao-ci}"
WAIT_S="${SLURM_CI_WAIT_S:-60}"
ACCOUNTING="${SLURM_CI_ACCOUNTING:-1}"

HERE="$(cd "$(dirname "$0")" && pwd)"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
DBD_CONF="$CONF_DIR/slurmdbd.conf"
STATE_DIR=/var/lib/slurm-ci
RUN_DIR=/run/slurm-ci
LOG_DIR=/var/log/slurm-ci
SETUP_LOG="$LOG_DIR/setup.log"
DB_SOCK=/run/mysqld/mysqld.sock
DB_PID=/run/mysqld/slurm-ci.pid # pid file marks the instance slurm-up.sh started
DB_PASS=slurmci # local-only MariaDB (no TCP listener), throwaway CI cluster

die() {
  echo "slurm-up: FAILED: $*" >&2
  exit 1
}

if [ "$(id -u)" -ne 0 ]; then
  die "must run as root (needs apt-get and to start slurmd/slurmctld/munged)"
fi
mkdir -p "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$RUN_DIR"

# ---------------------------------------------------------------- (1) install
need=()
for cmd in slurmctld slurmd srun sinfo munged; do
  command -v "$cmd" >/dev/null 2>&1 || need=(slurm-wlm munge)
done
if [ "$ACCOUNTING" = 1 ]; then
  for cmd in slurmdbd mariadbd mariadb; do
    command -v "$cmd" >/dev/null 2>&1 || need+=(slurmdbd mariadb-server)
  done
  # slurmdbd needs the mysql storage plugin (a dependency of Debian's slurmdbd)
  [ -e /usr/lib/x86_64-linux-gnu/slurm-wlm/accounting_storage_mysql.so ] \
    || ls /usr/lib/*/slurm-wlm/accounting_storage_mysql.so >/dev/null 2>&1 \
    || need+=(slurmdbd)
fi
if [ "${#need[@]}" -gt 0 ]; then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  export DEBIAN_FRONTEND=noninteractive
  apt_install() {
    apt-get install -y -q --no-install-recommends \
      -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${need[@]}"
  }
  if ! apt_install >>"$SETUP_LOG" 2>&1; then
    apt-get update -q >>"$SETUP_LOG" 2>&1 || die "apt-get update failed (see $SETUP_LOG)"
    apt_install >>"$SETUP_LOG" 2>&1 || die "apt-get install ${need[*]} failed (see $SETUP_LOG)"
  fi
  command -v slurmctld >/dev/null 2>&1 || die "slurmctld not on PATH after installing slurm-wlm"
fi

# ---------------------------------------------------------------- (2) config
NODE="$(hostname -s)"
[ -n "$NODE" ] || die "hostname -s is empty"
slurmd_c="$(slurmd -C 2>/dev/null | head -n 1)" || die "slurmd -C failed"
CPUS="$(sed -n 's/.*CPUs=\([0-9]\+\).*/\1/p' <<<"$slurmd_c")"
MEM="$(sed -n 's/.*RealMemory=\([0-9]\+\).*/\1/p' <<<"$slurmd_c")"
[ -n "$CPUS" ] || CPUS="$(nproc)"
[ -n "$MEM" ] || MEM=1024
# a bit below what slurmd sees, so the node is never drained for "Low RealMemory"
MEM=$((MEM * 95 / 100))
[ "$MEM" -ge 1 ] || MEM=1

if [ "$ACCOUNTING" = 1 ]; then
  acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  acct_lines="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

new_conf="$(cat <<EOF
# Written by .ci/slurm-up.sh: single-node CI cluster, no cgroups.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$acct_lines
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
EnforcePartLimits=ALL
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)"

new_dbd_conf="$(cat <<EOF
# Written by .ci/slurm-up.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$DB_PASS
EOF
)"

conf_changed=0
mkdir -p "$CONF_DIR"
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
  printf '%s\n' "$new_conf" >"$CONF"
  conf_changed=1
fi
if [ "$ACCOUNTING" = 1 ]; then
  if [ ! -f "$DBD_CONF" ] || [ "$(cat "$DBD_CONF")" != "$new_dbd_conf" ]; then
    (umask 077 && printf '%s\n' "$new_dbd_conf" >"$DBD_CONF")
    conf_changed=1
  fi
  chmod 0600 "$DBD_CONF"
fi

pid_alive() { # pidfile
  [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null
}

daemon_alive() { # name pidfile  (the pid file appears a moment after the daemon forks)
  pid_alive "$2" || pgrep -x "$1" >/dev/null 2>&1
}

node_state() {
  sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1 | tr -d '*~#!%$@^-'
}

db_alive() {
  mariadb-admin --socket="$DB_SOCK" ping >/dev/null 2>&1
}

ready() {
  local st
  st="$(node_state)"
  case "$st" in
    idle | mixed | allocated | completing) ;;
    *) return 1 ;;
  esac
  timeout 30 srun -N1 -n1 -p "$PARTITION" --quiet hostname >/dev/null 2>&1
}

# Fast path: already up with this exact config.
if [ "$conf_changed" -eq 0 ] && pid_alive "$RUN_DIR/slurmctld.pid" && pid_alive "$RUN_DIR/slurmd.pid" \
  && pgrep -x munged >/dev/null 2>&1 \
  && { [ "$ACCOUNTING" != 1 ] || { pid_alive "$RUN_DIR/slurmdbd.pid" && db_alive; }; } \
  && ready; then
  echo "slurm ready: $PARTITION $NODE $CPUS"
  exit 0
fi

# Something is missing or the config changed: (re)start the slurm daemons cleanly
# (munged and MariaDB are left running if they are healthy).
SLURM_CI_KEEP_DB=1 SLURM_CI_KEEP_MUNGE=1 bash "$HERE/slurm-down.sh" >/dev/null 2>&1 || true

# ---------------------------------------------------------------- (3) munge
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile=/etc/munge/munge.key >>"$SETUP_LOG" 2>&1 \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
fi
MUNGE_USER=root
if id munge >/dev/null 2>&1; then MUNGE_USER=munge; fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown "$MUNGE_USER": /etc/munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! pgrep -x munged >/dev/null 2>&1; then
  if [ "$MUNGE_USER" = munge ]; then
    runuser -u munge -- munged >>"$SETUP_LOG" 2>&1 || die "munged did not start (see $SETUP_LOG, /var/log/munge/munged.log)"
  else
    munged --force >>"$SETUP_LOG" 2>&1 || die "munged did not start (see $SETUP_LOG)"
  fi
fi
for _ in $(seq 1 50); do
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then break; fi
  sleep 0.1
done
munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die "munge round-trip (munge -n | unmunge) failed"

# ---------------------------------------------------------------- accounting
if [ "$ACCOUNTING" = 1 ]; then
  if ! db_alive; then
    id mysql >/dev/null 2>&1 || die "user 'mysql' missing (mariadb-server not installed properly)"
    mkdir -p /run/mysqld /var/lib/mysql "$LOG_DIR/mariadb"
    chown mysql: /run/mysqld /var/lib/mysql "$LOG_DIR/mariadb"
    if [ ! -d /var/lib/mysql/mysql ]; then
      mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$SETUP_LOG" 2>&1 \
        || die "mariadb-install-db failed (see $SETUP_LOG)"
    fi
    # own instance: unix socket only, small buffer pool
    setsid nohup mariadbd --user=mysql --datadir=/var/lib/mysql --socket="$DB_SOCK" \
      --pid-file="$DB_PID" --skip-networking --innodb-buffer-pool-size=32M --innodb-lock-wait-timeout=900 \
      --log-error="$LOG_DIR/mariadb/error.log" </dev/null >/dev/null 2>&1 &
    for _ in $(seq 1 150); do
      db_alive && break
      sleep 0.2
    done
    db_alive || die "MariaDB did not start: $(grep -i error "$LOG_DIR/mariadb/error.log" 2>/dev/null | tail -n 1)"
  fi
  mariadb --socket="$DB_SOCK" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" >>"$SETUP_LOG" 2>&1 \
    || die "could not create the slurm database/user in MariaDB (see $SETUP_LOG)"
  slurmdbd >>"$SETUP_LOG" 2>&1 \
    || die "slurmdbd did not start: $(tail -n 1 "$LOG_DIR/slurmdbd.log" 2>/dev/null)"
  ok=0
  for _ in $(seq 1 100); do
    daemon_alive slurmdbd "$RUN_DIR/slurmdbd.pid" \
      || die "slurmdbd exited: $(grep -iE 'error|fatal' "$LOG_DIR/slurmdbd.log" 2>/dev/null | grep -v "not recommended values" | tail -n 1)"
    if timeout 10 sacctmgr -n -P list cluster format=cluster >"$RUN_DIR/clusters" 2>>"$SETUP_LOG"; then
      ok=1
      break
    fi
    sleep 0.3
  done
  [ "$ok" = 1 ] || die "slurmdbd not answering sacctmgr (see $LOG_DIR/slurmdbd.log)"
  if ! grep -qx "$CLUSTER" "$RUN_DIR/clusters"; then
    timeout 20 sacctmgr -i add cluster "$CLUSTER" >>"$SETUP_LOG" 2>&1 \
      || die "sacctmgr add cluster $CLUSTER failed (see $SETUP_LOG)"
  fi
fi

# ---------------------------------------------------------------- start slurm
slurmctld >>"$SETUP_LOG" 2>&1 \
  || die "slurmctld did not start: $(tail -n 1 "$LOG_DIR/slurmctld.log" 2>/dev/null)"
slurmd >>"$SETUP_LOG" 2>&1 \
  || die "slurmd did not start: $(tail -n 1 "$LOG_DIR/slurmd.log" 2>/dev/null)"

# ---------------------------------------------------------------- (4) wait
deadline=$((SECONDS + WAIT_S))
st=""
while [ "$SECONDS" -lt "$deadline" ]; do
  daemon_alive slurmctld "$RUN_DIR/slurmctld.pid" \
    || die "slurmctld exited: $(grep -iE 'error|fatal' "$LOG_DIR/slurmctld.log" 2>/dev/null | tail -n 1)"
  daemon_alive slurmd "$RUN_DIR/slurmd.pid" \
    || die "slurmd exited: $(grep -iE 'error|fatal' "$LOG_DIR/slurmd.log" 2>/dev/null | tail -n 1)"
  st="$(node_state)"
  case "$st" in
    idle | mixed | allocated) break ;;
    down | drained | draining | drain)
      # ReturnToService=2 normally clears this; nudge it.
      scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
      ;;
  esac
  sleep 0.5
done
case "$st" in
  idle | mixed | allocated) ;;
  *) die "node $NODE not idle after ${WAIT_S}s (state='$st', reason: $(sinfo -h -N -n "$NODE" -o '%E' 2>/dev/null))" ;;
esac
out="$(timeout 60 srun -N1 -n1 -p "$PARTITION" hostname 2>&1)" \
  || die "srun -N1 hostname failed: $(tail -n 1 <<<"$out")"
if [ "$ACCOUNTING" = 1 ]; then
  timeout 20 sacct -n -X >/dev/null 2>>"$SETUP_LOG" \
    || die "sacct does not work (see $SETUP_LOG, $LOG_DIR/slurmdbd.log)"
fi

echo "slurm ready: $PARTITION $NODE $CPUS"
