#!/usr/bin/env bash
# ci/slurm-test.sh -- the tiny grid through a real Slurm (ci/slurm-up.sh), checked against a local run,
# plus a kill-and-resume test of a training job.
#
# CI runs it as root after `pip install -e ".[slurm]"` (snakemake, snakemake-executor-plugin-slurm
# and the `poisongrid` CLI on PATH; sbatch exports PATH to the jobs). About 6-8 minutes on 2 cores
# before the share part was added (not yet timed with it; .ci/run calls it after pytest).
#
#   1. ci/slurm-up.sh (idempotent: a running healthy cluster is left alone)
#   2. one tiny grid (digits, scenario multi, defenses none + badloss, device cpu, no GPUs):
#      trigger -> poison -> pretrain -> score -> plan -> train -> evaluate -> aggregate,
#      run (a) locally with --cores 2 and (b) with --profile ci/slurm-profile (executor slurm)
#   3. every stage job of (b) went through sbatch: each rule log says "in SLURM job <id>", and
#      .snakemake/slurm_logs/ holds <id>.log for each of those ids (and each submitted job)
#   4. (a) and (b) agree: clean_accuracy, asr, asr_boosted, detection.auroc of every metrics.json
#      are identical, and the trajectories Parquet files are equal
#   4b. shared GPU (cluster.jobs_per_gpu 2): the grid again through Slurm with the GPU rules
#      grouped; the two pretrain jobs of the cell ran in one Slurm job (their rule logs name the
#      same job id) and the results equal the local run of step 2 exactly as in step 4
#   5. fault test: the pretrain job of a slower config (many epochs) is scancel'ed once it has
#      saved a checkpoint; snakemake fails, the .ckpt is left and no trajectories; the rerun (new
#      Slurm job id) logs "resumed from checkpoint", removes the .ckpt and writes trajectories
#      equal to those of an uninterrupted local run (bit-equal on CPU)
#   6. on any failure: snakemake outputs, rule logs, Slurm job logs and daemon log tails, exit 1
#
# Environment knobs:
#   SLURM_TEST_KEEP=1             keep the work directory (always kept on failure)
#   SLURM_TEST_SKIP_UP=1          do not run ci/slurm-up.sh (a cluster is already up)
#   SLURM_TEST_FAULT_EPOCHS=100   schedule epochs of the fault config (pretrain runs half of them;
#                                 ~0.3 s each on an idle core at image_size 16)
#   SLURM_TEST_PARTS="grid share fault badinput" run only some parts (grid: steps 2-4, share:
#                                 step 4b (with the local run of step 2), fault: step 5,
#                                 badinput: a partition the cluster lacks stops the run with
#                                 sbatch's message and the rule's log path)
#   PYTHON=...                    interpreter with poisongrid + pandas (default: the one snakemake uses)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROFILE="$REPO/ci/slurm-profile"
SNAKEFILE="$REPO/Snakefile"
FAULT_EPOCHS="${SLURM_TEST_FAULT_EPOCHS:-100}"
PARTS=" ${SLURM_TEST_PARTS:-grid share fault badinput} "
STAGE_RULES=(trigger poison pretrain score plan train evaluate)
CELL=results/digits/multi/seed0
TRAJ="$CELL/models/pretrain/trajectories.parquet"
PRETRAIN_LOG=results/logs/pretrain/digits/multi/seed0/pretrain.log
export MPLBACKEND=Agg

T0=$SECONDS
log() { printf '[slurm-test %s +%ss] %s\n' "$(date +%H:%M:%S)" "$((SECONDS - T0))" "$*"; }
# The Slurm job ids a rule log names ("... in SLURM job <id> on <node>"), one per line, in order.
slurm_jobs_in() { sed -n 's/.*in SLURM job \([0-9][0-9]*\) on .*/\1/p' "$1"; }

WORK=""
BG_PIDS=()
DUMPED=0

