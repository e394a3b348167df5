#!/usr/bin/env bash
# One-shot verification of kdfast's CUDA kernels on a bare GPU machine (no network needed):
# builds the package with its CUDA kernels for the GPU present (or takes a prebuilt extension),
# runs the CUDA tests, measures the copy bandwidth and prints the comparison table (kdfast vs
# eager PyTorch vs torch.compile vs Liger-Kernel, installed from .whl/*.whl when present), then
# runs a few of the tests under compute-sanitizer (memcheck, racecheck) when it is installed.
# Needs python3 with torch, triton, pytest, pybind11, scikit-build-core, plus nvcc, cmake, ninja.
#
# Usage: bash benches/gpu_check.sh OUTDIR
# OUTDIR receives two files: gpu_check.tar.gz (every log, tests*.xml, bench_*.csv, topk_gpu.*,
# summary.md/json, SUMMARY.txt) and SUMMARY.txt, which is also printed last. The steps write
# into a scratch folder that is packed at the end. Every step has a time limit and a failing
# step does not stop the later ones; the whole run stays within KDFAST_GPU_CHECK_BUDGET_S
# seconds (default 300). KDFAST_GPU_CHECK_SECTIONS (default "dense,topk") picks the kernels
# whose tests, benchmarks and sanitizer runs are made: "topk" alone checks only compress_topk
# and sparse_kd_loss. KDFAST_GPU_CHECK_GROUPS (default: all) names the benchmark groups to run
# (gpu_bench.py --groups, e.g. "few_long_bf16,many_short_bf16"). KDFAST_PREBUILT names a folder holding a prebuilt
# _C.cpython-*.so for this Python (built with KDFAST_CUDA=ON): it is used when it imports with
# its CUDA kernels, which saves the build. Exit status: 0 when the build and the tests passed,
# 1 otherwise.
set -u -o pipefail

DEST="${1:?usage: bash benches/gpu_check.sh OUTDIR}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
SCRATCH="$(mktemp -d)"
OUT="$SCRATCH/gpu_check"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
REPO="$(pwd)"
PY="${PYTHON:-python3}"
BUDGET="${KDFAST_GPU_CHECK_BUDGET_S:-300}"
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
use_prebuilt() {
  cp -v "$KDFAST_PREBUILT"/_C.cpython-*.so python/kdfast/ && PYTHONPATH="$REPO/python" check_import
}
export REPO KDFAST_PREBUILT="${KDFAST_PREBUILT:-}"
export -f use_prebuilt
if [[ -n "$KDFAST_PREBUILT" ]] && compgen -G "$KDFAST_PREBUILT/_C.cpython-*.so" > /dev/null &&
  run_step import_prebuilt 60 bash -c use_prebuilt; then
  export PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
else
  [[ -n "$KDFAST_PREBUILT" ]] && (cd "$KDFAST_PREBUILT" && for f in _C.cpython-*.so; do rm -f "$REPO/python/kdfast/$f"; done)
  run_step build 240 bash -c build_with_pip && run_step import_check 60 bash -c check_import
fi
if ! grep -q "'cuda': True" "$OUT"/import_*.log 2>/dev/null; then
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

# ---- 4. CUDA tests: every file with CUDA cases (the device-generic suites run on "cuda" through
# conftest's device fixture; -k cuda selects those cases), in parallel workers when pytest-xdist is there
TEST_FILES=()
[[ "$SECTIONS" == *dense* ]] && TEST_FILES+=(tests/functional/test_kd_loss.py tests/functional/test_kd_loss_cuda.py tests/functional/test_cuda_few_long_rows.py
  tests/functional/test_multi_teacher_cuda.py tests/functional/test_fused_linear.py tests/ops/test_native_facts.py)
[[ "$SECTIONS" == *topk* ]] && TEST_FILES+=(tests/functional/test_sparse_cuda.py)
TEST_FILES+=(tests/functional/test_nonfinite.py tests/functional/test_extremes.py)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 6)
run_step tests 150 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" "${TEST_FILES[@]}" -k cuda --maxfail=40 -rfE \
  --durations=15 -o faulthandler_timeout=90 --junitxml="$OUT/tests.xml"
TESTS_RC=$?

# ---- 5. copy bandwidth and the comparison table (time left after it: the sanitizer runs)
BENCH_TIME=$(( BUDGET - $(elapsed) - ${KDFAST_GPU_CHECK_TAIL_S:-90} ))
run_step benchmark $(( BENCH_TIME > 10 ? BENCH_TIME + 15 : 10 )) "$PY" benches/gpu_bench.py "$OUT" --device cuda \
  --deadline "$BENCH_TIME" --sections "$SECTIONS" --groups "${KDFAST_GPU_CHECK_GROUPS:-}"

