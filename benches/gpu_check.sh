#!/usr/bin/env bash
# One-shot verification of kdfast's CUDA kernels on a bare GPU machine (no network needed):
# builds the package with its CUDA kernels for the GPU present, runs the CUDA tests, measures
# the copy bandwidth and prints the comparison table (kdfast vs eager PyTorch vs torch.compile
# vs Liger-Kernel, installed from .whl/*.whl when present), then runs a few of the tests under
# compute-sanitizer (memcheck, racecheck) when it is installed. Needs python3 with torch, triton,
# pybind11, scikit-build-core, plus nvcc, cmake and ninja.
#
# Usage: bash benches/gpu_check.sh OUTDIR
# Everything goes into OUTDIR: one log per step, tests.xml, tests_topk.xml, bench_*.csv,
# topk_gpu.csv/.md (compress_topk and sparse_kd_loss vs the copy bandwidth), summary.md/json and
# SUMMARY.txt (also printed at the end). Every step has a time limit and a failing step does
# not stop the later ones; the whole run stays within KDFAST_GPU_CHECK_BUDGET_S seconds
# (default 450, i.e. under 8 minutes on an H100). KDFAST_GPU_CHECK_SECTIONS (default
# "dense,topk") picks the kernels whose tests, benchmarks and sanitizer runs are made:
# "topk" alone checks only compress_topk and sparse_kd_loss. Exit status: 0 when the build and
# the tests passed, 1 otherwise.
set -u -o pipefail

OUT="${1:?usage: bash benches/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
REPO="$(pwd)"
PY="${PYTHON:-python3}"
BUDGET="${KDFAST_GPU_CHECK_BUDGET_S:-450}"
SECTIONS="${KDFAST_GPU_CHECK_SECTIONS:-dense,topk}"
START=$(date +%s)
STEPS=()

elapsed() { echo $(( $(date +%s) - START )); }

# run_step NAME CAP_SECONDS COMMAND...: runs COMMAND with stdout/stderr in OUT/NAME.log under
# min(CAP, time left), records "NAME: ok|FAILED (rc) in S s" and shows the log's tail.
run_step() {
  local name="$1" cap="$2"
  shift 2
  local left=$(( BUDGET - $(elapsed) - 10 ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    STEPS+=("$name: skipped (out of time)")
    echo "== $name: skipped (out of time)"
    return 99
  fi
  echo "== $name (limit ${limit}s) $(date +%T)"
  local begin=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - begin ))
  if (( rc == 0 )); then
    STEPS+=("$name: ok in ${took}s")
  elif (( rc == 124 || rc == 137 )); then
    STEPS+=("$name: TIMED OUT after ${took}s")
  else
    STEPS+=("$name: FAILED (exit $rc) in ${took}s")
  fi
  tail -n 8 "$OUT/$name.log"
  return $rc
}

# ---- 1. environment
{
  date
  nvidia-smi 2>&1 || true
  nvcc --version 2>&1 || true
  cmake --version 2>&1 | head -1 || true
  "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "torch cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU VISIBLE",
      torch.cuda.get_device_capability() if torch.cuda.is_available() else "")
try:
    import triton
    print("triton", triton.__version__)
except Exception as error:
    print("triton missing:", error)
EOF
  git -C "$REPO" log --oneline -1 2>/dev/null || true
  git -C "$REPO" status --short 2>/dev/null | head -40 || true
} > "$OUT/environment.log" 2>&1
grep -E "^device|^python|NVIDIA-SMI" "$OUT/environment.log"

ARCH="$("$PY" -c 'import torch; major, minor = torch.cuda.get_device_capability(); print(f"{major}{minor}")' 2>/dev/null || echo 90)"

