#!/usr/bin/env bash
# Every GPU check of ../shared/gpu/README.md in one call on the offline H100/H200 machine, results under
# $OUT (the device tool's folder that comes back; bench/results/gpu-<time> when run by hand):
#   here, once:  bash bench/gpu_wheels.sh
#   device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"])
# Steps: offline install, build for sm_90, the card's ceilings, the test suite on CUDA, compute-sanitizer
# memcheck and racecheck on the op tests, the op and step benchmarks (CUDA events), a summary last.
set -uo pipefail
OUT=${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
note() { echo "$*" | tee -a "$summary"; }

python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$summary"
if ! python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; then
  note "build FAILED"; tail -40 "$OUT/build.log"; exit 1
fi
python3 -m blip3o_fast.cli info >> "$summary" 2>&1

python3 bench/gpu_roofline.py --json "$OUT/roofline.json" | tee -a "$summary"

python3 -m pytest -q -p no:cacheprovider tests > "$OUT/tests.log" 2>&1
note "test suite (rc=$?): $(tail -1 "$OUT/tests.log")"

sanitizer="$CUDA_HOME/bin/compute-sanitizer"
for tool in memcheck racecheck; do
  "$sanitizer" --tool "$tool" --error-exitcode 1 python3 -m pytest -q -x -p no:cacheprovider tests/test_ops_*.py \
    -k "cuda" > "$OUT/sanitizer-$tool.log" 2>&1
  note "compute-sanitizer $tool (rc=$?): $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitizer-$tool.log" | tail -2 | tr '\n' ' ')"
done

python3 -m pytest -q -p no:cacheprovider -o python_files='bench_*.py' bench/bench_ops.py bench/bench_step.py \
  -k "cuda or report" -s --benchmark-json "$OUT/bench-cuda.json" > "$OUT/bench.log" 2>&1
note "benchmarks (rc=$?)"
grep -A40 "^case " "$OUT/bench.log" | head -40 | tee -a "$summary"
python3 -m blip3o_fast.cli bench report --file "$OUT/bench-cuda.json" --results "$OUT" \
  --plot "$OUT/history.png" > "$OUT/report.txt" 2>&1
tail -60 "$OUT/report.txt"
