#!/bin/bash
# Train GPT-2 with FSDP and activation capture on a SLURM (or PBS) cluster.
#
#   sbatch slurm/fsdp_capture.sh --config configs/gpt2.toml --data DIR --run-dir runs/NAME
#   sbatch --nodes=4 --time=2-00:00:00 -J big slurm/fsdp_capture.sh --config ...   # any #SBATCH default
#   sbatch -p cpu --gpus-per-node=0 --nodes=1 --ntasks-per-node=2 slurm/fsdp_capture.sh ...  # CPU, gloo
#   qsub -v TRAIN_ARGS="--config configs/gpt2.toml --run-dir runs/NAME" slurm/fsdp_capture.sh      # PBS
#
# Arguments after the script go to `python -m trainer` (TRAIN_ARGS, split on spaces, is
# added before them). One torchrun per node (srun), c10d rendezvous on the first node,
# one rank per GPU; with no GPUs, one rank per task (--ntasks-per-node), gloo.
#
# Logs: SLURM opens the job's output before this script runs and cannot create folders,
# so it starts in %x-%j.out in the submit dir; as soon as the run dir is known the log
# moves to RUN_DIR/logs/%x-%j.out (appended to on every requeue) and the first file keeps
# one line pointing there. A --output of your own is left alone. Under PBS the live log is
# RUN_DIR/logs/NAME-ID.out with the first job's ID: every resubmitted job appends to it.
#
# Time limits and preemption: SLURM sends SIGUSR2 to this shell 300 s before the limit
# (--signal=B:USR2@300; USR2 because NCCL may use USR1). It is passed to every rank, the
# ranks agree to stop at the next step boundary, save a checkpoint and exit 0, and the job
# requeues itself (scontrol requeue) at most MAX_REQUEUES times. The rerun appends to the
# same log and resumes from the latest checkpoint into the same run dir and capture store.
# A preempting SIGTERM (GraceTime) reaches torchrun and the ranks together; the ranks
# checkpoint the same way. torchrun passes it on and then kills its ranks SAVE_TIMEOUT
# seconds later (torchrun --shutdown-timeout; torch's own default, 30 s, would cut a longer
# save short): the default, 300, is the margin --signal=B:USR2@300 gives a time-limit stop,
# so a save that fits one fits the other (raise both together). The cluster's GraceTime
# still caps it. torchrun exits 1 after such a stop, with a SignalException traceback, even
# though its ranks exited 0: the run's status.json decides. Requeueing is then up to the
# cluster's PreemptMode (exit 3 here). (torchrun stops the other ranks the same way when
# one crashes: a rank stuck in a collective then holds a failed job up to SAVE_TIMEOUT.)
#
# PBS: at the walltime PBS sends SIGTERM; the ranks stop at a checkpoint the same way and
# the job resubmits itself with qsub (--resume, the same name and queue), at most
# MAX_REQUEUES times; the count travels in qsub -v REQUEUE_COUNT, as do TRAIN_ARGS and the
# settings below that the job was given (all of its environment, where #PBS -V is
# honoured). (qrerun would keep the job id, but needs operator or manager rights on most
# PBS sites.) Resources given on the first qsub's command line (-l select=..., -A project)
# are not visible to the job: put them in QSUB_ARGS as well. qdel sends the same SIGTERM,
# so a job you qdel checkpoints and resubmits itself once more: qdel the new one too (it
# is queued), or submit with MAX_REQUEUES=0.
#
# Exit status: 0 finished, requeued or resubmitted; 2 bad arguments; 3 stopped with a
# checkpoint but not requeued (cap reached, or stopped by someone else); otherwise the
# trainer's failure.
#
# A lost node (its ranks killed, a crash): the other ranks' next collective fails, each says
# so in one line, srun (--kill-on-bad-exit) ends the step and the job fails, not requeued:
# this script cannot tell a lost node from a bug that would fail again. Resubmit with
# --resume; the run continues from the last complete checkpoint. A node that goes down
# altogether (slurmd too) SLURM itself marks DOWN and, the job being --requeue, requeues:
# the rerun resumes by itself (SLURM_RESTART_COUNT > 0 adds --resume).
#
# Environment: VENV (a virtualenv to activate), PYTHON, TORCHRUN, NPROC_PER_NODE (ranks per
# node), MAX_REQUEUES (default 20), SAVE_TIMEOUT (seconds, default 300), RDZV_PORT (default
# 29500 + job id % 1000), OMP_NUM_THREADS (default: the node's CPUs / ranks per node),
# TRAIN_ARGS; PBS: QSUB_ARGS (extra qsub options for the resubmission, split on spaces).
# REQUEUE_COUNT and FIRST_JOB_ID are the PBS resubmission's own (which requeue this is, and
# whose log to append to).
# (--ignore-pbs: sbatch would otherwise also read the #PBS lines below.)
# NCCL on GPU clusters: NCCL_SOCKET_IFNAME (the interface between nodes, e.g. ib0 or
# eth0), NCCL_IB_HCA (which InfiniBand adapters), NCCL_DEBUG=INFO (to see the transport
# chosen; default WARN); TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (the default here) so a rank
# that fails takes the job down instead of hanging it until the 30-minute timeout.
#
#SBATCH --ignore-pbs
#SBATCH --job-name=fsdp-capture
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR2@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
#PBS -N fsdp-capture
#PBS -l select=2:ncpus=32:ngpus=8:mpiprocs=8
#PBS -l walltime=24:00:00
#PBS -j oe
#PBS -V

