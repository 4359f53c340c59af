#!/usr/bin/env bash
# The checks to run on a machine with an NVIDIA GPU, in one go (under 9 minutes): the
# CUDA paths no CPU machine exercises (mixed precision, reanalysis and collector searches in
# the learner process) and the figures the README asks for. Run from the repository root
# in an environment where `pip install -e .` works and torch sees the GPU:
#     bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())"
python -c "import ezengine_core.mcts" 2>/dev/null || pip install -q -e . || exit 1

step "tests that take the CUDA path when a GPU is present"
timeout 240 python -m pytest -q -x tests/test_learner.py tests/test_model.py

step "pipeline throughput on CUDA, 60 s each (reanalysis in the learner: placement auto)"
timeout 150 python benchmarks/bench_pipeline.py --seconds 60 --only cartpole \
    --set run.device=cuda
# The paper's Atari settings (batch 256, 50 simulations, 8 environments): the real cost.
timeout 150 python benchmarks/bench_pipeline.py --seconds 60 --only atari --atari-set \
    --set run.device=cuda --set run.collector_inference=learner

step "CartPole on CUDA, the default config (stopped at 4 minutes)"
timeout 240 ezengine train configs/cartpole.yaml --device cuda --run-dir "$out/cartpole-cuda" \
    | grep -E "eval @|done in|stopped|Error"
echo "gpu_check done"
