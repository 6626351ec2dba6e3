#!/usr/bin/env bash
# The prepared GPU check for a lent machine, one command of at most ~8 minutes: say what the
# machine has, build pysparse there against its own torch (CUDA required, sm_90 only), run the CUDA
# tests, then print every GPU table. Each step runs under its own time limit and reports its own
# status; a failed step does not hide the ones after it (only a failed build stops the rest, which
# need it). The exit status is non-zero if any step failed or was skipped.
#
#   bash bench/gpu_check.sh            # on the GPU machine
#   bash bench/gpu_check.sh --dry-run  # print what was found, build nothing (exit 0 if CUDA is there)
#
# Without a CUDA GPU (or nvcc, or a CUDA build of torch) it prints what it found, says that CUDA is
# needed and exits 2 within seconds, without building. Output: the build log goes to
# $OUT/build.log and the test report to $OUT/tests.xml (OUT is set on the device machine; a
# temporary directory otherwise). PYTHON picks the interpreter (default: python, else python3).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/pysparse-gpu-check.XXXXXX")}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
DRY_RUN=0
export PYTHONUNBUFFERED=1 # a step killed by its time limit still shows what it printed
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1

# Time budget: every step is capped, and no step may run past DEADLINE seconds after the start
# (8 minutes less a margin for the last step's kill and the summary).
DEADLINE=455
declare -a SUMMARY=()
FAILED=0

# step NAME CAP_SECONDS COMMAND...: runs COMMAND under `timeout`, records PASS / FAIL / TIMEOUT.
step() {
  local name="$1" cap="$2"
  shift 2
  local left=$((DEADLINE - SECONDS))
  local limit=$((cap < left ? cap : left))
  if ((left < 10)); then
    SUMMARY+=("SKIP     $name (no time left in the ${DEADLINE}s budget)")
    FAILED=1
    return 1
  fi
  echo
  echo "=== $name (limit ${limit}s, ${SECONDS}s elapsed) ==="
  local t0=$SECONDS rc
  timeout --kill-after=5 "$limit" "$@"
  rc=$?
  local took=$((SECONDS - t0))
  if ((rc == 0)); then
    SUMMARY+=("PASS     $name (${took}s)")
  elif ((rc == 124 || rc == 137)); then
    SUMMARY+=("TIMEOUT  $name (after ${took}s, limit ${limit}s)")
    FAILED=1
  else
    SUMMARY+=("FAIL     $name (exit $rc, ${took}s)")
    FAILED=1
  fi
  return "$rc"
}

finish() {
  echo
  echo "=== summary (${SECONDS}s; logs in $OUT) ==="
  printf '%s\n' "${SUMMARY[@]}"
  exit "$1"
}

# ---- 1. what is here ---------------------------------------------------------------------------
echo "=== environment ==="
echo "repository: $REPO  output: $OUT  python: ${PY:-none}"
if [[ -z "$PY" ]]; then
  echo "No python found; set PYTHON=/path/to/python"
  SUMMARY+=("FAIL     environment (no python)")
  finish 2
fi
timeout 60 "$PY" - <<'EOF'
import glob, os, re, sys
try:
    import torch
except ImportError as exc:
    print(f"torch: not importable ({exc})")
    sys.exit(3)
print(f"torch {torch.__version__} at {os.path.dirname(torch.__file__)}; built with CUDA "
      f"{torch.version.cuda or 'none (CPU-only build)'}")
ok = bool(torch.version.cuda) and torch.cuda.is_available()
if ok:
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
else:
    print("GPU: none visible to torch (torch.cuda.is_available() is False)")
nv = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
hdr = glob.glob(os.path.join(nv, "cusparselt", "include", "cusparseLt.h"))
lib = sorted(glob.glob(os.path.join(nv, "cusparselt", "lib", "libcusparseLt.so*")))
if hdr:
    text = open(hdr[0]).read()
    ver = ".".join(re.search(rf"#define CUSPARSELT_VER_{k}\s+(\d+)", text).group(1)
                   for k in ("MAJOR", "MINOR", "PATCH"))
    print(f"cuSPARSELt header: {hdr[0]} (version {ver})")
else:
    print(f"cuSPARSELt header: not found under {nv}/cusparselt/include")
print(f"cuSPARSELt library: {', '.join(lib) if lib else 'not found under ' + nv + '/cusparselt/lib'}")
sys.exit(0 if ok else 4)
EOF
probe_rc=$?
if command -v nvcc >/dev/null; then
  echo "nvcc: $(command -v nvcc)"
  nvcc --version | tail -2
else
  echo "nvcc: not on PATH"
fi
for tool in cmake ninja; do
  if command -v "$tool" >/dev/null; then
    echo "$tool: $("$tool" --version | head -1)"
  else
    echo "$tool: not on PATH (scikit-build-core needs cmake >= 3.26 and ninja)"
  fi
done
"$PY" -c 'import scikit_build_core, pybind11; print("scikit-build-core", scikit_build_core.__version__, "| pybind11", pybind11.__version__)' 2>&1

if ((probe_rc != 0)) || ! command -v nvcc >/dev/null; then
  echo
  echo "CUDA is needed for this check: a CUDA build of torch that sees a GPU, and nvcc on PATH."
  echo "Stopping before the build (nothing was built)."
  SUMMARY+=("FAIL     environment (no usable CUDA: see above)")
  finish 2
fi
SUMMARY+=("PASS     environment")
if ((DRY_RUN)); then
  echo "--dry-run: stopping before the build."
  finish 0
fi

# ---- 2. build (sm_90 only, against the torch found above; a missing cuSPARSELt fails it) --------
build() {
  cd "$REPO" &&
    PYSPARSE_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
      CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$PY" -m pip install -v --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1
}
if ! step "build (log: $OUT/build.log)" 210 build; then
  echo "--- last 40 lines of $OUT/build.log ---"
  tail -40 "$OUT/build.log"
  SUMMARY+=("SKIP     tests and benchmarks (no build)")
  finish 1
fi

# Everything below imports the installed package, not the source folder.
cd "${TMPDIR:-/tmp}" || exit 1
export PYSPARSE_STRICT_CUSPARSELT=1 # a cuSPARSELt fallback is an error in tests and benches

step "import and build_info" 30 "$PY" -c \
  'import json, pysparse; print(json.dumps(pysparse.build_info(), indent=1))'

# ---- 3. tests ----------------------------------------------------------------------------------
step "CUDA tests (tests/test_cuda.py, tests/test_build.py)" 140 \
  "$PY" -m pytest -q -p no:cacheprovider -rfEs --junitxml="$OUT/tests.xml" \
  "$REPO/tests/test_cuda.py" "$REPO/tests/test_build.py"

# ---- 4. tables (arguments trimmed to fit the budget) --------------------------------------------
step "bench: 2:4 linear vs cuBLAS" 50 "$PY" "$REPO/bench/gpu_linear24.py" \
  --shapes 4096x4096 11008x4096 4096x11008 1536x384 --batches 1 8 16 64 512 2048 --repeats 30
step "bench: prox24" 30 "$PY" "$REPO/bench/prox24.py" --device cuda --lams 0.1,1,10 --repeats 3
step "bench: activation-sparse FFN" 50 "$PY" "$REPO/bench/ffn.py" --device cuda \
  --shapes 4096x11008 --dtypes bfloat16 --patterns independent --batches 1 4 \
  --sparsities 0 90 --down-rows --predictor 0.125 --seconds 0.2

finish "$FAILED"
