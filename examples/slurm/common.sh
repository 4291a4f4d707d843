# Shared launch logic for the DeepSeek-V3 sbatch files (sourced, not run).
#
# The sbatch file sets: JOB_NAME, TP, PP, EP, SCHEDULE, MTP, MODEL_ARGS (array), TRAIN_ARGS
# (array), PLAN_ARGS (array, planner flags for the model) and optionally EXTRA_ARGS; then calls
# dsv3_main. Everything below is derived from SLURM (or, with DRY_RUN=1 and no SLURM, from
# defaults that match the #SBATCH header: DRY_NODES, DRY_GPUS_PER_NODE).
#
# Environment knobs: RUN_DIR (checkpoints + logs), DATA_PATH/TOKENIZER_MODEL (real data; else
# --mock-data), INIT_CKPT (converted weights for a fresh run), EXTRA_ARGS (array, or a string
# from the environment), NCCL_SOCKET_IFNAME, NCCL_IB_HCA, MASTER_PORT, PYTHON, DRY_RUN. Every
# numeric knob (TP, PP, EP, MTP, SAVE_INTERVAL, MASTER_PORT, DRY_NODES, ...) is checked first by
# dsv3_check_knobs: "error: NAME=value is invalid: allowed values are ..." and exit 2.

set -euo pipefail

PYTHON=${PYTHON:-python}

dsv3_require_int() {  # NAME MIN [MAX]: stop with the allowed values unless $NAME is such an integer
    local name=$1 min=$2 max=${3:-} value=${!1-}
    local allowed="integers >= $min"
    [[ -n "$max" ]] && allowed="integers in [$min, $max]"
    # digits only (no sign, no spaces, no 1.5, no 1e3), at most 18 so that bash cannot overflow
    if ! [[ "$value" =~ ^[0-9]{1,18}$ ]] || ((10#$value < min)) \
        || { [[ -n "$max" ]] && ((10#$value > max)); }; then
        echo "error: $name=$value is invalid: allowed values are $allowed" >&2
        exit 2
    fi
    printf -v "$name" '%d' "$((10#$value))"  # 08 -> 8: bash arithmetic would read it as octal
}

dsv3_check_knobs() {  # every number the sbatch file or the environment gives us, before any use
    local name
    for name in TP PP EP; do dsv3_require_int "$name" 1; done
    dsv3_require_int MTP 0
    SAVE_INTERVAL=${SAVE_INTERVAL:-500}
    dsv3_require_int SAVE_INTERVAL 1
    if [[ -n "${VOCAB_SIZE:-}" ]]; then dsv3_require_int VOCAB_SIZE 1; fi
    if [[ -n "${MASTER_PORT:-}" ]]; then dsv3_require_int MASTER_PORT 1 65535; fi
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then dsv3_require_int SLURM_JOB_ID 0; fi
    for name in SLURM_JOB_NUM_NODES SLURM_NNODES GPUS_PER_NODE SLURM_GPUS_ON_NODE; do
        if [[ -n "${!name:-}" ]]; then dsv3_require_int "$name" 1; fi
    done
    for name in DRY_NODES DRY_GPUS_PER_NODE; do  # the #SBATCH header's sizes, for dry runs
        if [[ "${DRY_RUN:-0}" == "1" || -n "${!name:-}" ]]; then dsv3_require_int "$name" 1; fi
    done
}

dsv3_topology() {
    if [[ -n "${SLURM_JOB_NODELIST:-}" && "${DRY_RUN:-0}" != "1" ]]; then
        mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    elif [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null; then
        mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    else  # dry run without SLURM: a fake node list of the header's size
        local n=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-$DRY_NODES}}
        NODES=()
        for ((i = 0; i < n; i++)); do NODES+=("$(printf 'node%04d' "$i")"); done
    fi
    NNODES=${#NODES[@]}
    GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE:-$DRY_GPUS_PER_NODE}}
    MASTER_ADDR=${MASTER_ADDR:-${NODES[0]}}
    # a port derived from the job id so two jobs sharing a head node do not collide
    MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
    WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
    if ((WORLD_SIZE % (TP * PP))); then
        echo "error: world size $WORLD_SIZE not divisible by TP*PP=$((TP * PP))" >&2; exit 2
    fi
    DP=$((WORLD_SIZE / (TP * PP)))
    # (experts without tensor parallelism, --expert-tensor-parallel-size 1: EP within DP x TP)
    if (((DP * TP) % EP)); then
        echo "error: EP=$EP must divide DP*TP=$((DP * TP))" >&2; exit 2
    fi
    export MASTER_ADDR MASTER_PORT NNODES GPUS_PER_NODE WORLD_SIZE
}

dsv3_environment() {
    # one CUDA stream queue per device so that TP/EP communication kernels are ordered
    # with the compute they overlap (required by Megatron's overlap options)
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0}
    export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5}
    export NCCL_IB_GID_INDEX=${NCCL_IB_GID_INDEX:-3}
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    export NCCL_IB_QPS_PER_CONNECTION=${NCCL_IB_QPS_PER_CONNECTION:-2}
    export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Transformer Engine: FP32 block scales unless the recipe asks for power-of-2 ones
    export NVTE_FP8_BLOCK_SCALING_FP32_SCALES=${NVTE_FP8_BLOCK_SCALING_FP32_SCALES:-1}
    export NVTE_FWD_LAYERNORM_SM_MARGIN=${NVTE_FWD_LAYERNORM_SM_MARGIN:-16}
    export NVTE_BWD_LAYERNORM_SM_MARGIN=${NVTE_BWD_LAYERNORM_SM_MARGIN:-16}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
    # torchrun waits this long for its ranks after forwarding SIGTERM before it SIGKILLs them
    # (default 30 s): long enough to finish the step and save (the signal comes 600 s early)
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-540}
}

