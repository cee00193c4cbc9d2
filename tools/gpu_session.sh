#!/usr/bin/env bash
# Every measurement this project wants from a lent GPU, as steps of a few minutes each:
#   1. the paged-attention kernels: ours vs JAX's bundled Pallas kernel vs the XLA gather, as KV bandwidth
#      against the measured copy bandwidth (tools/bench_kernels.py);
#   2. the 8B decode step's HLO on the GPU pipeline and its time with fused vs separate projections
#      against the bandwidth floor (tools/inspect_hlo.py --time);
#   3. the sampler's share of an 8B decode step at vocab 128,256, waited for call by call and pipelined;
#   4. the engine's TPOT against the device step on the demo model at batch 8 (what the host adds), with
#      a stack-sampled profile of the decode thread (tools/host_profile.py);
#   5. the Engine against the plain jitted JAX loop at Llama-3-8B shape, random bf16 weights, batch 1 and 16
#      (tools/bench_engine.py peers; HF is left out: 16 GB of safetensors to write first).
# On the H200 (2026-11-27, two runs) steps 3-5 took 115-132, 97-109 and 253-303 s: all five need more
# than one device call's 10 minutes, so pick them with STEPS (default: all, in the order above), e.g.
# STEPS="sampling overhead peers" in one call. Each step has its own time limit, so a hang costs only its
# share; logs and JSON land in $OUT (the device tool's folder that comes back) or ./gpu-out. CONFIG and KERNEL_SHAPES shrink it for
# a CPU smoke run:
#   CONFIG=llama-124m KERNEL_SHAPES=small OUT=/tmp/gpu-out bash tools/gpu_session.sh
set -u
out=${OUT:-gpu-out}
config=${CONFIG:-llama3-8b}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

# The device image has jax, flax, orbax and grpcio but not this project: lay the package out as
# pyproject.toml maps it (kernels/ and meshes/ under jdisagg.) instead of a pip install that needs a registry.
site=$(mktemp -d)
cp -r jdisagg "$site/jdisagg" && cp -r kernels "$site/jdisagg/kernels" && cp -r meshes "$site/jdisagg/meshes"
export PYTHONPATH="$site"

steps=" ${STEPS:-kernels hlo sampling overhead peers} "

step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    [[ $steps == *" $name "* ]] || { echo "== $name: skipped (STEPS)"; return; }
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    grep -v "Warning\|warn(" "$out/$name.log" | tail -n 30
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
$py -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
step kernels 120 $py tools/bench_kernels.py --shapes "${KERNEL_SHAPES:-full}" --json "$out/kernels.json"
# Our Triton kernel is the engine's attention on GPU; if it failed above, the engine runs the XLA reference.
backend=()
if grep -q "^ours\[gpu\] .*failed" "$out/kernels.log" 2>/dev/null; then
    backend=(--attention-backend reference)
    echo "our GPU kernel failed in the kernel benchmark: the engine runs the XLA reference attention"
fi
step hlo 150 $py tools/inspect_hlo.py --config "$config" --dtype bfloat16 --time --json "$out/hlo.json"
step sampling 170 $py tools/bench_engine.py sampling --config "$config" --dtype bfloat16 --batch 16 \
    --json "$out/sampling.json"
step overhead 150 $py tools/bench_engine.py overhead --batch 8 --profile-host "${backend[@]}" \
    --json "$out/overhead.json"
step peers 330 $py tools/bench_engine.py peers --config "$config" --dtype bfloat16 --batch 1,16 --no-hf \
    --compile-cache "$(mktemp -d)" "${backend[@]}" --json "$out/peers.json"
