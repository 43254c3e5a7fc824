#!/usr/bin/env bash
# Tests: installs the packages, builds everything (Release) and runs ctest.
# Tests that need ../shared/data (or AVX-512) report "Skipped" to ctest when
# it is absent (tests/skip.hpp), never "Passed".
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build -j"$(nproc)"
cd build
ctest --output-on-failure -j"$(nproc)" "$@"
