# shellcheck shell=bash
# Sourced by the batch scripts in this folder (from the submit directory, the repository root):
#
#   run_requeueable COMMAND...
#
# runs COMMAND in the background and waits for it, so the batch shell can react to signals while it runs (bash
# runs a trap only once its foreground command has ended). Then:
#   * USR1 (`#SBATCH --signal=B:USR1@180`: 3 minutes before the time limit, or `scancel --signal=USR1 --batch`)
#     or TERM (pre-emption, `scontrol requeue`, `scancel`): the command is sent SIGTERM, checkpoints at the next
#     step and exits with 143 (or 138 for its own SIGUSR1); the job is then requeued: same job id, same
#     arguments, so the same run folder, where the run resumes.
#   * Only a job that was signalled is requeued, and only if its command then stopped after a checkpoint (143 /
#     138). A finished command (0), a failed one (any other status), or one that died on its own with 143 (srun
#     reports a task killed after another task failed that way) is never requeued: a finished run cannot loop,
#     and a broken one fails once, visibly.
#   * At most MAX_REQUEUES (default 10) requeues per job (SLURM_RESTART_COUNT counts them, Slurm's own
#     requeues included): a run that keeps being stopped ends FAILED with its checkpoint kept; resubmitting
#     the same command resumes it.
MAX_REQUEUES=${MAX_REQUEUES:-10}

run_requeueable() {
  "$@" &
  _requeue_child=$!
  trap _requeue_on_signal USR1 TERM
  wait "$_requeue_child"
  local status=$?
  echo "$(date '+%F %T') job ${SLURM_JOB_ID}: the run ended with status $status"
  exit "$status"
}

# shellcheck disable=SC2317  # runs from the trap
_requeue_on_signal() {
  trap '' USR1 TERM   # one checkpoint request is enough; a second signal must not interrupt the wait below
  echo "$(date '+%F %T') signal received: asking the run to checkpoint and stop"
  kill -TERM "$_requeue_child" 2>/dev/null
  wait "$_requeue_child"
  _requeue_finish $?
}

_requeue_finish() {
  local status=$1 job restarts
  job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
  job=${job:-$SLURM_JOB_ID}
  restarts=${SLURM_RESTART_COUNT:-0}
  if [ "$status" -ne 143 ] && [ "$status" -ne 138 ]; then
    echo "$(date '+%F %T') job $job ended with status $status (not requeued)"
    exit "$status"
  fi
  if [ "$restarts" -ge "$MAX_REQUEUES" ]; then
    echo "$(date '+%F %T') job $job stopped after a checkpoint, but it was already requeued $restarts times" \
         "(MAX_REQUEUES=$MAX_REQUEUES): not requeued; resubmit the same command to resume"
    exit "$status"
  fi
  echo "$(date '+%F %T') job $job checkpointed: requeueing it (requeue $((restarts + 1)) of at most $MAX_REQUEUES)"
  scontrol requeue "$job" || echo "(Slurm requeues it itself: pre-emption or scontrol requeue)"
  exit 0
}

# GPUs: whatever Slurm allocated to the node (submit with --gres=gpu:N, or export SBATCH_GRES=gpu:N), unless
# GPUS_PER_NODE says otherwise. No GPU: one CPU process per node (gloo), e.g. on a CPU-only test cluster.
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
if [ "$GPUS_PER_NODE" -eq 0 ]; then
  echo "no GPU allocated (submit with --gres=gpu:N for GPUs): one CPU process per node"
  export ACCELERATE_USE_CPU=1
fi
export PROCESSES_PER_NODE=$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))
