#!/usr/bin/env bash
# launch/slurm.sbatch, run for real: a two-node SLURM cluster on this machine
# (tests/slurm/cluster.sh: Debian's slurmctld + slurmd + munge, one slurmd per network
# namespace), the tiny demo on CPU (examples/slurm/tiny-2node.yaml, one trainer/engine pair
# per node), and a preemption in the middle:
#   1. sbatch the template; wait until step 2 is in metrics.jsonl;
#   2. send SIGTERM to the batch script, as SLURM's --signal=B:TERM@120 does before the time
#      limit (the step-2 checkpoint is made 15 s slow, so the signal lands mid-run);
#   3. expect: checkpoint, clean stop, `scontrol requeue`, the requeued job resumes from
#      the checkpoint and finishes: every step once in metrics.jsonl, an export, a log per node.
# Exit 0 only when all of that happened; otherwise say why and show the logs.
#   bash tests/slurm/run.sh        (root; installs the packages when missing: apt-get)
# Knobs: SLURM_TEST_DIR [mktemp -d], SLURM_TEST_TIMEOUT_S [420] bound on the whole job,
# KEEP=1 keeps the cluster's directory.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
work=${SLURM_TEST_DIR:-$(mktemp -d /tmp/colocate-slurm.XXXXXX)}
timeout_s=${SLURM_TEST_TIMEOUT_S:-420}
job=""

say() { echo "tests/slurm/run.sh: $*"; }

show_logs() {
  say "--- batch output"; cat "$work"/batch-*.out 2>/dev/null | tail -n 40 || true
  for f in "$work"/logs/*.log; do
    [ -f "$f" ] && { say "--- tail of $f"; tail -n 25 "$f"; }
  done
  [ -n "$job" ] && { say "--- scontrol show job $job"; scontrol show job "$job" 2>&1 | head -n 30; }
  say "--- tail of slurmctld.log"; tail -n 15 "$work/cluster/log/slurmctld.log" 2>/dev/null || true
}

fail() { say "FAILED: $*"; show_logs; exit 1; }

cleanup() {
  [ -n "$job" ] && scancel "$job" 2>/dev/null || true
  bash tests/slurm/cluster.sh stop "$work/cluster" || true
  [ "${KEEP:-0}" = 1 ] && say "kept $work" || rm -rf "$work"
}

# 1. The packages (a fresh CI machine lacks them).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  say "installing slurmctld, slurmd, slurm-client, munge (apt-get)"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurm-client munge iproute2 util-linux >/dev/null
fi

# 2. The tiny target (cached) and the cluster.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
python examples/tiny/build.py >/dev/null
trap cleanup EXIT
bash tests/slurm/cluster.sh start "$work/cluster" || fail "the cluster did not start"
export SLURM_CONF="$work/cluster/etc/slurm.conf"

# 3. Submit the template as a user would; relative paths in the config resolve from the
#    submit directory (the repository). No GPUs here: --gpus-per-node=0 overrides the
#    template's 8, and 2 CPU ranks per node.
run_dir="$work/run"
job=$(NPROC_PER_NODE=2 PYTHON="$(command -v python)" LOG_DIR="$work/logs" \
      COLOCATE_FAULT_SLOW_CHECKPOINT=2:15 \
      sbatch --parsable --nodes 2 --gpus-per-node=0 --time 10 --chdir "$repo" \
        --output "$work/batch-%j.out" \
        launch/slurm.sbatch --config examples/slurm/tiny-2node.yaml run.dir="$run_dir") \
  || fail "sbatch refused the template"
say "submitted job $job"

state() { scontrol show job "$job" -o 2>/dev/null | sed -n "s/.*JobState=\([A-Z_]*\).*/\1/p"; }
restarts() { scontrol show job "$job" -o 2>/dev/null | sed -n "s/.*Restarts=\([0-9]*\).*/\1/p"; }
deadline=$((SECONDS + timeout_s))

# 4. Preempt once step 2 is logged (the slow checkpoint of step 2 is then in progress).
until [ -f "$run_dir/metrics.jsonl" ] && grep -q '"step": 2' "$run_dir/metrics.jsonl"; do
  case "$(state)" in PENDING|RUNNING|CONFIGURING) ;; *) fail "job $job ended ($(state)) before step 2";; esac
  ((SECONDS < deadline)) || fail "timed out after ${timeout_s}s waiting for job $job to log step 2"
  sleep 1
done
say "step 2 logged; SIGTERM to the batch script (as --signal=B:TERM before the time limit)"
scancel --batch --signal=TERM "$job"

# 5. Wait for the requeued job to finish. slurmctld holds a requeued job back for two
#    minutes (its eligible time); once it is pending again, make it eligible in 5 s. Not
#    "now": slurmd refuses a credential issued in the second it revoked the job's last one
#    ("Job credential revoked"), which failed this test once.
released=0
until [ "$(restarts)" -ge 1 ] 2>/dev/null && [ "$(state)" = COMPLETED ]; do
  case "$(state)" in
    PENDING|RUNNING|CONFIGURING|COMPLETING|REQUEUED|REQUEUE_HOLD|COMPLETED) ;;
    *) fail "job $job ended $(state) (restarts: $(restarts))";;
  esac
  if [ "$(state)" = COMPLETED ] && [ "$(restarts)" = 0 ]; then
    fail "job $job completed without being requeued: the SIGTERM did not stop it"
  fi
  if [ "$released" = 0 ] && [ "$(restarts)" -ge 1 ] 2>/dev/null && [ "$(state)" = PENDING ]; then
    scontrol update JobId="$job" StartTime=now+5 && released=1
  fi
  ((SECONDS < deadline)) || fail "timed out after ${timeout_s}s waiting for job $job (state $(state), restarts $(restarts))"
  sleep 2
done

# 6. What the job must have done.
out=$(cat "$work"/batch-"$job".out)
grep -q "requeueing job $job" <<<"$out" || fail "the batch script did not requeue after SIGTERM"
steps=$(python -c "import json,sys; print(' '.join(str(json.loads(l)['step']) for l in open(sys.argv[1])))" \
        "$run_dir/metrics.jsonl")
[ "$steps" = "1 2 3 4 5 6" ] || fail "metrics.jsonl steps are '$steps', expected each of 1..6 once"
[ -f "$run_dir/export/model.safetensors" ] || fail "no export in $run_dir/export"
for node in n1 n2; do
  [ -s "$work/logs/colocate-$job-$node.log" ] || fail "no log for node $node"
done
logs=$(cat "$work"/logs/*.log)
grep -qF "stopped by SIGTERM (checkpoint written) at step 2/6" <<<"$logs" || fail "no clean stop at step 2 in the node logs"
grep -q "resumed from .*step_000002" <<<"$logs" || fail "the requeued job did not resume from step 2"
grep -qE "at step 2/6; last checkpoint .*step_000002; the SLURM job requeues itself and resumes" \
  <<<"$logs" || fail "the stop line did not say that the job requeues itself"
grep -q "2 pair(s) on 2 node(s)" <<<"$logs" || fail "the run did not span 2 nodes"
say "OK: job $job trained on 2 nodes, stopped cleanly on SIGTERM at step 2, was requeued," \
    "resumed and exported ($run_dir/export)"
