#!/usr/bin/env bash
# ci/slurm-up.sh -- bring up a real single-node Slurm cluster on localhost.
#
# For CI and developers. Idempotent: running it again leaves a healthy cluster
# alone (it only re-checks and re-runs the smoke test). Needs root, Debian 12
# (bookworm ships Slurm 22.05.8), and no systemd: all daemons are started
# directly. Stop everything again with ci/slurm-down.sh.
#
# What it does:
#   1. apt-get install munge slurmctld slurmd slurm-client (if missing)
#   2. create /etc/munge/munge.key (if missing), start munged, check munge|unmunge
#   3. write /etc/slurm/slurm.conf for one node `hostname -s` (CPUs/RealMemory
#      from `slurmd -C`), partition `debug`, no accounting database
#   4. start slurmctld + slurmd (unless running), wait until the node is idle
#   5. smoke test: sbatch --wait and srun; on any failure print the daemon logs
#
# Environment knobs:
#   SLURM_UP_SKIP_SMOKE=1    skip the smoke test (step 5)
#   SLURM_UP_FORCE_CONF=1    rewrite slurm.conf and restart the daemons even
#                            if the config did not change
#
# Using it from Snakemake -- verified with snakemake 9.27.1 and
# snakemake-executor-plugin-slurm 2.8.0 (+ slurm-jobstep 0.6.1), which is what
# `pip install snakemake-executor-plugin-slurm` resolves for snakemake 9.27.
# Working command line (run where the Snakefile is):
#   snakemake --executor slurm --jobs 2 --slurm-status-command squeue \
#     --slurm-no-account --slurm-init-seconds-before-status-checks 5 \
#     --default-resources slurm_partition=debug mem_mb=100 runtime=5
# Pitfalls with this cluster (no accounting database):
#   * `--slurm-status-command squeue` is REQUIRED. The plugin's default is
#     'sacct' whenever a sacct binary is on PATH (slurm-client ships one), but
#     here sacct only says "Slurm accounting storage is disabled" (rc 1). The
#     jobs run and finish, yet Snakemake never sees them finish: it sits
#     there (observed > 4 min, SIGTERM only makes it "wait for running jobs";
#     use `timeout -k` around it in CI).
#   * The plugin silently switches squeue back to sacct if MinJobAge is below
#     3 x --slurm-init-seconds-before-status-checks (default 40 s -> 120 s).
#     slurm.conf below sets MinJobAge=300 so squeue is kept; don't lower it.
#   * Account: without a slurm_account resource the plugin tries to guess one
#     via sacct, which fails ("No account was given, not able to get a SLURM
#     account via sacct ... Unable to guess SLURM account. Trying to proceed
#     without."): only warnings, sbatch gets no -A and that is fine here.
#     `--slurm-no-account` is accepted but is a no-op in plugin 2.8.0; keep it
#     for newer versions. Do NOT set slurm_account=..., that triggers a
#     sacctmgr/sshare validation which fails without a database.
#   * No env vars needed: the job re-runs snakemake via the submitting
#     interpreter's full path (sys.executable), so it works even under
#     `env -i PATH=/usr/bin:/bin`; sbatch exports the environment by default.
#   * "srun: cluster configuration lacks support for cpu binding" in job logs
#     is harmless (TaskPlugin=task/none).
#   * Per-job logs: .snakemake/slurm_logs/rule_<rule>/<wildcard values>/<slurm
#     jobid>.log (the file name is the Slurm job id). They are deleted after a
#     successful job unless --slurm-keep-successful-logs is given.
set -euo pipefail

log() { printf '[slurm-up %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() {
    printf '[slurm-up] ERROR: %s\n' "$*" >&2
    dump_logs
    exit 1
}
dump_logs() {
    local f
    for f in /var/log/slurm/*.log /var/log/munge/munged.log; do
        [ -f "$f" ] || continue
        local n=40
        case "$f" in */munged.log) n=15 ;; esac
        printf '\n----- tail -n %s %s -----\n' "$n" "$f" >&2
        tail -n "$n" "$f" >&2 || true
    done
    if command -v sinfo >/dev/null 2>&1; then
        printf '\n----- sinfo -----\n' >&2
        timeout 10 sinfo -N -l >&2 2>&1 || true
    fi
}

if [ "$(id -u)" -ne 0 ]; then
    echo "[slurm-up] must run as root" >&2
    exit 1
fi

NODE="$(hostname -s)"
SLURM_CONF_FILE=/etc/slurm/slurm.conf
export SLURM_CONF="$SLURM_CONF_FILE"

# ---------------------------------------------------------------- 1. packages
PKGS=(munge slurmctld slurmd slurm-client)
missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq
    timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "packages already installed: ${PKGS[*]}"
fi
log "slurm version: $(dpkg-query -W -f='${Version}' slurmctld) ($(apt-cache policy slurmctld 2>/dev/null | sed -n 's/^ *Candidate: //p' | head -n 1) offered by apt)"

# ---------------------------------------------------------------- 2. munge
install -d -o munge -g munge -m 0700 /etc/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0700 /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

if pgrep -x munged >/dev/null 2>&1 && timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; then
    log "munged already running"
else
    if pgrep -x munged >/dev/null 2>&1; then
        log "munged running but not answering; restarting it"
        pkill -x munged || true
        sleep 1
    fi
    log "starting munged"
    rm -f /run/munge/munged.socket.2.lock
    timeout 30 runuser -u munge -- /usr/sbin/munged --force \
        || die "munged failed to start"
    for _ in $(seq 1 20); do
        timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && break
        sleep 0.5
    done