dsv3_checkpoint_args() {
    RUN_DIR=${RUN_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/runs/$JOB_NAME}
    CKPT_DIR=$RUN_DIR/checkpoints
    CKPT_ARGS=(--save "$CKPT_DIR" --save-interval "${SAVE_INTERVAL:-500}" --ckpt-format torch_dist)
    # auto resume: Megatron writes latest_checkpointed_iteration.txt after every save
    if [[ -f "$CKPT_DIR/latest_checkpointed_iteration.txt" ]]; then
        CKPT_ARGS+=(--load "$CKPT_DIR")
        RESUME="resume from $CKPT_DIR (iteration $(cat "$CKPT_DIR/latest_checkpointed_iteration.txt"))"
    elif [[ -n "${INIT_CKPT:-}" ]]; then
        # a fresh run starting from converted weights (megatron_dsv3.checkpoint convert --to dist
        # --megatron-release): Megatron's --pretrained-checkpoint, read only while --load holds
        # nothing, so a requeued job resumes from its own checkpoints instead
        if [[ ! -f "$INIT_CKPT/latest_checkpointed_iteration.txt" ]]; then
            echo "error: INIT_CKPT=$INIT_CKPT has no latest_checkpointed_iteration.txt: Megatron" \
                 "would start from random weights; convert with --megatron-release" >&2
            exit 2
        fi
        CKPT_ARGS+=(--load "$CKPT_DIR" --pretrained-checkpoint "$INIT_CKPT")
        RESUME="fresh start from the weights in $INIT_CKPT"
    else
        RESUME="fresh start (no checkpoint in $CKPT_DIR)"
    fi
    # SIGTERM from preemption / time limit: Megatron saves and exits (--exit-signal-handler)
    CKPT_ARGS+=(--exit-signal-handler)
}

dsv3_data_args() {
    if [[ -n "${DATA_PATH:-}" ]]; then
        DATA_ARGS=(--data-path "$DATA_PATH" --tokenizer-type HuggingFaceTokenizer
                   --tokenizer-model "${TOKENIZER_MODEL:?set TOKENIZER_MODEL with DATA_PATH}"
                   --split 99990,8,2)
    else
        # NullTokenizer adds an end-of-document id: 129279 + 1 = DeepSeek-V3's 129280 rows
        DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size "${VOCAB_SIZE:-129279}")
    fi
}