set -uo pipefail  # no -e: the end of the script decides on the exit status and requeue

log() { echo "[$(date '+%F %T')] fsdp_capture: $*"; }
fail() { local code=$1; shift; log "error: $*"; exit "$code"; }

if [[ -n ${SLURM_JOB_ID:-} ]]; then
    SCHED=slurm JOB_ID=$SLURM_JOB_ID JOB_NAME=$SLURM_JOB_NAME SUBMIT_DIR=$SLURM_SUBMIT_DIR
    FIRST_JOB_ID=$SLURM_JOB_ID  # a requeue keeps the job id
elif [[ -n ${PBS_JOBID:-} ]]; then
    SCHED=pbs JOB_ID=${PBS_JOBID%%.*} JOB_NAME=${PBS_JOBNAME:-fsdp-capture}
    SUBMIT_DIR=${PBS_O_WORKDIR:-$PWD}
    FIRST_JOB_ID=${FIRST_JOB_ID:-$JOB_ID}  # a resubmission gets a new id: set by the first
else
    echo "fsdp_capture.sh is a batch script: submit it with 'sbatch slurm/fsdp_capture.sh ARGS'" \
         "(SLURM) or 'qsub slurm/fsdp_capture.sh' (PBS)" >&2
    exit 2
fi
cd "$SUBMIT_DIR" || fail 2 "cannot enter the submit dir $SUBMIT_DIR"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)
# SLURM runs a spooled copy of this script; the repo is the submit dir then.
[[ -f $REPO/slurm/mpi_rank.sh ]] || REPO=$SUBMIT_DIR
if [[ -n ${VENV:-} ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate" || fail 2 "VENV=$VENV has no bin/activate"
fi
# What the job was given of this script's settings: a PBS resubmission passes it on.
GIVEN=()
for var in VENV PYTHON TORCHRUN NPROC_PER_NODE RDZV_PORT MPIEXEC MPIEXEC_ARGS QSUB_ARGS; do
    [[ -n ${!var+set} ]] && GIVEN+=("$var")
done
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
MAX_REQUEUES=${MAX_REQUEUES:-20}
SAVE_TIMEOUT=${SAVE_TIMEOUT:-300}
# Checked here: bash arithmetic would read a typo as 0, or run it as an expression.
for var in MAX_REQUEUES SAVE_TIMEOUT REQUEUE_COUNT; do
    [[ ${!var:-0} =~ ^[0-9]+$ ]] || fail 2 "$var must be a whole number, not '${!var}'"
done
if [[ $SCHED == slurm ]]; then RESTARTS=${SLURM_RESTART_COUNT:-0}
else RESTARTS=${REQUEUE_COUNT:-0}; fi

# shellcheck disable=SC2206  # TRAIN_ARGS is split on spaces on purpose
ARGS=(${TRAIN_ARGS:-} "$@")
if ((RESTARTS > 0)) && [[ " ${ARGS[*]} " != *" --resume "* ]]; then
    ARGS+=(--resume)  # a requeued job continues from its latest checkpoint
fi

# Check the arguments before any node starts: a bad one fails here, in seconds.
RUN_DIR=$("$PYTHON" -m trainer --print-run-dir "${ARGS[@]}") ||
    fail 2 "the trainer refused these arguments: ${ARGS[*]}"
mkdir -p "$RUN_DIR/logs" || fail 2 "cannot create $RUN_DIR/logs"

move_log() {
    local dest=$RUN_DIR/logs/$JOB_NAME-$FIRST_JOB_ID.out cur
    if [[ $SCHED == pbs ]]; then  # PBS copies its own file back at the end; keep a live copy
        exec > >(tee -a "$dest") 2>&1
        return 0
    fi
    cur=$(readlink -f /proc/$$/fd/1)
    [[ $cur == "$(readlink -f "$SUBMIT_DIR")/$JOB_NAME-$JOB_ID.out" ]] || return 0
    [[ $cur == "$(readlink -f "$dest")" ]] && return 0
    grep -v '^log: ' "$cur" >>"$dest"  # what came before this point (this job's earlier runs too)
    echo "log: $dest" >"$cur"
    exec >>"$dest" 2>&1
}
move_log

if [[ $SCHED == slurm ]]; then
    NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || fail 2 "scontrol show hostnames failed"
    NNODES=$SLURM_JOB_NUM_NODES
    GPUS=${SLURM_GPUS_ON_NODE:-0}
    CPUS=${SLURM_CPUS_ON_NODE:-$(getconf _NPROCESSORS_ONLN)}
    DEFAULT_NPROC=$(( GPUS > 0 ? GPUS : ${SLURM_NTASKS_PER_NODE:-1} ))
else
    NODES=$(sort -u "$PBS_NODEFILE") || fail 2 "cannot read PBS_NODEFILE=$PBS_NODEFILE"
    NNODES=$(wc -l <<<"$NODES")
    GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
    CPUS=${NCPUS:-$(getconf _NPROCESSORS_ONLN)}
    DEFAULT_NPROC=$(( GPUS > 0 ? GPUS : 1 ))
fi
HEAD=$(head -n1 <<<"$NODES")
NPROC_PER_NODE=${NPROC_PER_NODE:-$DEFAULT_NPROC}
PORT=${RDZV_PORT:-$((29500 + 10#$JOB_ID % 1000))}
THREADS=$(( CPUS / NPROC_PER_NODE > 0 ? CPUS / NPROC_PER_NODE : 1 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export PYTHONUNBUFFERED=1

RESTART_WORDS=""
[[ $SCHED == slurm ]] && RESTART_WORDS=", restart $RESTARTS (SLURM_RESTART_COUNT; at most $MAX_REQUEUES requeues)"
[[ $SCHED == pbs ]] && RESTART_WORDS=", resubmission $RESTARTS of job $FIRST_JOB_ID (REQUEUE_COUNT; at most $MAX_REQUEUES)"
log "$SCHED job $JOB_ID ($JOB_NAME)$RESTART_WORDS: $NNODES node(s) x $NPROC_PER_NODE" \
    "rank(s), $GPUS GPU(s) per node, $OMP_NUM_THREADS thread(s) per rank, rendezvous" \
    "$HEAD:$PORT, run dir $RUN_DIR"
log "python -m trainer ${ARGS[*]}"

STOP_SIGNAL=""
# shellcheck disable=SC2317  # called from the traps
pass_on() {
    STOP_SIGNAL=$1
    log "got SIG$1: asking every rank to save a checkpoint at the next step boundary and stop"
    # srun passes USR2 to every process of the step: torchrun ignores it (below), the
    # ranks catch it. mpiexec (Hydra) would die of USR2 but passes TERM on to the ranks.
    if [[ $SCHED == slurm ]]; then kill -s USR2 "$LAUNCHER" 2>/dev/null
    else kill -s TERM "$LAUNCHER" 2>/dev/null; fi
}
trap 'pass_on USR2' USR2
trap 'pass_on USR1' USR1
trap 'pass_on TERM' TERM

if [[ $SCHED == slurm ]]; then
    # One torchrun per node. torchrun has no handler for USR1/USR2 and would die of them:
    # it ignores them, and the ranks (which install their own handlers) get them. A TERM
    # (preemption) it passes on, then SIGKILLs the ranks --shutdown-timeout seconds later:
    # SAVE_TIMEOUT, not torch's 30 s, so the checkpoint they are writing is not cut short.
    srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS" \
        --kill-on-bad-exit=1 \
        bash -c 'trap "" USR1 USR2; exec "$@"' torchrun \
        "$TORCHRUN" --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" --max-restarts=0 \
        --shutdown-timeout="$SAVE_TIMEOUT" \
        --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$JOB_ID" \
        -m trainer "${ARGS[@]}" &
else
    # One process per rank; slurm/mpi_rank.sh maps the MPI rank variables to torch's.
    # MPIEXEC_ARGS overrides the placement flags (Open MPI: --map-by ppr:N:node).
    # shellcheck disable=SC2206
    PLACE=(${MPIEXEC_ARGS:--n $((NNODES * NPROC_PER_NODE)) -ppn $NPROC_PER_NODE})
    ${MPIEXEC:-mpiexec} "${PLACE[@]}" env MASTER_ADDR="$HEAD" MASTER_PORT="$PORT" \
        "$REPO/slurm/mpi_rank.sh" "$PYTHON" -m trainer "${ARGS[@]}" &
fi
LAUNCHER=$!
LAUNCHED_AT=$(date +%s)  # a status.json older than this is an earlier run's
while true; do
    wait "$LAUNCHER"; rc=$?
    # A trapped signal interrupts wait (status > 128) while the ranks are still running.
    ((rc > 128)) && kill -0 "$LAUNCHER" 2>/dev/null && continue
    break
done

STATUS=$(sed -n 's/.*"status": "\([a-z]*\)".*/\1/p' "$RUN_DIR/status.json" 2>/dev/null)
STEP=$(sed -n 's/.*"step": \([0-9]*\).*/\1/p' "$RUN_DIR/status.json" 2>/dev/null)
STOPPED_ON=$(sed -n 's/.*"signal": "\([A-Z0-9]*\)".*/\1/p' "$RUN_DIR/status.json" 2>/dev/null)
WRITTEN=$(sed -n 's/.*"time": \([0-9]*\).*/\1/p' "$RUN_DIR/status.json" 2>/dev/null)
if ((rc == 0)) && [[ $STATUS == finished ]]; then
    log "training finished at step $STEP"
    exit 0
fi
# The ranks write "stopped" only once every rank's part of the checkpoint is on disk. A
# launcher that got the signal itself still fails (torchrun exits 1 after passing a TERM on):
# a "stopped" written by this run counts, whatever the launcher's exit status.
if [[ $STATUS == stopped ]] && ((rc == 0 || ${WRITTEN:-0} >= LAUNCHED_AT)); then
    ((rc == 0)) || log "the ranks stopped at a checkpoint; the launcher exited $rc" \
                       "(torchrun does when the stop signal reached it too)"
    if [[ $SCHED == slurm && ( $STOP_SIGNAL == USR2 || $STOP_SIGNAL == USR1 ) ]]; then
        if ((RESTARTS < MAX_REQUEUES)); then
            log "checkpoint saved at step $STEP; requeueing (restart $((RESTARTS + 1)) of at most $MAX_REQUEUES)"
            scontrol requeue "$JOB_ID" && exit 0
            fail 3 "scontrol requeue $JOB_ID failed; resubmit with --resume to continue"
        fi
        fail 3 "checkpoint saved at step $STEP; not requeued: $MAX_REQUEUES requeues reached" \
             "(MAX_REQUEUES). Resubmit with --resume to continue"
    fi
    # PBS: the walltime's SIGTERM (or a qsig) reached this shell. A new job, since qrerun
    # needs manager rights; it takes its settings from -v (the rest of this job's
    # environment travels too where #PBS -V is honoured).
    if [[ $SCHED == pbs && -n $STOP_SIGNAL ]]; then
        if ((RESTARTS < MAX_REQUEUES)); then
            SELF=$REPO/slurm/fsdp_capture.sh
            RESUME_ARGS=("${ARGS[@]}")
            [[ " ${ARGS[*]} " == *" --resume "* ]] || RESUME_ARGS+=(--resume)
            # shellcheck disable=SC2206  # QSUB_ARGS is split on spaces on purpose
            QSUB=(qsub -N "$JOB_NAME" ${PBS_O_QUEUE:+-q "$PBS_O_QUEUE"} ${QSUB_ARGS:-})
            # Bare names in -v take their values from qsub's environment: no quoting of
            # the commas -v would otherwise split a value on.
            PASS=TRAIN_ARGS,REQUEUE_COUNT,FIRST_JOB_ID,MAX_REQUEUES,SAVE_TIMEOUT
            for var in "${GIVEN[@]}"; do PASS+=",$var"; done
            NEW=$(TRAIN_ARGS="${RESUME_ARGS[*]}" REQUEUE_COUNT=$((RESTARTS + 1)) \
                  FIRST_JOB_ID=$FIRST_JOB_ID MAX_REQUEUES=$MAX_REQUEUES SAVE_TIMEOUT=$SAVE_TIMEOUT \
                  "${QSUB[@]}" -v "$PASS" "$SELF") &&
                { log "checkpoint saved at step $STEP; resubmitted as job $NEW (resubmission" \
                      "$((RESTARTS + 1)) of at most $MAX_REQUEUES); it appends to this log"; exit 0; }
            fail 3 "qsub failed to resubmit $SELF; resubmit with --resume to continue"
        fi
        fail 3 "checkpoint saved at step $STEP; not resubmitted: $MAX_REQUEUES resubmissions" \
             "reached (MAX_REQUEUES). Resubmit with --resume to continue"
    fi
    ON=${STOP_SIGNAL:+SIG$STOP_SIGNAL}
    ON=${ON:-$STOPPED_ON}  # the signal reached the ranks only (not this shell): theirs
    fail 3 "stopped at step $STEP${ON:+ on $ON} with a checkpoint; resubmit with --resume" \
         "to continue"
fi
fail "$(( rc == 0 ? 1 : rc ))" "the trainer failed (launcher exit $rc, run status" \
    "${STATUS:-unknown}); see above"
