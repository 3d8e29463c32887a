#!/usr/bin/env bash
# One call on the GPU machine: GPU tests of both halves, the numerics report at real sizes,
# the benchmark; logs under $OUT, a short summary printed last.
#   bash scripts/gpu_run.sh [tune]      (tune: also sweep the Triton launch parameters)
set -u
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
summary=()
step() {  # step NAME LOGFILE COMMAND...
    local name=$1 log=$2; shift 2
    local t0=$SECONDS
    "$@" > "$OUT/$log" 2>&1
    local rc=$?
    summary+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" $((SECONDS - t0)) "$(tail -n 1 "$OUT/$log")")")
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/env.txt"
python3 -c "import torch, triton, jax, flax; print('torch', torch.__version__, 'triton', triton.__version__, 'jax', jax.__version__, 'flax', flax.__version__)" >> "$OUT/env.txt" 2>&1
if [ "${1:-}" = tune ]; then
    step tune tune.log python3 scripts/tune_torch.py
fi
step gpu-tests pytest_gpu.log python3 -m pytest -q -m gpu -p no:cacheprovider tests
if [ -f tests/numerics/__main__.py ]; then
    step numerics numerics.log python3 -m tests.numerics --real-sizes --out "$OUT"
fi
if [ -f bench/__main__.py ] && [ "${1:-}" != tune ]; then
    step bench bench.log python3 -m bench --out "$OUT"
fi
cat "$OUT/env.txt"
grep -E "passed|failed|error" "$OUT/pytest_gpu.log" | tail -n 3
printf '%s\n' "${summary[@]}"
