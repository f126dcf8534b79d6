#!/usr/bin/env bash
# Every GPU check in one call, sized for the GPU slot: 15 minutes in all (the machine's start included), at
# most 10 minutes a command (docs/gpu.md). Results land under $OUT as each stage ends (the device tool's
# folder that comes back; bench/results/gpu-<time> by hand), so a run killed midway still returns them.
#   here, once:   bash bench/gpu_wheels.sh       fills the git-ignored .whl/ (deepspeed, webdataset, ...)
#   here, always: make gpu-check-dry             rehearses every stage on this CPU machine (DRY=1)
#   device tool:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   a rerun:      run(command="STAGES='tests bench_ops' bash bench/gpu_check.sh", carry=[".whl"])
#                 (install and build run first whatever STAGES says, when the machine lacks their results;
#                 LIMIT_<stage>=N changes one stage's limit, e.g. LIMIT_sanitizer=400 STAGES=sanitizer)
# Stages in priority order, each under its own `timeout`; their limits add up to the `budget:` line (at most
# 540 s), which leaves room in the slot to rerun a stage. Before each stage the script prints what it
# expects (from the card's measured ceilings where there are some), after it what was measured.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${DRY:-0}
OUT=${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
summary="$OUT/summary.txt"
note() { echo "$*" | tee -a "$summary"; }

# name:limit_s, in priority order
ALL_STAGES="install:20 build:110 tests:60 roofline:15 bench_ops:75 bench_step:90 sanitizer:130 suite:40"
limit_of() { local v="LIMIT_$1"; echo "${!v:-$(tr ' ' '\n' <<< "$ALL_STAGES" | grep "^$1:" | cut -d: -f2)}"; }
# the time a stage really gets: its limit, plus 120 s in the rehearsal, whose CPU smokes are not the GPU's work
run_limit() { if [ "$DRY" = 1 ]; then echo $(( $(limit_of "$1") + 120 )); else limit_of "$1"; fi; }

# the pytest selections, shared by the GPU run and the rehearsal (which counts what each would select)
PYTEST=(-m pytest -q -p no:cacheprovider)
SEL_TESTS=(tests/test_ops_*.py -k "cuda or mixed_devices")
SEL_SUITE=(tests -k "not (test_ops_ and (cuda or mixed_devices))")
SANITIZE_K="cuda and not random_shapes and not compile and not gradcheck and not opcheck"  # kernels, not tracing
SEL_BENCH_OPS=(-o python_files='bench_*.py' bench/bench_ops.py -k "cuda and base")
SEL_BENCH_STEP=(-o python_files='bench_*.py' bench/bench_step.py -k "base-eva_to_clip-256 or report")

if [ "$DRY" = 1 ]; then
  PY=${PY:-.venv/bin/python}
  SITE=$(mktemp -d)  # never the dev venv: the rehearsal installs into a throwaway target
  trap 'rm -rf "$SITE"' EXIT
  export PYTHONPATH=$PWD  # the cp312 wheels do not import into this Python: only the install stage reads SITE
else
  PY=${PY:-python3}
  SITE=/tmp/site
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16
  export PYTHONPATH=$SITE:$PWD
fi
export PY OUT DRY

# pytest --collect-only of a selection: fails on zero, prints the count (the cuda cases counted without a GPU)
collect() {
  local listing rc n
  listing=$(BLIP3O_FAST_COLLECT_CUDA=1 "$PY" "${PYTEST[@]}" --collect-only "$@" 2>&1)
  rc=$?
  n=$(grep -c "::" <<< "$listing")
  echo "  collects $n tests: $*"
  [ $rc = 0 ] && [ "$n" -gt 0 ] || { echo "  collection failed (rc=$rc):"; tail -5 <<< "$listing"; return 1; }
}

stage_install() {
  echo "expect: every wheel of .whl/ installs offline into $SITE"
  ls .whl/*.whl > /dev/null || { echo ".whl/ is empty: run bash bench/gpu_wheels.sh here first"; return 1; }
  if [ "$DRY" = 1 ]; then  # the GPU machine's Python is 3.12: install as for it, import what is pure Python
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
      --python-version 3.12 --implementation cp --only-binary=:all: .whl/*.whl || return 1
    PYTHONPATH=$SITE "$PY" -c "import webdataset, braceexpand, hjson, sortedcontainers, attrs" || return 1
    test -f "$SITE/deepspeed/__init__.py" && test -d "$SITE/hypothesis" && test -d "$SITE/pydantic_core"
    return
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .whl/*.whl || return 1
  "$PY" -c "import webdataset, hypothesis" || return 1
  # only the training tests need deepspeed: its import failing is reported, and the suite stage shows the rest
  "$PY" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1 \
    || echo "deepspeed does not import: the training tests of the suite stage will say why"
}

stage_build() {
  echo "expect: a CUDA build of blip3o_fast._C for sm_${TORCH_CUDA_ARCH_LIST:-9.0}; info says 'CUDA build'"
  if [ "$DRY" = 1 ]; then  # no nvcc-able torch here: setup.py must evaluate, and FORCE_CUDA must refuse in one line
    "$PY" setup.py --name > /dev/null 2>&1 || return 1
    local msg
    msg=$(BLIP3O_FAST_FORCE_CUDA=1 "$PY" setup.py --name 2>&1 >/dev/null) && return 1
    echo "  FORCE_CUDA here: $msg"
    [ "$(wc -l <<< "$msg")" = 1 ] || return 1
    "$PY" -m blip3o_fast.cli info | tee "$OUT/info.txt"
    return
  fi
  BLIP3O_FAST_FORCE_CUDA=1 "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log"; return 1; }
  "$PY" -m blip3o_fast.cli info | tee "$OUT/info.txt"
  grep -q "CUDA build" "$OUT/info.txt"
}

stage_tests() {
  echo "expect: every CUDA case of the op tests passes"
  collect "${SEL_TESTS[@]}" || return 1
  if [ "$DRY" = 1 ]; then  # the same command on a few CPU cases
    "$PY" "${PYTEST[@]}" -n 2 tests/test_ops_swiglu.py -k "cpu and gradcheck"
    return
  fi
  "$PY" "${PYTEST[@]}" -n 8 "${SEL_TESTS[@]}" > "$OUT/tests.log" 2>&1
  local rc=$?
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40
  tail -1 "$OUT/tests.log" | tee -a "$summary"
  return $rc
}

stage_roofline() {
  echo "expect: the card's device copy bandwidth and bf16 matmul rate, measured (the later stages' ceilings)"
  "$PY" bench/gpu_roofline.py --json "$OUT/roofline.json" $([ "$DRY" = 1 ] && echo --smoke)
}

stage_bench_ops() {
  local dev=cuda shape=base sel=("${SEL_BENCH_OPS[@]}")
  if [ "$DRY" = 1 ]; then
    collect "${SEL_BENCH_OPS[@]}" || return 1
    dev=cpu shape=tiny sel=(-o python_files='bench_*.py' bench/bench_ops.py -k "cpu and tiny and swiglu and not bwd and not compiled")
  fi
  "$PY" bench/gpu_expect.py ops --roofline "$OUT/roofline.json" --device $dev --shape $shape || return 1
  # the benchmarks stop 15 s before the stage does, so what finished is still tabled; each result is saved as
  # it finishes (BENCH_PARTIAL_JSON)
  BENCH_PARTIAL_JSON="$OUT/bench-ops.json" timeout $(( $(run_limit bench_ops) - 15 )) \
    "$PY" "${PYTEST[@]}" "${sel[@]}" > "$OUT/bench-ops.log" 2>&1
  local rc=$?
  tail -2 "$OUT/bench-ops.log"
  "$PY" bench/gpu_expect.py ops --roofline "$OUT/roofline.json" --bench "$OUT/bench-ops.json" \
    --device $dev --shape $shape | tee "$OUT/bench-ops.txt" | tee -a "$summary" || return 1
  return $rc
}

stage_bench_step() {
  local dev=cuda case=base-eva_to_clip-256 sel=("${SEL_BENCH_STEP[@]}")
  if [ "$DRY" = 1 ]; then
    collect "${SEL_BENCH_STEP[@]}" || return 1
    export BENCH_STEP_ROUNDS=2
    dev=cpu case=tiny-demo sel=(-o python_files='bench_*.py' bench/bench_step.py -k "tiny-demo and fused-bf16 or report")
  fi
  "$PY" bench/gpu_expect.py steps --roofline "$OUT/roofline.json" --device $dev --case $case || return 1
  BENCH_PARTIAL_JSON="$OUT/bench-step.json" timeout $(( $(run_limit bench_step) - 15 )) \
    "$PY" "${PYTEST[@]}" -s "${sel[@]}" > "$OUT/bench-step.log" 2>&1
  local rc=$?
  grep -A12 "^case " "$OUT/bench-step.log"
  "$PY" bench/gpu_expect.py steps --roofline "$OUT/roofline.json" --bench "$OUT/bench-step.json" \
    --device $dev --case $case | tee "$OUT/bench-step.txt" | tee -a "$summary" || return 1
  return $rc
}

stage_sanitizer() {
  echo "expect: compute-sanitizer memcheck and racecheck report 0 errors on every op test file's CUDA cases"
  local sanitizer rc=0 f tool
  sanitizer=$(ls "${CUDA_HOME:-/usr/local/cuda}"/{bin,compute-sanitizer}/compute-sanitizer 2>/dev/null | head -1)
  [ -n "$sanitizer" ] || sanitizer=$(command -v compute-sanitizer || echo "")
  local files=(tests/test_ops_*.py)
  local each=$(( $(limit_of sanitizer) / (2 * ${#files[@]}) ))
  local deadline=$(( SECONDS + $(run_limit sanitizer) - 5 )) left=$(( 2 * ${#files[@]} )) tools=(memcheck racecheck)
  if [ "$DRY" = 1 ]; then  # the same loop, through a stand-in that collects what the sanitizer would run
    echo "  compute-sanitizer here: ${sanitizer:-none (the GPU machine has it under CUDA_HOME)}; at least $each s per file and tool"
    sanitizer="$SITE/fake-compute-sanitizer" tools=(memcheck) left=${#files[@]}
    printf '#!/usr/bin/env bash\nshift 4\nBLIP3O_FAST_COLLECT_CUDA=1 exec "$@" --collect-only\n' > "$sanitizer"
    chmod +x "$sanitizer"
  fi
  [ -n "$sanitizer" ] || { echo "no compute-sanitizer under ${CUDA_HOME:-/usr/local/cuda} or on PATH"; return 1; }
  for tool in "${tools[@]}"; do
    for f in "${files[@]}"; do
      local log="$OUT/sanitizer-$tool-$(basename "$f" .py).log"
      # an equal share of what is left: one file's hang costs only its share, a quick file leaves time to the next
      each=$(( (deadline - SECONDS) / left )); left=$((left - 1))
      # the caching allocator hides out-of-bounds accesses inside its pooled blocks from memcheck
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$each" "$sanitizer" --tool "$tool" --error-exitcode 1 \
        "$PY" "${PYTEST[@]}" "$f" -k "$SANITIZE_K" > "$log" 2>&1
      local r=$?
      [ $r = 0 ] || rc=1
      echo "  $tool $(basename "$f") rc=$r$([ $r = 124 ] && echo ' (timed out)') (share $each s): $(grep -E 'ERROR SUMMARY|passed|failed|collected' "$log" | tail -2 | tr '\n' ' ')"
    done
  done
  return $rc
}

stage_suite() {
  echo "expect: the rest of the suite passes on the GPU machine"
  collect "${SEL_SUITE[@]}" || return 1
  [ "$DRY" = 1 ] && return 0  # `make test` runs these here
  "$PY" "${PYTEST[@]}" -n 8 --dist loadgroup "${SEL_SUITE[@]}" > "$OUT/suite.log" 2>&1
  local rc=$?
  grep -E "^(FAILED|ERROR)" "$OUT/suite.log" | head -40
  tail -1 "$OUT/suite.log" | tee -a "$summary"
  return $rc
}

export -f note collect limit_of run_limit stage_install stage_build stage_tests stage_roofline stage_bench_ops \
  stage_bench_step stage_sanitizer stage_suite
export summary SITE ALL_STAGES SANITIZE_K
# arrays do not cross into the `timeout bash -c` children: pass them as declarations
ARRAYS=$(declare -p PYTEST SEL_TESTS SEL_SUITE SEL_BENCH_OPS SEL_BENCH_STEP)
export ARRAYS

want=${STAGES:-all}
if [ "$want" != all ] && [ "$DRY" != 1 ]; then  # a rerun on a fresh machine needs the install and the build
  [ -d "$SITE/deepspeed" ] || want="install $want"
  grep -qs '"cuda": true' blip3o_fast/_C.build.json || want="build $want"
fi
for w in $want; do  # a misspelt stage would silently run nothing
  [ "$w" = all ] || grep -qw "$w:[0-9]*" <<< "$ALL_STAGES" || { note "unknown stage $w: one of $ALL_STAGES"; exit 1; }
done
selected=()
for s in $ALL_STAGES; do
  [ "$want" = all ] || grep -qw "${s%%:*}" <<< "$want" && selected+=("${s%%:*}")
done
budget=0
note "stage        limit_s"
for name in "${selected[@]}"; do
  note "$(printf '%-12s %7s' "$name" "$(limit_of "$name")")"
  budget=$((budget + $(limit_of "$name")))
done
note "budget: $budget s"
[ "$budget" -le 540 ] || { note "budget over 540 s: lower a LIMIT_ or run fewer STAGES"; exit 1; }
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$summary"

failed=0
for name in "${selected[@]}"; do
  limit=$(limit_of "$name")
  note "== $name (limit ${limit}s) =="
  start=$SECONDS
  timeout --kill-after=5 "$(run_limit "$name")" bash -c "set -o pipefail; eval \"\$ARRAYS\"; stage_$name" 2>&1 | tee "$OUT/stage-$name.log"
  rc=${PIPESTATUS[0]}
  verdict=$([ $rc = 0 ] && echo ok || ([ $rc = 124 ] && echo "TIMED OUT" || echo "FAILED rc=$rc"))
  note "$name: $verdict in $((SECONDS - start)) s (limit $limit s)"
  [ $rc = 0 ] || failed=1
  if [ $rc != 0 ] && [ "$name" = build ]; then
    note "stopping: every later stage needs the build"
    break
  fi
done
note "results: $OUT"
exit $failed
