#!/usr/bin/env bash
# Starts a local Slurm cluster on this machine: munge, a controller and two emulated compute nodes (n1, n2),
# so the batch scripts in accelerate_configs/slurm/ and the Slurm tests run for real. Needs root (Debian/Ubuntu).
#
#   sudo tools/slurm/up.sh      # installs the packages where missing, returns once n1 and n2 are idle
#   sbatch --wrap hostname      # any Slurm command works now
#   sudo tools/slurm/down.sh    # cancels every job, stops the daemons it started (by their pid files)
#
# Writes /etc/slurm/slurm.conf (only if absent or written by this script) and keeps state, logs and pid files in
# $RT_SLURM_DIR (default /tmp/rt-slurm). Maps n1 and n2 to 127.0.0.1 in /etc/hosts so they resolve (rendezvous).
set -euo pipefail
STATE=${RT_SLURM_DIR:-/tmp/rt-slurm}
CONF=/etc/slurm/slurm.conf
MARK="written by tools/slurm/up.sh"
HOSTS_LINE="127.0.0.1 n1 n2  # $MARK"
here=$(cd "$(dirname "$0")" && pwd)

[ "$(id -u)" -eq 0 ] || { echo "tools/slurm/up.sh: run as root (sudo tools/slurm/up.sh)" >&2; exit 2; }
if [ -f "$CONF" ] && ! grep -q "$MARK" "$CONF"; then
  echo "tools/slurm/up.sh: $CONF exists and was not written by this script; not touching a real cluster" >&2
  exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  echo "installing slurmctld slurmd slurm-client munge"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge
fi
if sinfo -h >/dev/null 2>&1; then
  echo "a Slurm controller already answers (tools/slurm/down.sh stops the one this script started)" >&2
  exit 1
fi

mkdir -p "$STATE/ctld" /etc/slurm
sed -e "s|@HOST@|$(hostname)|g" -e "s|@STATE@|$STATE|g" -e "s|@CTLD_PORT@|${RT_SLURM_PORT:-6817}|" \
    -e "s|@N1_PORT@|$(( ${RT_SLURM_PORT:-6817} + 1 ))|" -e "s|@N2_PORT@|$(( ${RT_SLURM_PORT:-6817} + 2 ))|" \
    "$here/slurm.conf.in" | sed "1s|^|# $MARK\n|" > "$CONF"
grep -q "$MARK" /etc/hosts || echo "$HOSTS_LINE" >> /etc/hosts   # appended in place: /etc/hosts may be a mount

# munge authenticates every Slurm message; start it unless it already runs
if ! munge -n >/dev/null 2>&1; then
  [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; }
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key   # munged refuses other modes
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- munged --pid-file="/run/munge/munged.pid"
  cp /run/munge/munged.pid "$STATE/munged.pid"   # down.sh stops only what this script started
fi

slurmctld -c   # -c: a fresh controller state (no jobs left over from an earlier cluster)
slurmd -N n1
sleep 1        # one after the other (registration races otherwise)
slurmd -N n2

for _ in $(seq 60); do
  if [ "$(sinfo -h -N -n n1,n2 -o '%N %t' 2>/dev/null | grep -c ' idle$')" -eq 2 ]; then
    sinfo -N
    echo "local Slurm cluster up (n1, n2); stop it with: tools/slurm/down.sh"
    exit 0
  fi
  sleep 1
done
echo "tools/slurm/up.sh: the nodes did not become idle in 60 s; logs in $STATE" >&2
sinfo -N >&2 || true
exit 1
