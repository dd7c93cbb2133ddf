#!/usr/bin/env bash
# Stop the single-node CI SLURM cluster started by .ci/slurm-up.sh (idempotent).
# Stops slurmd, slurmctld, slurmdbd, the MariaDB instance slurm-up.sh started
# (only that one: identified by its pid file) and munged.
set -uo pipefail

RUN_DIR=/run/slurm-ci

stop_pidfile() { # name pidfile
  local name="$1" pidfile="$2" pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile" 2>/dev/null)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 150); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "slurm-down: $name (pid $pid) ignored SIGTERM, sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
  fi
  rm -f "$pidfile"
}

stop_pidfile slurmd "$RUN_DIR/slurmd.pid"
stop_pidfile slurmctld "$RUN_DIR/slurmctld.pid"
stop_pidfile slurmdbd "$RUN_DIR/slurmdbd.pid"
if [ "${SLURM_CI_KEEP_DB:-0}" != 1 ]; then
  stop_pidfile mariadb /run/mysqld/slurm-ci.pid
fi
if [ "${SLURM_CI_KEEP_MUNGE:-0}" != 1 ]; then
  # Debian's munged keeps its pid file in /run/munge/munged.pid
  stop_pidfile munged /run/munge/munged.pid
fi

echo "slurm down"
exit 0
