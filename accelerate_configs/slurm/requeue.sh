# shellcheck shell=bash
# Sourced by the batch scripts in this folder (from the submit directory, the repository root):
#
#   run_requeueable COMMAND...
#
# runs COMMAND in the background and waits for it, so the batch shell can react to signals while it runs (bash
# runs a trap only once its foreground command has ended). On USR1 or TERM the command is sent SIGTERM (through
# scancel for an srun command: srun itself would SIGKILL its tasks), writes a checkpoint at its next step and
# exits with 143 (138 for its own SIGUSR1). What happens next depends on who signalled:
#   * USR1 (`#SBATCH --signal=B:USR1@180`: about 3 minutes before the time limit; or `scancel --signal=USR1
#     --batch`): the job is still RUNNING, so this script requeues it: same job id, same arguments, so the same
#     run folder, where the run resumes exactly.
#   * TERM from pre-emption or `scontrol requeue`: Slurm requeues the job itself (PreemptMode=REQUEUE and
#     --requeue); TERM from `scancel` or the hard time limit: the job ends CANCELLED / TIMEOUT. Either way this
#     script leaves the job's fate to Slurm, and the checkpoint is there for the next start or a resubmission.
#   * A command that finished (0), failed (any other status) or stopped without this shell being signalled is
#     never requeued: a finished run cannot loop, and a broken one fails once, visibly.
#   * At most MAX_REQUEUES (default 10) restarts per job (SLURM_RESTART_COUNT, Slurm's own requeues included):
#     a run that keeps being stopped ends FAILED with its checkpoint kept; resubmitting the same command resumes.
MAX_REQUEUES=${MAX_REQUEUES:-10}

run_requeueable() {
  "$@" &
  _requeue_child=$! _requeue_srun=$([ "$1" = srun ] && echo 1)
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
  if [ -n "$_requeue_srun" ]; then
    scancel --signal=TERM "$SLURM_JOB_ID"   # the job's steps, not this shell: srun itself would SIGKILL its tasks
  else
    kill -TERM "$_requeue_child" 2>/dev/null
  fi
  wait "$_requeue_child"
  _requeue_finish $?
}

_requeue_finish() {
  local status=$1 job restarts state
  job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
  job=${job:-$SLURM_JOB_ID}
  restarts=${SLURM_RESTART_COUNT:-0}
  state=$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null)
  if [ "$status" -ne 143 ] && [ "$status" -ne 138 ]; then
    echo "$(date '+%F %T') job $job ended with status $status (not requeued)"
  elif [ "$state" != RUNNING ]; then
    echo "$(date '+%F %T') job $job stopped; Slurm is ending it (${state:-gone}): its requeue or cancel stands"
  elif [ "$restarts" -ge "$MAX_REQUEUES" ]; then
    echo "$(date '+%F %T') job $job stopped, but it was already requeued $restarts times" \
         "(MAX_REQUEUES=$MAX_REQUEUES): not requeued; resubmit the same command to resume"
  else
    echo "$(date '+%F %T') job $job stopped after the signal: requeueing it (requeue $((restarts + 1)) of at most" \
         "$MAX_REQUEUES)"
    scontrol requeue "$job" && exit 0
  fi
  exit "$status"
}

# GPUs: whatever Slurm allocated to the node (submit with --gres=gpu:N, or export SBATCH_GRES=gpu:N), unless
# GPUS_PER_NODE says otherwise. No GPU: one CPU process per node (gloo), e.g. on a CPU-only test cluster.
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
if [ "$GPUS_PER_NODE" -eq 0 ]; then
  echo "no GPU allocated (submit with --gres=gpu:N for GPUs): one CPU process per node"
  export ACCELERATE_USE_CPU=1
fi
export PROCESSES_PER_NODE=$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))
