#!/usr/bin/env bash
# One call on the GPU machine; logs and results packed in $OUT/all.tgz (at most 8 files come
# back from a call), a short summary printed last.
#   bash scripts/gpu_run.sh bench    # python -m bench (all shapes) + numerics report, real sizes
#   bash scripts/gpu_run.sh tests    # every gpu-marked test of both halves and both suites,
#                                    # and the small Mosaic GPU cases compiled, in parallel
#                                    # processes (none of them times anything but tests/bench's
#                                    # smoke run, which runs last, alone)
#   bash scripts/gpu_run.sh narrow   # python -m bench at widths Mosaic GPU serves with loads
#                                    # narrower than 16 bytes (both accel_jax backends)
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
RUN=$(mktemp -d)  # packed into $OUT/all.tgz at the end
step() {  # step NAME LOGFILE COMMAND... (a line in summary.txt; may run in the background)
    local name=$1 log=$2 t0=$SECONDS rc
    shift 2
    # STEP_TIMEOUT (seconds): each step stopped by then, so the logs still come back
    timeout "${STEP_TIMEOUT:-0}" "$@" > "$RUN/$log" 2>&1
    rc=$?
    printf '%-12s rc=%-3s %4ss  %s\n' "$name" "$rc" $((SECONDS - t0)) \
        "$(tail -n 1 "$RUN/$log")" >> "$RUN/summary.txt"
}
PYTEST="python3 -X faulthandler -m pytest -q -rfE -p no:cacheprovider --durations=10 -m gpu"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import sys, torch, triton, jax, flax; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'jax', jax.__version__, 'flax', flax.__version__)"
} > "$RUN/env.txt" 2>&1
case $mode in
    bench)
        step bench bench.log python3 -m bench --out "$RUN/bench"
        step numerics numerics.log python3 -m tests.numerics --real-sizes --out "$RUN/numerics"
        ;;
    tests)
        # the cases of 2^32-byte arrays in a process of their own; the rest side by side
        step jax-2pow31 jax_2pow31.log $PYTEST tests/jax/test_gpu.py -k 2_pow_31 &
        step jax jax.log $PYTEST tests/jax -k "not 2_pow_31" &
        step torch torch.log $PYTEST tests/torch &
        step numerics numerics.log $PYTEST tests/numerics &
        # the small Mosaic GPU cases (unmarked: interpreted on a CPU), compiled here
        step mgpu-small mgpu_small.log python3 -m pytest -q -rfE -p no:cacheprovider \
            -m "not gpu" -k "small or mosaic_gpu" tests/jax/test_mgpu_values.py \
            tests/numerics/test_parity.py &
        wait
        # NO_BENCH_TESTS=1: leave out the bench's own tests (when the bench runs next anyway)
        [ -n "${NO_BENCH_TESTS:-}" ] || step bench-tests bench_tests.log $PYTEST tests/bench
        grep -hE "^(FAILED|ERROR)|Fatal Python" "$RUN"/*.log | head -n 20
        ;;
    narrow)
        step narrow narrow.log python3 -m bench --no-host-overhead \
            --impls accel_jax,accel_jax_triton,accel_jax_mgpu,jax_xla,accel_torch \
            --shapes 4096x2880,8192x896,4096x1152,8192x576,65536x128,65536x64 --out "$RUN/narrow"
        ;;
    tune)
        step tune tune.log python3 scripts/tune_torch.py
        ;;
    tune-jax)
        step tune-jax tune_jax.log python3 scripts/tune_jax.py
        ;;
    carveout)
        step carveout carveout.log python3 scripts/carveout_check.py
        cat "$RUN/carveout.log"
        ;;
    parity)
        step parity parity.log python3 scripts/kernel_parity.py
        cat "$RUN/parity.log"
        ;;
esac
tar czf "$OUT/all.tgz" -C "$RUN" .
cat "$RUN/env.txt" "$RUN/summary.txt"
echo "logs and results: $OUT/all.tgz"
