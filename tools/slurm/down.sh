#!/usr/bin/env bash
# Stops the local Slurm cluster of tools/slurm/up.sh: cancels every job, waits for them to end, then stops the
# daemons by the process ids in their pid files and removes the configuration and state it wrote.
set -uo pipefail
STATE=${RT_SLURM_DIR:-/tmp/rt-slurm}
CONF=/etc/slurm/slurm.conf
MARK="written by tools/slurm/up.sh"

[ "$(id -u)" -eq 0 ] || { echo "tools/slurm/down.sh: run as root" >&2; exit 2; }
if [ -f "$CONF" ] && ! grep -q "$MARK" "$CONF"; then
  echo "tools/slurm/down.sh: $CONF was not written by tools/slurm/up.sh; not touching a real cluster" >&2
  exit 2
fi

# jobs first: a job's processes (slurmstepd and below) outlive a stopped slurmd
if [ -f "$STATE/slurmctld.pid" ] && squeue -h >/dev/null 2>&1; then
  mapfile -t jobs < <(squeue -h -o %i)
  [ "${#jobs[@]}" -gt 0 ] && scancel "${jobs[@]}"
  for _ in $(seq 30); do   # cancelled jobs get SIGTERM, then SIGKILL after KillWait (10 s)
    [ -z "$(squeue -h -o %i)" ] && break
    sleep 1
  done
  [ -z "$(squeue -h -o %i)" ] || echo "tools/slurm/down.sh: jobs still ending: $(squeue -h -o %i | tr '\n' ' ')" >&2
fi

stop() {  # stop <pid file>: SIGTERM, then SIGKILL after 10 s
  local pid
  [ -f "$1" ] || return 0
  pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$1"
}
stop "$STATE/slurmd-n1.pid"
stop "$STATE/slurmd-n2.pid"
stop "$STATE/slurmctld.pid"
stop "$STATE/munged.pid"   # only present when up.sh started munged

rm -f "$CONF"
if grep -q "$MARK" /etc/hosts; then   # rewritten in place: /etc/hosts may be a mount
  kept=$(grep -v "$MARK" /etc/hosts)
  printf '%s\n' "$kept" > /etc/hosts
fi
rm -rf "$STATE"
echo "local Slurm cluster down"
