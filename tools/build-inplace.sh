#!/usr/bin/env bash
# Developer loop without pip: builds the extension with CMake into build/inplace and copies
# it next to src/mipscan/__init__.py, so that `PYTHONPATH=src python -m pytest` (or any
# script) imports this checkout's code. Several checkouts (git worktrees) can share one
# venv this way, each with its own build.
#   tools/build-inplace.sh [extra cmake -D options]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
cd "$ROOT"
cmake -S . -B build/inplace -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dnanobind_ROOT="$("$PY" -m nanobind --cmake_dir)" "$@" >/dev/null
cmake --build build/inplace -j2
# Copied beside the old module and renamed over it: a process that has the old one loaded
# keeps its (unlinked) file, where copying over it in place would change its code under it.
for so in build/inplace/_mipscan*.so; do
  cp "$so" "src/mipscan/.$(basename "$so").new"
  mv -f "src/mipscan/.$(basename "$so").new" "src/mipscan/$(basename "$so")"
done