# ---- 2. build (editable install; falls back to a plain CMake build on PYTHONPATH)
build_with_pip() {
  export KDFAST_CUDA=ON
  export CMAKE_ARGS="-DKDFAST_CUDA_ARCHITECTURES=$ARCH"
  export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
  "$PY" -m pip install --no-build-isolation --no-deps -v -e . ||
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
}
build_with_cmake() {
  cmake -S . -B build/gpu-check -G Ninja -DCMAKE_BUILD_TYPE=Release -DKDFAST_CUDA=ON \
    -DKDFAST_CUDA_ARCHITECTURES="$ARCH" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
    -DPython_EXECUTABLE="$(command -v "$PY")" &&
    cmake --build build/gpu-check -j "$(nproc)" &&
    cp build/gpu-check/_C*.so python/kdfast/
}
check_import() {
  "$PY" - <<'EOF'
import kdfast
info = kdfast.build_info()
print(info)
assert info["native"] and info["cuda"], "kdfast was built without its CUDA kernels"
EOF
}
export PY ARCH
export -f build_with_pip build_with_cmake check_import
run_step build 300 bash -c build_with_pip && run_step import_check 60 bash -c check_import
if ! grep -q "'cuda': True" "$OUT/import_check.log" 2>/dev/null; then
  run_step build_cmake 300 bash -c build_with_cmake
  export PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
  run_step import_check_cmake 60 bash -c check_import
fi

