#!/usr/bin/env bash
# Builds mipscan with fault injection (CMake option MIPSCAN_FAULT_INJECTION: allocations
# and thread starts in the C++ core fail at random, see src/mipscan/_core/fault.h) and runs
# tests/test_faults.py against it: many builds and searches, each case in its own process
# under MIPSCAN_FAULTS=seed:probability; each operation must give the fault-free answer or
# raise MemoryError/RuntimeError, and no process may abort.
#
#   tools/faults.sh              # 200 cases
#   MIPSCAN_FAULT_CASES=1000 tools/faults.sh -x   # extra arguments go to pytest
#
# The instrumented module lives in $FAULTS_DIR (default build/faults): cmake/ holds the
# build, pkg/mipscan a copy of the Python package with the fault-injected extension. The
# normal in-place module (src/mipscan) is not touched.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
OUT="${FAULTS_DIR:-$ROOT/build/faults}"
cd "$ROOT"
cmake -S . -B "$OUT/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMIPSCAN_FAULT_INJECTION=ON \
  -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dnanobind_ROOT="$("$PY" -m nanobind --cmake_dir)" >/dev/null
cmake --build "$OUT/cmake" -j2
rm -rf "$OUT/pkg"
mkdir -p "$OUT/pkg"
(cd src && find mipscan -name '*.py' -not -path '*/_core/*' -exec cp --parents {} "$OUT/pkg" \;)
cp "$OUT"/cmake/_mipscan*.so "$OUT/pkg/mipscan/"
export MIPSCAN_FAULTS_PKG="$OUT/pkg"
export MIPSCAN_FAULT_CASES="${MIPSCAN_FAULT_CASES:-200}"
PYTHONPATH="$ROOT/src" exec "$PY" -m pytest tests/test_faults.py -q -s -p no:cacheprovider "$@"
