#!/usr/bin/env bash
# tools/gpu_check.sh - one GPU check of the CUDA backend (docs/cuda.md):
# configure + build the CUDA targets, run the cuda-labelled tests, the CUDA
# benchmarks and the PyTorch baseline, and write ONE report.
#
#   tools/gpu_check.sh [OUTDIR]           OUTDIR defaults to $OUT, else build-gpucheck/report
#   tools/gpu_check.sh --pack-deps [DIR]  on a machine with vqkit's dependencies
#                                         installed: copy what a bare GPU machine
#                                         lacks (Eigen, nlohmann_json, Google
#                                         Benchmark, the test vectors) into DIR
#                                         (default build-gpudeps, git-ignored)
#
# On the lent GPU machine (see docs/cuda.md): run --pack-deps here once, then
# call the device with carry ["build-gpudeps"] and the command
#   tools/gpu_check.sh
# Files in OUTDIR: report.md (everything that matters), build.log, ctest.log,
# bench.json, torch.json. Budget: well inside 8 minutes on an H100 (build
# -j16 ~1-2 min, tests < 1 min, benchmarks ~1-2 min, torch < 1 min); each
# stage has its own timeout so a hang cannot eat the lease.
# Exit status 0 only when CUDA tests ran, none failed or skipped (a skip -
# exit 77, no device seen - fails the check on a GPU machine) and the
# benchmarks ran to the end; "- verdict:" in report.md says which failed.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)

if [[ "${1:-}" == "--pack-deps" ]]; then
  DIR=${2:-$ROOT/build-gpudeps}
  mkdir -p "$DIR/include" "$DIR/lib/cmake/Eigen3" "$DIR/lib/cmake/nlohmann_json" "$DIR/lib/cmake/benchmark" \
           "$DIR/data/vectors/glove100" "$DIR/data/vectors/digits"
  cp -r /usr/include/eigen3 "$DIR/include/"
  cp -r /usr/include/nlohmann "$DIR/include/"
  cp -r /usr/include/benchmark "$DIR/include/"
  cp -L /usr/lib/x86_64-linux-gnu/libbenchmark.so.1debian "$DIR/lib/libbenchmark.so.1debian"
  ver() { # name version
    cat > "$DIR/lib/cmake/$1/$1ConfigVersion.cmake" <<EOF
set(PACKAGE_VERSION "$2")
if(PACKAGE_FIND_VERSION VERSION_GREATER PACKAGE_VERSION)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
else()
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
endif()
EOF
  }
  cat > "$DIR/lib/cmake/Eigen3/Eigen3Config.cmake" <<'EOF'
get_filename_component(_vq_inc "${CMAKE_CURRENT_LIST_DIR}/../../../include/eigen3" ABSOLUTE)
if(NOT TARGET Eigen3::Eigen)
  add_library(Eigen3::Eigen INTERFACE IMPORTED)
  set_target_properties(Eigen3::Eigen PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_vq_inc}")
endif()
set(EIGEN3_INCLUDE_DIR "${_vq_inc}")
EOF
  cat > "$DIR/lib/cmake/nlohmann_json/nlohmann_jsonConfig.cmake" <<'EOF'
get_filename_component(_vq_inc "${CMAKE_CURRENT_LIST_DIR}/../../../include" ABSOLUTE)
if(NOT TARGET nlohmann_json::nlohmann_json)
  add_library(nlohmann_json::nlohmann_json INTERFACE IMPORTED)
  set_target_properties(nlohmann_json::nlohmann_json PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_vq_inc}")
endif()
EOF
  cat > "$DIR/lib/cmake/benchmark/benchmarkConfig.cmake" <<'EOF'
