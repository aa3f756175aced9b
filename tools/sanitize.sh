#!/usr/bin/env bash
# Builds mipscan with AddressSanitizer + UndefinedBehaviorSanitizer (CMake option
# MIPSCAN_SANITIZE) or with ThreadSanitizer into its own venv and build folder, then runs
# tests under it.
#
#   tools/sanitize.sh                 # ASan+UBSan: build (if needed) + the default tests
#   tools/sanitize.sh tests/test_fuzz.py -x   # extra arguments go to pytest
#   SANITIZE_REBUILD=1 tools/sanitize.sh      # force a rebuild of the instrumented module
#   SANITIZE=thread tools/sanitize.sh         # ThreadSanitizer over tests/test_concurrency.py and tests/test_live.py
#   SANITIZE=thread tools/sanitize.sh tests/test_engine_robustness.py   # or other tests
#
# ThreadSanitizer (SANITIZE=thread): the extension (and nanobind) are built with
# -fsanitize=thread and libtsan is LD_PRELOADed into the uninstrumented Python. TSan sees
# every access the module makes and every pthread synchronisation (the GIL included), but
# not the memory accesses of Python or numpy, so it can miss a race whose other side is
# there; it does not report false races for them. Suppressions: tools/tsan.supp (each
# one says why). halt_on_error: the first report fails the run.
#
# Nothing in the main venv or the editable install is touched:
#   - the venv lives in $SANITIZE_DIR/venv (default /tmp/mipscan-sanitize-<hash of the
#     checkout path>); a .pth file makes the main venv's packages
#     (numpy, pytest, hypothesis, nanobind, scikit-build-core, ...) importable, but its
#     editable-install hook is not run, so `import mipscan` finds the instrumented copy;
#   - CMake builds in $SANITIZE_DIR/cmake.
# The instrumented module is built at -O1 -g without NDEBUG, so any assert() also fires.
# Python itself is not instrumented, so libasan (and libubsan) are LD_PRELOADed and
# leak detection is off (the interpreter's own allocations would drown the report).
#
# Excluded by default: tests/test_benchmarks.py. It runs the peers (hnswlib, faiss, ScaNN)
# in the same instrumented processes, and ASan stops on their own bugs (hnswlib's
# knn_query frees a new[] buffer with delete: alloc-dealloc-mismatch). Everything else
# runs, including the Keras tests on JAX, TensorFlow and PyTorch (slower, ~3 min; their
# subprocesses inherit LD_PRELOAD and use this venv's python, hence the instrumented
# module). The RSS test of tests/test_concurrency.py skips itself (ASan's quarantine holds
# freed memory). Pass explicit test paths to run a subset.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MAIN_PY="${MAIN_PY:-$ROOT/../venv/bin/python}"
[ -x "$MAIN_PY" ] || MAIN_PY="$(command -v python3)"
# Outside the checkout: a `rm -rf build` elsewhere must not pull the venv from under a run.
MODE="${SANITIZE:-address}"
case "$MODE" in
  address|thread) ;;
  *) echo "sanitize.sh: SANITIZE must be 'address' (ASan+UBSan, the default) or 'thread'; got '$MODE'" >&2; exit 2 ;;
esac
SUFFIX=""; [ "$MODE" = thread ] && SUFFIX="-thread"
OUT="${SANITIZE_DIR:-${TMPDIR:-/tmp}/mipscan-sanitize-$(printf %s "$ROOT" | md5sum | cut -c1-8)$SUFFIX}"
VENV="$OUT/venv"

if [ ! -x "$VENV/bin/python" ]; then
  "$MAIN_PY" -m venv --without-pip "$VENV"
  # Make the main venv's packages visible (appended to sys.path, .pth hooks not run).
  site_main="$("$MAIN_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  site_new="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$site_main" > "$site_new/_main_venv.pth"
fi
PY="$VENV/bin/python"

