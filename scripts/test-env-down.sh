#!/usr/bin/env bash
# test-env-down.sh: stop what scripts/test-env.sh started (the three
# docker-registry instances, slurmd, slurmctld, munged) for a clean restart.
# Packages, users, certificates, images and /var/lib/ci-exec-test stay; run
# scripts/test-env.sh to start everything again. Run as root.

set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
STATE=/var/lib/ci-exec-test

log() { printf 'test-env-down: %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "test-env-down: ERROR: must run as root" >&2; exit 1; }

# Same lock as test-env.sh: do not stop things while it is starting them.
mkdir -p /run/lock
exec 9>/run/lock/ci-exec-test-env.lock
flock -w 600 9 || { echo "test-env-down: ERROR: timed out waiting for the lock" >&2; exit 1; }

# alive PID: exists and is not a zombie (PID 1 may reap orphans only every
# few seconds, and kill -0 succeeds on zombies).
alive() {
  local st
  st=$(awk '/^State:/ { print $2 }' "/proc/$1/status" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# stop NAME PID...: SIGTERM, wait up to 10 s, then SIGKILL.
stop() {
  local name=$1 pid alive _
  shift
  if [ "$#" -eq 0 ]; then
    log "$name not running"
    return
  fi
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    alive=0
    for pid in "$@"; do alive "$pid" && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  for pid in "$@"; do
    if alive "$pid"; then
      kill -KILL "$pid" 2>/dev/null || true
      log "$name (pid $pid) killed with SIGKILL"
    fi
  done
  log "$name stopped"
}

# pids_of PIDFILE COMM: the pid file's process if it is called COMM, else
# every process named exactly COMM.
pids_of() {
  local pid
  pid=$(cat "$1" 2>/dev/null || true)
  if [ -n "$pid" ] && alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]; then
    echo "$pid"
    return
  fi
  for pid in $(pgrep -x "$2" || true); do
    if alive "$pid"; then echo "$pid"; fi
  done
}

# shellcheck disable=SC2046 # word splitting of pid lists is intended
{
  stop slurmd $(pids_of /run/slurm/slurmd.pid slurmd)
  stop slurmctld $(pids_of /run/slurm/slurmctld.pid slurmctld)
  stop munged $(pids_of /run/munge/munged.pid munged)
  for name in auth anon http; do
    pids=()
    for pid in $(pgrep -f -x "(/usr/bin/)?docker-registry serve $STATE/registry/$name/config.yml" || true); do
      if alive "$pid"; then pids+=("$pid"); fi
    done
    stop "registry $name" "${pids[@]}"
    rm -f "$STATE/registry/$name/registry.pid" "$STATE/registry/$name/started.sha"
  done
}
