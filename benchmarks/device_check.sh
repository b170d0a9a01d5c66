#!/usr/bin/env bash
# The GPU checks of issues 10 and 13, as one command for a lent GPU machine (the device tool:
# its image has torch, transformers and safetensors; nothing can be installed there).
#
#   run(command="bash benchmarks/device_check.sh", timeout_s=480)
#
# Each part has its own time limit and writes its log under $OUT, and a part that fails does
# not stop the next one. BENCHMARKS.md comes back whole in $OUT: copy its new sections
# (quant-kernels-cuda, decode-llama-1b-random-cuda, decode-llama-1b-random-speculative-cuda,
# train-throughput-code-llama-tiny-cuda)
# into the checkout's. Runs from the repository root; slimline from src/ (not installed).
set -u
OUT=${OUT:-/tmp/slimline-device}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD" PYTHONUNBUFFERED=1 SLIMLINE_CACHE=/tmp/slimline-cache
PY=${PYTHON:-python3}

part() {  # part NAME SECONDS COMMAND...: run one check, its output to $OUT/NAME.log
  local name=$1 seconds=$2
  shift 2
  echo "== $name (limit ${seconds} s)"
  local start=$SECONDS
  timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - start)) s"
  tail -n 30 "$OUT/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, transformers, sys; print(sys.version.split()[0], 'torch', torch.__version__,
torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name(0),
torch.cuda.get_device_capability(0))"
} 2>&1 | tee "$OUT/env.log"

# 1. Kernels: every CUDA path against the textbook product (error column), then timed.
part kernels 100 $PY -m benchmarks.cuda_check --runs 20

# 2. Issue 13's decode table on CUDA: 256 new tokens, batch 1, greedy, llama-1b-random.
part decode 170 $PY -m benchmarks.decode --device cuda --model llama-1b-random \
  --rows fp32,bf16,int8,int8-half,int4,int4-half --quantize-head --new-tokens 256 \
  --runs 3 --bandwidth-mib 8192 --memory

# 3. The same rows with their prompt-lookup speculative twins (a section of their own, so
#    that a failure here leaves part 2's table).
part speculative 100 $PY -m benchmarks.decode --device cuda --model llama-1b-random \
  --rows bf16,int8-half,int4-half --quantize-head --speculative prompt_lookup \
  --new-tokens 256 --runs 3 --bandwidth-mib 8192 --section-suffix=-speculative

# 4. Issue 10 on one GPU: the training loop on CUDA (fp32 / bf16 autocast, with and without
#    checkpointing) on code-llama-tiny's small size (built there in seconds): a check that the
#    loop runs on the GPU, not a throughput figure (the model is tiny). NCCL and FSDP2 need two
#    GPUs or more; this machine has one.
part train 60 $PY -m benchmarks.train_throughput --device cuda --size small --steps 4 --rounds 2

cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
