#!/usr/bin/env bash
# One call on the GPU machine; logs and results under $OUT, a short summary printed last.
#   bash scripts/gpu_run.sh bench    # python -m bench (all shapes) + numerics report, real sizes
#   bash scripts/gpu_run.sh tests    # every gpu-marked test of both halves and both suites
#   bash scripts/gpu_run.sh tune     # sweep the Triton launch parameters (scripts/tune_torch.py)
#   bash scripts/gpu_run.sh tune-jax # sweep the Pallas launch parameters (scripts/tune_jax.py)
#   bash scripts/gpu_run.sh carveout # both kernels under JAX's cache split (scripts/carveout_check.py)
#   bash scripts/gpu_run.sh parity   # Pallas against Triton kernels, both by CUPTI (kernel_parity.py)
# Wheels missing on the GPU image (Liger-Kernel) travel in .whl/ (git-ignored).
set -u
mode=${1:-tests}
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
summary=()
step() {  # step NAME LOGFILE COMMAND...
    local name=$1 log=$2 t0=$SECONDS rc
    shift 2
    "$@" > "$OUT/$log" 2>&1
    rc=$?
    summary+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" $((SECONDS - t0)) "$(tail -n 1 "$OUT/$log")")")
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import sys, torch, triton, jax, flax; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'jax', jax.__version__, 'flax', flax.__version__)"
} > "$OUT/env.txt" 2>&1
case $mode in
    bench)
        step bench bench.log python3 -m bench --out "$OUT/bench"
        step numerics numerics.log python3 -m tests.numerics --real-sizes --out "$OUT/numerics"
        ;;
    tests)
        step gpu-tests pytest_gpu.log python3 -m pytest -q -m gpu -p no:cacheprovider tests
        grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" | head -n 20
        ;;
    tune)
        step tune tune.log python3 scripts/tune_torch.py
        ;;
    tune-jax)
        step tune-jax tune_jax.log python3 scripts/tune_jax.py
        ;;
    carveout)
        step carveout carveout.log python3 scripts/carveout_check.py
        cat "$OUT/carveout.log"
        ;;
    parity)
        step parity parity.log python3 scripts/kernel_parity.py
        cat "$OUT/parity.log"
        ;;
esac
cat "$OUT/env.txt"
printf '%s\n' "${summary[@]}"