dump_logs() {
    [ "$DUMPED" = 1 ] && return 0
    DUMPED=1
    set +e
    local f
    echo >&2
    echo "================ slurm-test: diagnostics ================" >&2
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        for f in "$WORK"/*.out; do
            [ -f "$f" ] || continue
            printf '\n----- tail -n 80 %s -----\n' "$f" >&2
            tail -n 80 "$f" >&2
        done
        while IFS= read -r f; do
            printf '\n----- tail -n 25 %s -----\n' "$f" >&2
            tail -n 25 "$f" >&2
        done < <(find "$WORK" -path '*/logs/*' -name '*.log' -not -path '*/.snakemake/*' 2>/dev/null | sort)
        while IFS= read -r f; do
            printf '\n----- tail -n 30 %s (Slurm job log) -----\n' "$f" >&2
            tail -n 30 "$f" >&2
        done < <(find "$WORK" -path '*/.snakemake/slurm_logs/*' -name '*.log' 2>/dev/null | sort | tail -n 20)
    fi
    for f in /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log; do
        [ -f "$f" ] || continue
        printf '\n----- tail -n 40 %s -----\n' "$f" >&2
        tail -n 40 "$f" >&2
    done
    printf '\n----- squeue / sinfo -----\n' >&2
    timeout 10 squeue -a -o '%.8i %.9P %.30j %.8T %.10M %R %Z' >&2 2>&1
    timeout 10 sinfo -N -l >&2 2>&1
    set -e
}

cleanup() {
    local rc=$?
    set +e
    local p id
    for p in "${BG_PIDS[@]}"; do  # our background subshells and their `timeout` children
        if kill -0 "$p" 2>/dev/null; then
            pkill -TERM -P "$p" 2>/dev/null
            kill -TERM "$p" 2>/dev/null
        fi
    done
    # Slurm jobs still queued or running from this test's directories (ours, by id).
    if [ -n "$WORK" ] && command -v squeue >/dev/null 2>&1; then
        while read -r id dir; do
            case "$dir" in "$WORK"/*) timeout 10 scancel "$id" ;; esac
        done < <(timeout 10 squeue -h -o '%i %Z' 2>/dev/null)
    fi
    if [ "$rc" -ne 0 ]; then
        dump_logs
        echo "slurm-test: FAILED (rc $rc) after $((SECONDS - T0)) s; work dir kept: ${WORK:-none}" >&2
    elif [ -n "$WORK" ] && [ "${SLURM_TEST_KEEP:-0}" != 1 ]; then
        rm -rf "$WORK"
    elif [ -n "$WORK" ]; then
        log "work dir kept: $WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT

fail() {
    printf '[slurm-test] FAILED: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------- 0. tools
command -v snakemake >/dev/null || fail "snakemake not on PATH (pip install -e '.[slurm]')"
command -v poisongrid >/dev/null || fail "poisongrid CLI not on PATH (the Slurm jobs need it too)"
if [ -z "${PYTHON:-}" ]; then
    PYTHON="$(head -n 1 "$(command -v snakemake)" | sed -n 's/^#! *\([^ ]*\).*/\1/p')"
    [ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
fi
timeout -k 10 120 "$PYTHON" -c 'import poisongrid, pandas, pyarrow, snakemake_executor_plugin_slurm' \
    || fail "$PYTHON lacks poisongrid/pandas/pyarrow/snakemake-executor-plugin-slurm"
log "snakemake $(timeout 60 snakemake --version), python $PYTHON"

# ---------------------------------------------------------------- 1. cluster
if [ "${SLURM_TEST_SKIP_UP:-0}" != 1 ]; then
    timeout -k 10 1200 bash "$REPO/ci/slurm-up.sh" || fail "ci/slurm-up.sh failed"
fi

# ---------------------------------------------------------------- 2. configs
WORK="$(mktemp -d /tmp/slurm-test.XXXXXX)"
log "work dir $WORK"

# The tiny grid of tests/test_workflow.py (TINY), scenario multi only, on CPU and without GPUs.
# gpu_mem_mb/cpu_mem_mb: small enough for a CI machine (a request above the node's memory is
# rejected by sbatch: "Requested node configuration is not available").
write_config() {  # file epochs r_epoch
    cat >"$1" <<EOF
results: results
device: cpu
threads: 1
seeds: [0]
cluster: {gpus_per_job: 0, gpu_mem_mb: 2000, cpu_mem_mb: 1000}
defender_models:
  pretrain: {r_epoch: $3, augment: none, record: eval}
bona_fide: {n_clean: 60}
detectors:
  badloss: {type: badloss, k: 10, log_losses: true}
defenses:
  none: {remedy: none}
  badloss: {detector: badloss, remedy: remove, r_reject: 0.4}
datasets:
  digits:
    image_size: 16
    model: smallcnn
    epochs: $2
    minutes_per_epoch: 0.05
    batch_size: 64
    lr: 0.003
    scenarios: [multi]
    attacks:
      patch: {ratio: 0.05}
      blend_random: {ratio: 0.04, alpha: 0.1}
      narcissus: {ratio: 0.02, learn: {model: smallcnn, epochs: 3, rounds: 2, pool_fraction: 0.2}}
EOF
}
TINY="$WORK/tiny.yaml"
FAULT="$WORK/fault.yaml"
SHARE="$WORK/share.yaml"
write_config "$TINY" 12 0.3
write_config "$FAULT" "$FAULT_EPOCHS" 0.5
# The grid with its GPU rules' jobs two to an allocation (memory per job halved: a group asks for
# the sum over its jobs, and the node is small). Memory does not enter any result.
sed 's/^cluster: {gpus_per_job: 0, gpu_mem_mb: 2000,/cluster: {gpus_per_job: 0, jobs_per_gpu: 2, gpu_mem_mb: 1000,/' \
    "$TINY" >"$SHARE"
grep -q 'jobs_per_gpu: 2' "$SHARE" || fail "could not write $SHARE"
FAULT_RUN=$(( (FAULT_EPOCHS + 1) / 2 ))

smk_local() {  # timeout dir out-file args...
    local t=$1 dir=$2 out=$3
    shift 3
    timeout -k 10 "$t" snakemake -s "$SNAKEFILE" -d "$dir" --cores 2 "$@" >"$out" 2>&1
}
smk_slurm() {  # timeout dir out-file args...
    local t=$1 dir=$2 out=$3
    shift 3
    timeout -k 10 "$t" snakemake -s "$SNAKEFILE" -d "$dir" --profile "$PROFILE" "$@" >"$out" 2>&1
}

# Every metrics.json and trajectories file of a local results folder ($1) equals a Slurm one ($2).
compare_results() {
    timeout -k 10 120 "$PYTHON" - "$1" "$2" <<'PY'
import json, sys
from pathlib import Path
import pandas as pd

a, b = Path(sys.argv[1]), Path(sys.argv[2])
bad = []
for pat in ("**/metrics.json", "**/trajectories.parquet"):
    fa = sorted(p.relative_to(a) for p in a.glob(pat))
    fb = sorted(p.relative_to(b) for p in b.glob(pat))
    if fa != fb or not fa:
        bad.append(f"{pat}: local has {list(map(str, fa))}, Slurm has {list(map(str, fb))}")
        continue
    for rel in fa:
        if rel.suffix == ".json":
            ma, mb = (json.loads((r / rel).read_text()) for r in (a, b))
            for key in ("clean_accuracy", "asr", "asr_boosted"):
                if ma.get(key) != mb.get(key):
                    bad.append(f"{rel} {key}: local {ma.get(key)} != Slurm {mb.get(key)}")
            auc = [(m.get("detection") or {}).get("auroc") for m in (ma, mb)]
            if auc[0] != auc[1]:
                bad.append(f"{rel} detection.auroc: local {auc[0]} != Slurm {auc[1]}")
            print(f"  {rel}: clean_accuracy {ma['clean_accuracy']:.4f}, auroc {auc[0]}  (equal)")
        else:
            ta, tb = (pd.read_parquet(r / rel) for r in (a, b))
            if not ta.equals(tb):
                bad.append(f"{rel}: trajectories differ")
            else:
                print(f"  {rel}: {ta.shape} equal")
if bad:
    print("\n".join(bad), file=sys.stderr)
    sys.exit(1)
PY
}

# ---------------------------------------------------------------- local runs (background)
# While the Slurm grid mostly waits on status checks, the local runs use the CPUs:
# (a) the grid, the uninterrupted reference of the fault config, and the fault test's inputs.
has_part() { case "$PARTS" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
log "local runs in the background (parts: $(echo $PARTS)): grid; fault reference ($FAULT_RUN pretrain epochs) and fault inputs"
(
    set -e
    if has_part grid || has_part share; then
        smk_local 400 "$WORK/local" "$WORK/local.out" all --configfile "$TINY"
    fi
    if has_part fault; then
        smk_local 400 "$WORK/fault-ref" "$WORK/fault-ref.out" "$TRAJ" --configfile "$FAULT"
        smk_local 400 "$WORK/fault" "$WORK/fault-inputs.out" "$CELL/poison/manifest.parquet" --configfile "$FAULT"
    fi
) &
LOCAL_PID=$!
BG_PIDS+=("$LOCAL_PID")
n_sub=0

# ---------------------------------------------------------------- 2b. the grid through Slurm
if has_part grid; then
log "grid through Slurm: snakemake --profile ci/slurm-profile all"
t=$SECONDS
smk_slurm 540 "$WORK/slurm" "$WORK/slurm.out" all --configfile "$TINY" \
    || fail "snakemake through Slurm failed (rc $?), see $WORK/slurm.out"
log "grid through Slurm done in $((SECONDS - t)) s"

fi

t=$SECONDS
wait "$LOCAL_PID" || fail "a local snakemake run failed (rc $?), see $WORK/local.out, fault-ref.out, fault-inputs.out"
log "local runs done (waited $((SECONDS - t)) s more)"

if has_part grid; then

# ---------------------------------------------------------------- 3. every job went through sbatch
SD="$WORK/slurm"
submitted="$(sed -n 's/.*has been submitted with SLURM jobid \([0-9][0-9]*\).*/\1/p' "$WORK/slurm.out" | sort -n | tr '\n' ' ')"
[ -n "$submitted" ] || fail "no 'submitted with SLURM jobid' in $WORK/slurm.out"
ids=()
checked_rules=()
for rule in "${STAGE_RULES[@]}" aggregate; do
    if grep -q "^localrule $rule:" "$WORK/slurm.out"; then
        log "rule $rule is a localrule: not checked"
        continue
    fi
    mapfile -t logs < <(find "$SD/results/logs/$rule" -name '*.log' 2>/dev/null | sort)
    [ "${#logs[@]}" -gt 0 ] || fail "no rule log under $SD/results/logs/$rule/"
    for f in "${logs[@]}"; do
        id="$(slurm_jobs_in "$f" | tail -n 1)"
        [ -n "$id" ] || fail "$f lacks 'in SLURM job <id>': rule $rule did not run through sbatch"
        [ -n "$(find "$SD/.snakemake/slurm_logs" -name "$id.log" 2>/dev/null)" ] \
            || fail "no .snakemake/slurm_logs/**/$id.log for $f"
        case " $submitted " in *" $id "*) ;; *) fail "job $id of $f is not among the submitted jobs: $submitted" ;; esac
        ids+=("$id")
    done
    checked_rules+=("$rule")
done
for id in $submitted; do
    [ -n "$(find "$SD/.snakemake/slurm_logs" -name "$id.log")" ] || fail "submitted job $id has no slurm_logs/**/$id.log"
done
n_sub=$(wc -w <<<"$submitted")
uniq_ids="$(printf '%s\n' "${ids[@]}" | sort -un | tr '\n' ' ')"
[ "$(wc -w <<<"$uniq_ids")" -eq "${#ids[@]}" ] || fail "two rule logs name the same Slurm job: ${ids[*]}"
log "sbatch: $n_sub jobs submitted (ids: ${submitted% }); rule logs of ${checked_rules[*]} name jobs ${uniq_ids% }"

# ---------------------------------------------------------------- 4. same results locally and under Slurm
log "comparing local and Slurm results"
compare_results "$WORK/local/results" "$WORK/slurm/results" || fail "local and Slurm results differ"

fi

# ---------------------------------------------------------------- 4b. GPU rules' jobs sharing an allocation
n_share=0
if has_part share; then
log "shared GPU: the grid through Slurm with cluster.jobs_per_gpu 2"
t=$SECONDS
smk_slurm 540 "$WORK/share" "$WORK/share.out" all --configfile "$SHARE" \
    || fail "snakemake through Slurm with jobs_per_gpu 2 failed (rc $?), see $WORK/share.out"
log "shared grid through Slurm done in $((SECONDS - t)) s"
grep -q "Group job gpu_pretrain" "$WORK/share.out" || fail "no 'Group job gpu_pretrain' in $WORK/share.out"
mapfile -t plogs < <(find "$WORK/share/results/logs/pretrain" -name '*.log' | sort)
[ "${#plogs[@]}" -eq 2 ] || fail "expected 2 pretrain logs (pretrain, attacked), found: ${plogs[*]}"
pids="$(for f in "${plogs[@]}"; do slurm_jobs_in "$f" | tail -n 1; done | sort -u)"
[ "$(wc -w <<<"$pids")" -eq 1 ] || fail "the 2 grouped pretrain jobs ran in Slurm jobs '$(echo $pids)', not in one"
n_share="$(grep -c 'has been submitted with SLURM jobid' "$WORK/share.out" || true)"
log "the 2 pretrain jobs ran in Slurm job $pids; comparing with the local run"
compare_results "$WORK/local/results" "$WORK/share/results" || fail "local and shared-GPU Slurm results differ"
fi

# ---------------------------------------------------------------- 5. kill a training job, resume it
if has_part fault; then
FD="$WORK/fault"
PL="$FD/$PRETRAIN_LOG"
CKPT="$FD/$CELL/models/pretrain/model.pt.ckpt"
[ -f "$FD/$CELL/poison/manifest.parquet" ] || fail "fault test inputs missing"
log "fault test: pretrain ($FAULT_RUN epochs) through Slurm, retries 0; scancel after its first checkpoint"
smk_slurm 400 "$FD" "$WORK/fault-run1.out" --retries 0 "$TRAJ" --configfile "$FAULT" &
RUN1=$!
BG_PIDS+=("$RUN1")
job1=""
for _ in $(seq 1 480); do
    if [ -f "$PL" ] && grep -q '(checkpoint saved)' "$PL"; then
        job1="$(slurm_jobs_in "$PL" | head -n 1)"
        break
    fi
    kill -0 "$RUN1" 2>/dev/null || fail "snakemake exited before the pretrain job saved a checkpoint"
    sleep 0.5
done
[ -n "$job1" ] || fail "no '(checkpoint saved)' with 'in SLURM job <id>' in $PL within 240 s"
timeout 30 scancel "$job1" || fail "scancel $job1 failed"
log "scancel $job1 after: $(grep '(checkpoint saved)' "$PL" | tail -n 1)"
rc=0
wait "$RUN1" || rc=$?
[ "$rc" -ne 0 ] || fail "snakemake succeeded although its pretrain job $job1 was cancelled"
[ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || fail "snakemake did not notice the cancelled job $job1 (timed out)"
log "snakemake failed as it should (rc $rc): $(grep -m 1 -o "SLURM-job '$job1' failed[^.]*" "$WORK/fault-run1.out" || true)"
killed_epoch="$(sed -n 's/.*epoch \([0-9][0-9]*\)\/[0-9]* .*(checkpoint saved).*/\1/p' "$PL" | tail -n 1)"
grep -q '^.*pretrain pretrain ([a-z0-9_]*): [0-9]* epochs' "$PL" && fail "the pretrain job finished before it was cancelled; raise SLURM_TEST_FAULT_EPOCHS"
[ -f "$CKPT" ] || fail "checkpoint $CKPT missing after the kill"
[ ! -e "$FD/$TRAJ" ] || fail "$TRAJ exists after the kill"
cp "$PL" "$WORK/pretrain-killed.log"
log "killed at epoch $killed_epoch/$FAULT_RUN: checkpoint left, no trajectories"

log "rerun through Slurm (rerun-incomplete from the profile)"
t=$SECONDS
smk_slurm 400 "$FD" "$WORK/fault-run2.out" --retries 0 "$TRAJ" --configfile "$FAULT" \
    || fail "the rerun after the kill failed (rc $?), see $WORK/fault-run2.out"
log "rerun done in $((SECONDS - t)) s"
job2="$(slurm_jobs_in "$PL" | head -n 1)"
[ -n "$job2" ] || fail "$PL of the rerun lacks 'in SLURM job <id>'"
[ "$job2" != "$job1" ] || fail "the rerun ran in the same Slurm job $job1"
resumed="$(grep -m 1 'resumed from checkpoint' "$PL" || true)"
[ -n "$resumed" ] || fail "the rerun did not resume from the checkpoint (no 'resumed from checkpoint' in $PL)"
done_n="$(sed -n 's/.*epochs 1-\([0-9][0-9]*\) done, continuing at epoch [0-9]*\/[0-9]*.*/\1/p' <<<"$resumed")"
resume_at="$(sed -n 's/.*continuing at epoch \([0-9][0-9]*\)\/\([0-9][0-9]*\).*/\1/p' <<<"$resumed")"
resume_of="$(sed -n 's/.*continuing at epoch \([0-9][0-9]*\)\/\([0-9][0-9]*\).*/\2/p' <<<"$resumed")"
[ -n "$done_n" ] && [ -n "$resume_at" ] || fail "cannot read the epoch from: $resumed"
[ "$resume_at" -eq $((done_n + 1)) ] || fail "inconsistent resume line: $resumed"
[ "$resume_of" -eq "$FAULT_RUN" ] || fail "resume line names $resume_of epochs, expected $FAULT_RUN: $resumed"
[ "$done_n" -ge "$killed_epoch" ] && [ "$resume_at" -le "$FAULT_RUN" ] \
    || fail "resumed at epoch $resume_at, but the killed job had logged epoch $killed_epoch saved"
grep -q "epoch $resume_at/$FAULT_RUN .*(checkpoint saved)" "$PL" || fail "the rerun did not train epoch $resume_at"
if grep -q "epoch 1/$FAULT_RUN " "$PL" && [ "$resume_at" -gt 1 ]; then
    fail "the rerun trained epoch 1 again"
fi
[ ! -e "$CKPT" ] || fail "$CKPT still there after the rerun"
[ -f "$FD/$TRAJ" ] || fail "no $TRAJ after the rerun"
for id in "$job1" "$job2"; do
    [ -n "$(find "$FD/.snakemake/slurm_logs" -name "$id.log")" ] || fail "no .snakemake/slurm_logs/**/$id.log (fault test)"
done
log "resumed in Slurm job $job2: $resumed"
timeout -k 10 120 "$PYTHON" - "$WORK/fault-ref/$TRAJ" "$FD/$TRAJ" <<'PY' || fail "resumed trajectories differ from the uninterrupted run"
import sys
import pandas as pd

ref, got = (pd.read_parquet(p) for p in sys.argv[1:3])
if not ref.equals(got):
    print(f"ref {ref.shape} vs resumed {got.shape}; max abs diff "
          f"{(ref.select_dtypes('number') - got.select_dtypes('number')).abs().max().max() if ref.shape == got.shape else 'n/a'}",
          file=sys.stderr)
    sys.exit(1)
print(f"  resumed trajectories {got.shape} equal to the uninterrupted local run")
PY

log "Slurm jobs: fault test $job1 (cancelled) -> $job2 (resumed)"
fi

if has_part badinput; then
    log "bad input: a partition the cluster does not have"
    set +e
    smk_slurm 120 "$WORK/badpart" "$WORK/badpart.out" "$CELL/poison/manifest.parquet" --configfile "$TINY" \
        --default-resources slurm_partition=no_such_partition mem_mb=500 runtime=5
    rc=$?
    set -e
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "a run with an unknown partition should fail by itself (rc $rc)"
    grep -q "invalid partition" "$WORK/badpart.out" || fail "sbatch's 'invalid partition' message is not shown"
    grep -qE "log: results/logs/[a-z]+/digits/.*\.log \(check log file" "$WORK/badpart.out" || fail "the failed rule's log path is not named"
    log "unknown partition: stopped (rc $rc) with sbatch's message and the rule's log path"
fi

summary="$n_sub grid"
has_part grid && summary+=", results equal to the local run"
if has_part share; then
    n_sub=$((n_sub + n_share))
    summary+=", $n_share shared-GPU (jobs_per_gpu 2) equal to the local run"
fi
if has_part fault; then
    n_sub=$((n_sub + 2))
    summary+=", 2 fault-test: resumed at epoch $resume_at/$FAULT_RUN after scancel"
fi
echo "slurm-test: OK ($n_sub jobs through sbatch: $summary; $((SECONDS - T0)) s)"