dsv3_command() {  # the command node $1 runs (as an array in CMD)
    local node_rank=$1
    CMD=(torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$node_rank"
         --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
         -m megatron_dsv3.pretrain_gpt
         --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
         --expert-model-parallel-size "$EP" --expert-tensor-parallel-size 1
         --pipeline-schedule "$SCHEDULE"
         --ranks-per-node "$GPUS_PER_NODE"
         "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" "${CKPT_ARGS[@]}"
         --tensorboard-dir "$RUN_DIR/tensorboard" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
}

dsv3_requeue_trap() {
    # SLURM sends SIGUSR1 (--signal=B:USR1@600) 10 minutes before the time limit (and at
    # preemption where the cluster sets PreemptParameters=send_user_signal; otherwise preemption
    # sends SIGTERM to the ranks directly, Megatron's --exit-signal-handler saves, and SLURM's
    # PreemptMode decides about the requeue). On USR1: SIGTERM to the job's steps (not to srun,
    # which would turn it into SIGKILL of every task): each node's torchrun forwards it to its
    # ranks, Megatron's --exit-signal-handler saves a checkpoint and exits, torchrun waits
    # TORCH_ELASTIC_SHUTDOWN_TIMEOUT for that; then requeue. torchrun exits non-zero after a
    # forwarded SIGTERM even when every rank saved and exited 0 (it re-raises the signal), so
    # the step's status must not stop the trap under `set -e` before the requeue.
    trap 'echo "[dsv3] signal: checkpoint and requeue"; scancel --signal=TERM "$SLURM_JOB_ID";
          wait "$SRUN_PID" || true; scontrol requeue "$SLURM_JOB_ID"' USR1
}

dsv3_extra_args() {
    # EXTRA_ARGS: an array set in the sbatch file, or a string from the environment (bash cannot
    # export arrays), split into words like a command line
    if [[ "$(declare -p EXTRA_ARGS 2>/dev/null)" != "declare -a"* ]]; then
        read -r -a EXTRA_ARGS <<< "${EXTRA_ARGS:-}"
    fi
}

dsv3_main() {
    dsv3_extra_args
    dsv3_check_knobs
    dsv3_topology
    dsv3_environment
    dsv3_checkpoint_args
    dsv3_data_args
    if [[ "${DRY_RUN:-0}" == "1" ]]; then
        local r
        for ((r = 0; r < NNODES; r++)); do
            dsv3_command "$r"
            printf 'node %d %s: %s\n' "$r" "${NODES[$r]}" "${CMD[*]@Q}"
        done
        echo "summary: job=$JOB_NAME nodes=$NNODES gpus_per_node=$GPUS_PER_NODE world_size=$WORLD_SIZE tp=$TP pp=$PP ep=$EP dp=$DP schedule=$SCHEDULE master=$MASTER_ADDR:$MASTER_PORT $RESUME"
        echo "env: CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME NCCL_IB_HCA=$NCCL_IB_HCA TORCH_NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING"
        # the batch flags of TRAIN_ARGS and EXTRA_ARGS too (the last one counts, as for
        # Megatron): the planner checks the schedule's micro-batch count
        local i batch=() all=("${TRAIN_ARGS[@]}" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
        for ((i = 0; i < ${#all[@]}; i++)); do
            case "${all[$i]}" in
                --micro-batch-size|--global-batch-size) batch+=("${all[$i]}" "${all[$((i + 1))]}") ;;
            esac
        done
        "$PYTHON" -m megatron_dsv3.plan --nodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE" \
            --tp "$TP" --pp "$PP" --ep "$EP" --schedule "$SCHEDULE" --mtp "$MTP" \
            "${PLAN_ARGS[@]}" ${batch[@]+"${batch[@]}"} --placement-only
        return
    fi
    mkdir -p "$RUN_DIR"
    EXTRA_ARGS=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
    # arrays do not cross srun's environment: hand them over as `declare -p` text
    DSV3_STATE=$(declare -p NNODES GPUS_PER_NODE MASTER_ADDR MASTER_PORT TP PP EP SCHEDULE \
        MODEL_ARGS TRAIN_ARGS DATA_ARGS CKPT_ARGS RUN_DIR EXTRA_ARGS)
    export DSV3_STATE
    echo "[dsv3] $JOB_NAME: $NNODES nodes x $GPUS_PER_NODE GPUs, world $WORLD_SIZE, TP $TP PP $PP EP $EP DP $DP; $RESUME"
    # one srun task per node; each runs torchrun with its own node rank
    # shellcheck disable=SC2016
    # (srun does not take the job's --cpus-per-task since SLURM 22.05: given again, or torchrun,
    # its ranks and their data loaders share one or two CPUs)
    srun --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL \
        ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} bash -c '
        source "'"$DSV3_SLURM_DIR"'/common.sh"
        eval "$DSV3_STATE"
        dsv3_command "$SLURM_NODEID"
        exec "${CMD[@]}"' &
    SRUN_PID=$!
    dsv3_requeue_trap
    wait "$SRUN_PID"
}

# the directory of this file: sbatch copies the job script away, so prefer the submit dir
DSV3_SLURM_DIR=${DSV3_SLURM_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
export DSV3_SLURM_DIR
