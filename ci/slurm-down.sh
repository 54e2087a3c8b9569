#!/usr/bin/env bash
# ci/slurm-down.sh -- stop the single-node Slurm started by ci/slurm-up.sh.
# Stops slurmd, slurmctld and munged (by exact process name). Safe to run when
# nothing is running. State under /var/spool/slurm* and the config are kept.
set -euo pipefail

log() { printf '[slurm-down] %s\n' "$*"; }

for d in slurmd slurmctld munged; do
    if pgrep -x "$d" >/dev/null 2>&1; then
        log "stopping $d"
        pkill -x "$d" || true
        for _ in $(seq 1 20); do
            pgrep -x "$d" >/dev/null 2>&1 || break
            sleep 0.5
        done
        if pgrep -x "$d" >/dev/null 2>&1; then
            log "$d still running; sending SIGKILL"
            pkill -9 -x "$d" || true
        fi
    else
        log "$d not running"
    fi
done
log "done"
