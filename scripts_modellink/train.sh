#!/usr/bin/env bash
# Stage script: distributed training. Run by `ascendfactory-cli train`, which sets the AF_* variables.
# Copy this folder and point `scripts_dir` at the copy to customise the environment of a site.
set -e
if [ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ]; then
  # shellcheck disable=SC1091
  source /usr/local/Ascend/ascend-toolkit/set_env.sh
fi
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# Seconds torchrun waits after forwarding SIGTERM before SIGKILL (torch >= 2.9 reads it; older ones use 30).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-${AF_SHUTDOWN_TIMEOUT:-90}}
if [ "$AF_DEVICE" = "cpu" ]; then
  # Each worker gets its share of the cores instead of all of them (oversubscription is slow).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
mkdir -p "$AF_LOG_DIR/torchrun"
# exec: torchrun replaces this shell, so it is `train`'s child and stops when `train` dies. The agent is torchrun
# (same arguments) that does not restart a worker's bad input and records the root cause of a failure.
exec "${AF_PYTHON:-python3}" -m ascendfactory.launch.agent \
  --nnodes "$AF_NNODES" --node_rank "$AF_NODE_RANK" --nproc_per_node "$AF_NPROC_PER_NODE" \
  --master_addr "$AF_MASTER_ADDR" --master_port "$AF_MASTER_PORT" \
  --max_restarts "$AF_MAX_RESTARTS" \
  --log_dir "$AF_LOG_DIR/torchrun" --redirects 3 --tee 3 \
  -m ascendfactory.engine --config "$AF_CONFIG"
