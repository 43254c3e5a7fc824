#!/usr/bin/env bash
# Installs the Debian 12 packages vqkit's build, tests, examples and benchmarks
# need. Does nothing when they are all present; uses sudo when not root.
set -euo pipefail
packages=(build-essential cmake libeigen3-dev nlohmann-json3-dev catch2 libbenchmark-dev)
# The fuzzing stage of .ci/run: clang with libFuzzer and the sanitizer runtimes.
packages+=(clang libclang-rt-14-dev)
# Data-parallel training over MPI (tests/test_distributed_mpi.cpp, ctest -L mpi).
packages+=(libopenmpi-dev openmpi-bin)
# The package test's pkg-config check (tests/consumer/run.cmake; skipped without it).
packages+=(pkgconf)
# PNG curves of examples/train_tokenizer (it skips the plots without gnuplot).
packages+=(gnuplot-nox)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "install_deps: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