CC_BIN="${CC:-gcc}"
if [ "$MODE" = thread ]; then
  LIBTSAN="$("$CC_BIN" -print-file-name=libtsan.so)"
  [ -f "$LIBTSAN" ] || { echo "sanitize.sh: libtsan.so not found via $CC_BIN" >&2; exit 2; }
  PRELOAD="$LIBTSAN"
  BUILD_OPTS=(-Ccmake.define.MIPSCAN_SANITIZE=OFF
              "-Ccmake.define.CMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g -fsanitize=thread -fno-omit-frame-pointer"
              -Ccmake.define.CMAKE_MODULE_LINKER_FLAGS=-fsanitize=thread
              -Ccmake.define.CMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread)
else
  LIBASAN="$("$CC_BIN" -print-file-name=libasan.so)"
  LIBUBSAN="$("$CC_BIN" -print-file-name=libubsan.so)"
  [ -f "$LIBASAN" ] || { echo "sanitize.sh: libasan.so not found via $CC_BIN" >&2; exit 2; }
  PRELOAD="$LIBASAN:$LIBUBSAN"
  BUILD_OPTS=(-Ccmake.define.MIPSCAN_SANITIZE=ON
              "-Ccmake.define.CMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g -fsanitize=float-cast-overflow,float-divide-by-zero")
fi

site_new="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ "${SANITIZE_REBUILD:-0}" = 1 ] || ! ls "$site_new"/mipscan/_mipscan*.so >/dev/null 2>&1; then
  echo "sanitize.sh: building the instrumented module in $OUT/cmake" >&2
  # pip from the main venv, installing into the sanitizer venv (--prefix) without
  # dependencies; the sources' .py files are copied, so re-run with SANITIZE_REBUILD=1
  # after editing them.
  rm -rf "$site_new/mipscan" "$site_new"/mipscan-*.dist-info
  (cd "$ROOT" && "$MAIN_PY" -m pip install -q --no-build-isolation --no-deps --no-compile \
      --ignore-installed --prefix "$VENV" \
      "${BUILD_OPTS[@]}" \
      -Ccmake.build-type=RelWithDebInfo \
      -Cinstall.strip=false \
      -Cbuild-dir="$OUT/cmake" .)
fi

# The instrumented copy must be the one imported.
LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0 SANITIZE_VENV="$VENV" "$PY" -c '
import os, mipscan, mipscan._mipscan as m, sys
assert os.path.realpath(m.__file__).startswith(os.path.realpath(os.environ["SANITIZE_VENV"])), m.__file__
print("sanitize.sh: testing", m.__file__, "simd", mipscan.simd_level(), file=sys.stderr)'

export LD_PRELOAD="$PRELOAD"
export MIPSCAN_SANITIZED=1          # tests may shrink work under the (slow) sanitizers
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
cd "$ROOT"
if [ "$MODE" = thread ]; then
  # halt_on_error + exitcode: the first report fails the run (run pytest with -s to see
  # it: pytest's capture swallows what a dying process wrote); report_signal_unsafe=0:
  # Python's signal handlers call malloc (interpreter code, not ours); die_after_fork=0:
  # test_concurrency.py forks a multi-threaded process on purpose (the child must start a
  # pool of its own), which TSan otherwise refuses.
  export TSAN_OPTIONS="halt_on_error=1:exitcode=66:second_deadlock_stack=1:report_signal_unsafe=0:die_after_fork=0:suppressions=$ROOT/tools/tsan.supp"
  if [ "$#" -eq 0 ]; then
    set -- tests/test_concurrency.py tests/test_live.py -q -p no:cacheprovider
  fi
else
  # halt_on_error: the first finding fails the run with a stack trace.
  export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
  export PYTHONMALLOC=malloc          # let ASan see Python-side buffers too
  if [ "$#" -eq 0 ]; then
    set -- tests -q -p no:cacheprovider --ignore=tests/test_benchmarks.py
  fi
fi
exec "$PY" -m pytest "$@"
