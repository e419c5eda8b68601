#!/usr/bin/env bash
# The GPU check: on a CUDA machine, from the repository root, in about 5 minutes on one GPU:
#   bash bench/gpu_check.sh [OUT] [tests] [bench] [demo]     (no stage named: all three)
# 1. tests: the Triton backend against eager on CUDA (random shapes, every mode, granularity and
#    dtype, fused SGD, strided column slices and passes, coupled groups on real models);
# 2. bench: python -m pytest bench --device cuda, which writes bench/results/<gpu>-<date>.json;
# 3. demo: one whole `greg-fast demo` on CUDA.
# Logs and results land in OUT (default gpu-check/). The C++ extension works on CPU tensors only
# and is not built here (GREG_FAST_NO_EXT=1); each stage has its own time limit so that one slow
# stage cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
shift || true
stages=${*:-tests bench demo}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
failed=()

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/env.txt"

GREG_FAST_NO_EXT=1 $python -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
  || { cat "$out/install.log"; echo "install failed"; exit 1; }
$python -c "import greg_fast.kernels.greg_step, greg_fast, torch; from greg_fast.backend import backends; \
print(backends(torch.device('cuda')))" 2>&1 | tee -a "$out/env.txt"

run() {  # run NAME SECONDS COMMAND...: a stage under its own time limit, its output in OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start))s"
  [ $rc -eq 0 ] || failed+=("$name")
}

for stage in $stages; do
  case $stage in
    # -n 12: the kernels' specializations compile in parallel (pytest-xdist)
    tests) run tests 150 $python -m pytest -q -n 12 -p no:cacheprovider -o addopts="" \
             tests/test_backends.py tests/test_groups.py -k "triton or regularize_groups_like_eager" ;;
    # torch.compile's provider is left out: compiling five workloads takes minutes on its own
    bench) run bench 180 $python -m pytest -q -s -p no:cacheprovider bench --device cuda -k "not compile"
           cp bench/results/nvidia*"$(date -u +%F)".json "$out/" 2>/dev/null ;;
    demo)  run demo 100 $python -m greg_fast.cli demo --out "$out/demo-run"
           cp "$out"/demo-run/summary.json "$out/demo-summary.json" 2>/dev/null; rm -rf "$out/demo-run" ;;
    *) echo "unknown stage $stage (tests, bench, demo)"; exit 2 ;;
  esac
done
echo "failed stages: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
