#!/usr/bin/env bash
# Installs what bench/compare_faiss needs on Debian 12, beyond tools/install_deps.sh:
# FAISS (libfaiss-dev) and the OpenMP build of OpenBLAS, and makes sure the
# OpenMP OpenBLAS is the BLAS that libblas.so.3 resolves to (FAISS's static
# library links libblas.so; the pthreads OpenBLAS spins against FAISS's
# OpenMP threads at 2 threads). The default build and the tests need none of
# this. Uses sudo when not root. See docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install_deps.sh
# python3-torch: the PyTorch seed block of tools/compare_step.py (Debian 12: 1.13).
packages=(libfaiss-dev libopenblas0-openmp python3-torch)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ ${#missing[@]} -gt 0 ]; then
  echo "install_bench_deps: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Select the OpenMP OpenBLAS explicitly (auto mode would pick it by priority,
# unless the pthreads build is installed too or the link was set by hand).
multiarch="$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)"
libdir="/usr/lib/${multiarch}"
for lib in libblas.so.3 liblapack.so.3; do
  want="${libdir}/openblas-openmp/${lib}"
  if [ -e "$want" ] && [ "$(readlink -f "${libdir}/${lib}")" != "$(readlink -f "$want")" ]; then
    echo "install_bench_deps: update-alternatives --set ${lib}-${multiarch} ${want}"
    $sudo update-alternatives --set "${lib}-${multiarch}" "$want"
  fi
done
echo "install_bench_deps: libblas.so.3 -> $(readlink -f "${libdir}/libblas.so.3")"