get_filename_component(_vq_root "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET benchmark::benchmark)
  find_package(Threads REQUIRED)
  add_library(benchmark::benchmark SHARED IMPORTED)
  set_target_properties(benchmark::benchmark PROPERTIES
    IMPORTED_LOCATION "${_vq_root}/lib/libbenchmark.so.1debian"
    IMPORTED_SONAME "libbenchmark.so.1debian"
    INTERFACE_INCLUDE_DIRECTORIES "${_vq_root}/include"
    INTERFACE_LINK_LIBRARIES Threads::Threads)
endif()
EOF
  ver Eigen3 3.4.0
  ver nlohmann_json "$(sed -n 's/^set(PACKAGE_VERSION "\([0-9.]*\)").*/\1/p' /usr/share/cmake/nlohmann_json/nlohmann_jsonConfigVersion.cmake | head -1)"
  ver benchmark 1.7.1
  S="$ROOT/../shared/data/vectors"
  cp "$S/glove100/glove100_base_10k.fvecs" "$S/glove100/glove100_query_1k.fvecs" "$DIR/data/vectors/glove100/" 2>/dev/null || true
  cp "$S/digits/digits_1797x64.fvecs" "$DIR/data/vectors/digits/" 2>/dev/null || true
  du -sh "$DIR"
  echo "packed into $DIR; carry it to the GPU machine (carry: [\"$(basename "$DIR")\"])"
  exit 0
fi

BUILD=${VQKIT_GPU_BUILD:-$ROOT/build-gpucheck}
OUTDIR=${1:-${OUT:-$BUILD/report}}
mkdir -p "$OUTDIR"
DEPS=${VQKIT_GPU_DEPS:-$ROOT/build-gpudeps}
JOBS=${JOBS:-16}
REPORT=$OUTDIR/report.md
T0=$(date +%s)
stamp() { echo "[$(($(date +%s) - T0)) s] $*"; }

NVCC=$(command -v nvcc || true)
[[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
DATA="$ROOT/../shared/data"
[[ -d "$DEPS/data/vectors" ]] && DATA="$DEPS/data"
PREFIX=()
[[ -d "$DEPS/lib/cmake" ]] && PREFIX=(-DCMAKE_PREFIX_PATH="$DEPS")
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)

{
  echo "# vqkit CUDA backend: GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') (working tree as sent)"
  echo "- nvidia-smi: \`$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>&1 | head -1)\`"
  echo "- nvcc: \`$("${NVCC:-nvcc}" --version 2>&1 | tail -1)\`"
} > "$REPORT"

stamp "configure"
timeout 180 cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DVQKIT_BUILD_TESTS=OFF -DVQKIT_BUILD_EXAMPLES=OFF -DVQKIT_CUDA=ON -DVQKIT_CUDA_TESTS=ON \
  -DVQKIT_CUDA_BENCHMARKS=ON -DCMAKE_CUDA_ARCHITECTURES="${VQKIT_GPU_ARCH:-90-real}" \
  ${NVCC:+-DCMAKE_CUDA_COMPILER="$NVCC"} "${PREFIX[@]}" \
  -DVQKIT_CUDA_DATA_DIR="$DATA" > "$OUTDIR/build.log" 2>&1
CFG=$?
stamp "build (-j$JOBS)"
BSTART=$(date +%s)
if [[ $CFG -eq 0 ]]; then
  timeout 240 cmake --build "$BUILD" -j"$JOBS" --target test_cuda_primitives test_cuda_layer test_cuda_edges test_cuda_device_layer bench_cuda_search \
    >> "$OUTDIR/build.log" 2>&1
  BLD=$?
else
  BLD=$CFG
fi
BTIME=$(($(date +%s) - BSTART))
{
  echo "- configure rc=$CFG, build rc=$BLD (${BTIME} s, -j$JOBS)"
  echo
} >> "$REPORT"
if [[ $BLD -ne 0 ]]; then
  { echo "## Build failed"; echo; echo '```'; tail -40 "$OUTDIR/build.log"; echo '```'; } >> "$REPORT"
  cat "$REPORT"
  exit 1
fi

stamp "tests"
# --no-tests=error: finding no test is a failure, not a pass. On this machine
# a skipped test (exit 77: no device seen) is a failure too.
(cd "$BUILD" && timeout 200 ctest -L cuda --no-tests=error --output-on-failure -V) > "$OUTDIR/ctest.log" 2>&1
TRC=$?
NRUN=$(grep -cE '^ *[0-9]+/[0-9]+ Test +#[0-9]+: .*(Passed|Failed|Exception|Timeout)' "$OUTDIR/ctest.log")
NSKIP=$(grep -cE '^ *[0-9]+/[0-9]+ Test +#[0-9]+: .*(Skipped|Not Run)' "$OUTDIR/ctest.log")
VERDICT=ok
if [[ $NRUN -eq 0 ]]; then
  VERDICT="FAILED: no CUDA test ran"
elif [[ $NSKIP -gt 0 ]]; then
  VERDICT="FAILED: $NSKIP CUDA test(s) skipped on the GPU machine (no device seen?)"
elif [[ $TRC -ne 0 ]]; then
  VERDICT="FAILED: ctest rc=$TRC"
fi
{
  echo "## Tests (ctest -L cuda, rc=$TRC; $NRUN ran, $NSKIP skipped: $VERDICT)"
  echo
  echo '```'
  grep -E "^\s*[0-9]+/[0-9]+ Test|tests passed|FAIL|SKIPPED|checks,|mismatches|candidates|EMA rel|inertia|differ|no finite|expected 0|splits|wrong|not run|bytes/step|restored" "$OUTDIR/ctest.log" | sed 's/^[0-9]*: //' | head -200
  echo '```'
  echo
} >> "$REPORT"

stamp "benchmarks"
BENCH="$BUILD/cuda/bench/bench_cuda_search"
timeout 180 "$BENCH" --benchmark_format=console --benchmark_out="$OUTDIR/bench.json" \
  --benchmark_out_format=json > "$OUTDIR/bench.log" 2>&1
BRC=$?
stamp "torch baseline"
timeout 90 python3 "$ROOT/tools/gpu_torch_baseline.py" --json "$OUTDIR/torch.json" > "$OUTDIR/torch.log" 2>&1
PRC=$?

stamp "report"
python3 - "$OUTDIR" "$BRC" "$PRC" >> "$REPORT" <<'EOF'
import json, os, sys
out, brc, prc = sys.argv[1], sys.argv[2], sys.argv[3]
def load(p):
    try:
        with open(os.path.join(out, p)) as f:
            return json.load(f)
    except Exception as e:  # noqa: BLE001
        return None
b, t = load("bench.json"), load("torch.json")
print(f"## Benchmarks (rc={brc}; torch rc={prc})\n")
if not b:
    print("no benchmark output (see bench.log)\n")
    sys.exit(0)
ctx = b.get("context", {})
rows = {}
for r in b.get("benchmarks", []):
    name = r["name"].split("/")
    kind = "/".join(name[:2]) if name[0] != "ema_step" else "ema_step"
    key = (int(r.get("N", 0)), int(r.get("K", 0)), int(r.get("D", 0)))
    if key == (0, 0, 0):
        parts = [p for p in name if p.isdigit()]
        key = tuple(int(p) for p in parts[:3]) if len(parts) >= 3 else key
    ms = r["real_time"] if r.get("time_unit") == "ms" else r["real_time"] / 1e6
    rows.setdefault(key, {})[kind] = (ms, r)
torch = {(r["N"], r["K"], r["D"]): r["ms"] for r in (t or {}).get("rows", [])}
peak = float(os.environ.get("VQKIT_GPU_PEAK_TFLOPS", "989"))
print(f"Dense BF16 peak used for %: {peak:g} TFLOP/s (H100 SXM; set VQKIT_GPU_PEAK_TFLOPS). "
      f"Times: median-free Google Benchmark means of CUDA-event times (ms).\n")
print("| N x K x D | fp32 ms | bf16+rerank ms | TFLOP/s | % BF16 peak | GB/s | cand/row | full rows | cuBLAS bf16+argmin ms | x vs cuBLAS | cuBLAS fp32+argmin ms | torch formula ms | x vs torch | EMA step ms |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for key in sorted(rows, key=lambda k: (k[0] * k[1] * k[2], k)):
    r = rows[key]
    N, K, D = key
    flops = 2.0 * N * K * D
    g = lambda k: r[k][0] if k in r else float("nan")
    f32, b16, cb, cf, ema = g("search/fp32"), g("search/bf16_rerank"), g("cublas_argmin/bf16"), g("cublas_argmin/fp32"), g("ema_step")
    tf = flops / (b16 * 1e-3) / 1e12
    # the fewest bytes a search must move: x and the codes read once, the indices written
    gbs = (4.0 * (N * D + K * D) + 8.0 * N) / (b16 * 1e-3) / 1e9
    cand = r["search/bf16_rerank"][1].get("cand", float("nan")) if "search/bf16_rerank" in r else float("nan")
    fb = r["search/bf16_rerank"][1].get("fallback_rows", float("nan")) if "search/bf16_rerank" in r else float("nan")
    tm = torch.get(key, float("nan"))
    print(f"| {N} x {K} x {D} | {f32:.3f} | {b16:.3f} | {tf:.1f} | {100 * tf / peak:.1f}% | {gbs:.0f} | {cand:.2f} | {fb:.0f} | "
          f"{cb:.3f} | {cb / b16:.2f}x | {cf:.3f} | {tm:.3f} | {tm / b16:.2f}x | {ema:.3f} |")
print()
print("Targets (65536 x 1024 x 1024, bf16+rerank): >= 50% of dense BF16 peak, >= 1.3x cuBLAS+argmin, >= 5x torch formula.")
if t:
    print(f"\ntorch {t.get('torch')} on {t.get('device')} (fp32, TF32 off).")
print(f"\nGoogle Benchmark context: {ctx.get('host_name', '?')}, {ctx.get('num_cpus', '?')} CPUs, build {ctx.get('library_build_type', '?')}.")
EOF
# The check passes only if CUDA tests ran, none skipped or failed, and the
# benchmarks ran to the end (the PyTorch baseline is reported, not required).
RC=0
[[ "$VERDICT" == ok ]] || RC=1
if [[ $BRC -ne 0 ]]; then
  VERDICT="$VERDICT; FAILED: benchmarks rc=$BRC (bench.log; 77 = no device)"
  RC=1
elif ! python3 -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get("benchmarks") else 1)' \
    "$OUTDIR/bench.json" 2>/dev/null; then
  VERDICT="$VERDICT; FAILED: the benchmarks wrote no results (bench.log)"
  RC=1
fi
echo "- verdict: $VERDICT" >> "$REPORT"
stamp "done: $REPORT"
cat "$REPORT"
exit $RC