fi
timeout 10 munge -n | timeout 10 unmunge >/dev/null || die "munge -n | unmunge failed"
log "munge ok (munge -n | unmunge)"

# ---------------------------------------------------------------- 3. slurm.conf
install -d -m 0755 /etc/slurm /var/log/slurm /var/spool/slurmctld /var/spool/slurmd /run/slurm

hw="$(timeout 30 slurmd -C | head -n 1)"
hw_field() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
CPUS="$(hw_field CPUs)"
SOCKETS="$(hw_field SocketsPerBoard)"
CORES="$(hw_field CoresPerSocket)"
THREADS="$(hw_field ThreadsPerCore)"
MEM="$(hw_field RealMemory)"
[ -n "$CPUS" ] && [ -n "$MEM" ] || die "could not parse 'slurmd -C': $hw"
# Leave some headroom so the node is never drained for "Low RealMemory".
MEM=$(( MEM * 9 / 10 ))
[ "$MEM" -ge 100 ] || MEM=100
log "node $NODE: CPUs=$CPUS Sockets=$SOCKETS Cores=$CORES Threads=$THREADS RealMemory=$MEM"

new_conf="$(mktemp)"
trap 'rm -f "$new_conf"' EXIT
cat >"$new_conf" <<EOF
# Written by poisongrid ci/slurm-up.sh -- single-node Slurm on localhost.
ClusterName=poisongrid-ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
# >= 120 s, else snakemake's slurm plugin falls back to sacct (see top)
MinJobAge=300
KillWait=10
Waittime=0
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} Boards=1 SocketsPerBoard=${SOCKETS:-1} CoresPerSocket=${CORES:-$CPUS} ThreadsPerCore=${THREADS:-1} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF

conf_changed=0
if [ "${SLURM_UP_FORCE_CONF:-0}" = 1 ] || ! cmp -s "$new_conf" "$SLURM_CONF_FILE"; then
    log "writing $SLURM_CONF_FILE"
    install -m 0644 "$new_conf" "$SLURM_CONF_FILE"
    conf_changed=1
else
    log "$SLURM_CONF_FILE unchanged"
fi

# ---------------------------------------------------------------- 4. daemons
stop_daemon() {  # name
    if pgrep -x "$1" >/dev/null 2>&1; then
        log "stopping $1 (config changed)"
        pkill -x "$1" || true
        for _ in $(seq 1 20); do pgrep -x "$1" >/dev/null 2>&1 || return 0; sleep 0.5; done
        pkill -9 -x "$1" || true
    fi
}
if [ "$conf_changed" = 1 ]; then
    stop_daemon slurmd
    stop_daemon slurmctld
fi

if pgrep -x slurmctld >/dev/null 2>&1; then
    log "slurmctld already running"
else
    log "starting slurmctld"
    timeout 30 /usr/sbin/slurmctld || die "slurmctld failed to start"
fi
for _ in $(seq 1 30); do
    timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 1
done
timeout 10 scontrol ping | grep -q 'is UP' || die "slurmctld does not answer 'scontrol ping'"
log "slurmctld is up"

if pgrep -x slurmd >/dev/null 2>&1; then
    log "slurmd already running"
else
    log "starting slurmd"
    timeout 30 /usr/sbin/slurmd || die "slurmd failed to start"
fi

log "waiting for node $NODE to become idle (max 60 s)"
state=""
resumed=0
for i in $(seq 1 60); do
    state="$(timeout 10 sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n 1 || true)"
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|drained*|fail*)
            if [ "$resumed" -lt 3 ] && [ "$i" -ge 3 ]; then
                log "node is '$state' ($(timeout 10 sinfo -h -n "$NODE" -o '%E' 2>/dev/null || true)); resuming it"
                timeout 10 scontrol update nodename="$NODE" state=resume || true
                resumed=$((resumed + 1))
            fi
            ;;
    esac
    sleep 1
done
case "$state" in
    idle|mixed|allocated|completing) log "node $NODE is $state" ;;
    *) die "node $NODE did not become idle (state: '${state:-none}')" ;;
esac
timeout 10 sinfo

# ---------------------------------------------------------------- 5. smoke test
if [ "${SLURM_UP_SKIP_SMOKE:-0}" = 1 ]; then
    log "skipping smoke test (SLURM_UP_SKIP_SMOKE=1)"
    exit 0
fi
out="$(mktemp /tmp/slurm-smoke.XXXXXX.out)"
trap 'rm -f "$new_conf" "$out"' EXIT
log "smoke test: sbatch --wait"
# shellcheck disable=SC2016  # $SLURM_JOB_ID is expanded inside the job
timeout 120 sbatch --wait --job-name=slurm-up-smoke --output="$out" \
    --time=2 --mem=50 --wrap 'hostname; echo SLURM_JOB_ID=$SLURM_JOB_ID' \
    || { cat "$out" >&2 || true; die "sbatch smoke job failed"; }
log "job output:"
sed 's/^/    /' "$out"
grep -q '^SLURM_JOB_ID=[0-9]' "$out" || die "smoke job output lacks SLURM_JOB_ID"
log "smoke test: srun -N1 true"
timeout 120 srun -N1 --time=1 --mem=50 true || die "srun -N1 true failed"
log "Slurm is up: partition 'debug', node $NODE"