# ---- 6. compute-sanitizer on small cases (unaligned and aligned rows, chunks, teams 32..1024;
# top-k shared-memory buffers, bitmaps and scattered kept-entry stores), one memcheck and one
# racecheck run over the sections picked
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
SANITIZER_FILES=()
SANITIZER_TESTS=()
RACE_TESTS=()
if [[ "$SECTIONS" == *dense* ]]; then
  SANITIZER_FILES+=(tests/functional/test_kd_loss.py tests/functional/test_kd_loss_cuda.py)
  SANITIZER_TESTS+=("test_unaligned_rows or test_aligned_row_stride or test_out_of_range or (test_vocab_sizes and bf16) \
or (test_launch_shapes and bf16 and forward_kl and (few-long or many-tiny))")
  RACE_TESTS+=("(test_vocab_sizes and bf16) or (test_launch_shapes and bf16 and forward_kl and few-long)")
fi
if [[ "$SECTIONS" == *topk* ]]; then
  SANITIZER_FILES+=(tests/functional/test_sparse_cuda.py)
  SANITIZER_TESTS+=("test_compress_unaligned or test_sparse_large_logits_unaligned or test_sparse_bad_rows or \
(test_compress_ties_match_cpu and 5000-1000)")
  RACE_TESTS+=("test_compress_k_equal_to_vocab or (test_compress_ties_match_cpu and 5000-64-2) or test_sparse_masked_teacher")
fi
join_or() { local IFS="|"; echo "$*" | sed 's/|/) or (/g; s/^/(/; s/$/)/'; }
if [[ -n "$SANITIZER" && ${#SANITIZER_FILES[@]} -gt 0 ]]; then
  # Without the caching allocator every tensor is its own allocation, so reads or writes past
  # a tensor are reported instead of landing in a neighbour inside a cached block.
  run_step memcheck 50 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 86 \
    "$PY" -m pytest -q -p no:cacheprovider "${SANITIZER_FILES[@]}" -k "cuda and ($(join_or "${SANITIZER_TESTS[@]}"))"
  run_step racecheck 35 "$SANITIZER" --tool racecheck --error-exitcode 86 \
    "$PY" -m pytest -q -p no:cacheprovider "${SANITIZER_FILES[@]}" -k "cuda and ($(join_or "${RACE_TESTS[@]}"))"
elif [[ -z "$SANITIZER" ]]; then
  STEPS+=("compute-sanitizer: skipped (not installed)")
fi

# ---- 6b. fused linear KD at the LLM shape (N=8192, V=128256, H=2048, H_t=4096, bf16) vs eager and Liger
if [[ "$SECTIONS" == *dense* ]]; then
  run_step bench_fused_linear 60 "$PY" benches/bench_fused_linear.py --preset llm --device cuda --out "$OUT" \
    --providers kdfast-fused,eager,liger-fused-jsd,liger-chunked-jsd
fi

# ---- 7. summary
{
  echo "kdfast GPU check: $(grep -m1 '^device' "$OUT/environment.log" 2>/dev/null), sm_$ARCH, $(elapsed) s, \
commit $(git -C "$REPO" log --format=%h -1 2>/dev/null)"
  grep -h "^{" "$OUT"/import_*.log 2>/dev/null | tail -1
  for line in "${STEPS[@]}"; do echo "  $line"; done
  echo
  echo "tests: $(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$OUT/tests.log" 2>/dev/null | tail -1)"
  grep -E "^(FAILED|ERROR) " "$OUT/tests.log" 2>/dev/null | head -25
  for tool in memcheck racecheck; do
    [[ -f "$OUT/$tool.log" ]] && echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -1) \
$(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$OUT/$tool.log" | tail -1)"
  done
  echo
  [[ -f "$OUT/summary.md" ]] && sed -n '/^| dtype/,/^$/p' "$OUT/summary.md"
  sed -n '/^## Headline targets/,$p' "$OUT/summary.md" 2>/dev/null
  [[ -f "$OUT/topk_gpu.md" ]] && cat "$OUT/topk_gpu.md"
  tail -n 12 "$OUT/bench_fused_linear.log" 2>/dev/null
} > "$OUT/SUMMARY.txt"
CUDA_OK=0
grep -q "'cuda': True" "$OUT"/import_*.log 2>/dev/null && CUDA_OK=1
cp "$OUT/SUMMARY.txt" "$DEST/SUMMARY.txt"
tar -czf "$DEST/gpu_check.tar.gz" -C "$SCRATCH" gpu_check
rm -rf "$SCRATCH"
echo
echo "=================================================================="
echo "logs and tables: $DEST/gpu_check.tar.gz"
[[ -f "$DEST/SUMMARY.txt" ]] && cat "$DEST/SUMMARY.txt"

if [[ "${TESTS_RC:-1}" == 0 && "$CUDA_OK" == 1 ]]; then
  exit 0
fi
exit 1
