#!/usr/bin/env bash
# Set-up and main job: installs the packages, builds vqkit (Release) and runs
# the vq_train demo. Arguments are passed to vq_train (none: its built-in
# Gaussian-mixture default).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build -j"$(nproc)" --target vq_train
exec ./build/examples/vq_train "$@"
