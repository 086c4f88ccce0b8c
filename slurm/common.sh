# Shared by train.sbatch and train_multinode.sbatch (sourced, not run): environment and the
# requeue-on-preemption logic. The sbatch script sets REPO_DIR, VENV and CONFIG before sourcing.
# shellcheck shell=bash

: "${REPO_DIR:?set REPO_DIR (the ds_accel checkout) before sourcing common.sh}"
: "${VENV:?set VENV (the virtual environment with ds_accel installed) before sourcing common.sh}"

cd "$REPO_DIR" || exit 1
# shellcheck source=/dev/null
source "$VENV/bin/activate"

# NCCL: fail a hung collective (so the job ends and can be requeued) instead of waiting forever,
# and say why in the log. Site-specific fabric settings go here too, e.g.
#   export NCCL_SOCKET_IFNAME=ib0    NCCL_IB_HCA=mlx5
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
# Compute nodes are usually offline: models and tokenizers come from local paths in the config.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

# SLURM sends USR1 (--signal=B:USR1@300) to this batch shell five minutes before the time limit, and
# at pre-emption where the cluster sets PreemptParameters=send_user_signal: requeue the job, which
# restarts it under the same job id; the launcher then adds --resume because a checkpoint pointer
# exists. Steps since the last checkpoint are redone: keep run.save_every short.
requeue() {
    echo "$(date -Is) caught USR1: requeueing job ${SLURM_JOB_ID}" >&2
    scontrol requeue "$SLURM_JOB_ID"
}

# Start one launcher per node and wait for it. srun runs in the background because bash runs a
# trap only between commands: `wait` returns as soon as USR1 arrives, and the trap requeues.
run_training() {
    echo "$(date -Is) job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}" >&2
    trap requeue USR1
    srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" \
        --kill-on-bad-exit=1 \
        ds-accel launch --config "$CONFIG" -- "$@" &
    wait "$!"
}