# ---- 3. Liger-Kernel from the repository's .whl/ folder (optional)
LIGER_SITE="${TMPDIR:-/tmp}/kdfast-liger-site"
install_liger() {
  rm -rf "$LIGER_SITE" && mkdir -p "$LIGER_SITE"
  "$PY" -m pip install -q --no-index --no-deps --target "$LIGER_SITE" .whl/*.whl ||
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
      "$LIGER_SITE" .whl/*.whl
  PYTHONPATH="$LIGER_SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
    'import liger_kernel, liger_kernel.transformers as t; print("liger_kernel", liger_kernel.__file__, t.LigerKLDIVLoss)'
}
export LIGER_SITE
export -f install_liger
if compgen -G ".whl/*.whl" > /dev/null; then
  if run_step liger_install 60 bash -c install_liger; then
    export PYTHONPATH="$LIGER_SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  STEPS+=("liger_install: skipped (no .whl/*.whl)")
fi

# ---- 4. CUDA tests
TESTS_RC=0
if [[ "$SECTIONS" == *dense* ]]; then
  # the dense CPU suite runs on "cuda" through conftest's device fixture: -k cuda selects those cases
  run_step tests 200 "$PY" -m pytest -q -p no:cacheprovider tests/functional/test_kd_loss.py \
    tests/functional/test_kd_loss_cuda.py tests/functional/test_multi_teacher_cuda.py -k cuda --maxfail=25 -rfE \
    --durations=15 -o faulthandler_timeout=120 --junitxml="$OUT/tests.xml"
  TESTS_RC=$?
fi
# ---- 4b. CUDA tests of top-k soft labels (compress_topk, sparse_kd_loss)
if [[ "$SECTIONS" == *topk* ]]; then
  run_step tests_topk 150 "$PY" -m pytest -q -p no:cacheprovider tests/functional/test_sparse_cuda.py --maxfail=25 -rfE \
    --durations=10 -o faulthandler_timeout=120 --junitxml="$OUT/tests_topk.xml"
  TOPK_TESTS_RC=$?
  (( TESTS_RC == 0 )) && TESTS_RC=$TOPK_TESTS_RC
fi

# ---- 5. copy bandwidth and the comparison table (time left after it: the sanitizer runs)
BENCH_TIME=$(( BUDGET - $(elapsed) - 120 ))
run_step benchmark $(( BENCH_TIME > 10 ? BENCH_TIME + 15 : 10 )) "$PY" benches/gpu_bench.py "$OUT" --device cuda \
  --deadline "$BENCH_TIME" --sections "$SECTIONS"

# ---- 5b. fused linear KD at the LLM shape (N=8192, V=128256, H=2048, H_t=4096, bf16) vs eager and Liger
run_step tests_fused_linear 60 "$PY" -m pytest -q -p no:cacheprovider tests/functional/test_fused_linear.py -k cuda -rfE
run_step bench_fused_linear 150 "$PY" benches/bench_fused_linear.py --preset llm --device cuda --out "$OUT" \
  --providers kdfast-fused,eager,liger-fused-jsd,liger-chunked-jsd

# ---- 6. compute-sanitizer on small cases (unaligned and aligned rows, chunks, teams 32..1024)
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
SANITIZER_TESTS="test_unaligned_rows or test_aligned_row_stride or test_float64_matches or test_out_of_range or \
(test_vocab_sizes and bf16) or (test_launch_shapes and bf16 and forward_kl and (few-long or many-tiny))"
if [[ -n "$SANITIZER" && "$SECTIONS" == *dense* ]]; then
  # Without the caching allocator every tensor is its own allocation, so reads or writes past
  # a tensor are reported instead of landing in a neighbour inside a cached block.
  run_step memcheck 70 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 86 \
    "$PY" -m pytest -q -p no:cacheprovider tests/functional/test_kd_loss.py tests/functional/test_kd_loss_cuda.py \
    -k "cuda and ($SANITIZER_TESTS)"
  run_step racecheck 45 "$SANITIZER" --tool racecheck --error-exitcode 86 \
    "$PY" -m pytest -q -p no:cacheprovider tests/functional/test_kd_loss.py tests/functional/test_kd_loss_cuda.py \
    -k "cuda and ((test_vocab_sizes and bf16) or (test_launch_shapes and bf16 and forward_kl and few-long))"
fi
if [[ -n "$SANITIZER" && "$SECTIONS" == *topk* ]]; then
  # Top-k kernels: shared-memory buffers, bitmaps and scattered kept-entry stores.
  run_step memcheck_topk 45 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 86 \
    "$PY" -m pytest -q -p no:cacheprovider tests/functional/test_sparse_cuda.py -k "test_compress_unaligned or \
test_sparse_large_logits_unaligned or test_sparse_bad_rows or (test_compress_ties_match_cpu and 5000-1000)"
  run_step racecheck_topk 45 "$SANITIZER" --tool racecheck --error-exitcode 86 \
    "$PY" -m pytest -q -p no:cacheprovider tests/functional/test_sparse_cuda.py -k "test_compress_k_equal_to_vocab or \
(test_compress_ties_match_cpu and 5000-64-2) or test_sparse_gradient_reach or test_sparse_masked_teacher"
fi
if [[ -z "$SANITIZER" ]]; then
  STEPS+=("compute-sanitizer: skipped (not installed)")
fi

# ---- 7. summary
{
  echo "kdfast GPU check: $(grep -m1 '^device' "$OUT/environment.log" 2>/dev/null), sm_$ARCH, $(elapsed) s"
  for line in "${STEPS[@]}"; do echo "  $line"; done
  echo
  echo "tests: $(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$OUT/tests.log" 2>/dev/null | tail -1)"
  grep -E "^(FAILED|ERROR) " "$OUT/tests.log" 2>/dev/null | head -25
  echo "tests_topk: $(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$OUT/tests_topk.log" 2>/dev/null | tail -1)"
  grep -E "^(FAILED|ERROR) " "$OUT/tests_topk.log" 2>/dev/null | head -25
  for tool in memcheck racecheck memcheck_topk racecheck_topk; do
    [[ -f "$OUT/$tool.log" ]] && echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -1) \
$(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$OUT/$tool.log" | tail -1)"
  done
  echo
  sed -n '/^## Headline targets/,$p' "$OUT/summary.md" 2>/dev/null
} > "$OUT/SUMMARY.txt"
echo
echo "=================================================================="
[[ -f "$OUT/summary.md" ]] && sed -n '/^| dtype/,/^$/p' "$OUT/summary.md"
cat "$OUT/SUMMARY.txt"

if [[ "${TESTS_RC:-1}" == 0 ]] && grep -q "'cuda': True" "$OUT"/import_check*.log 2>/dev/null; then
  exit 0
fi
exit 1
