#!/usr/bin/env python3
"""Side-by-side training step: vqkit's QuantizerBlock against PyTorch (issue 12 part 5).

Runs bench/step_compare.cpp (target vqkit_step_compare) and
tools/torch_seed_block.py alternately, as separate processes (vqkit, torch,
vqkit, torch, ... one pair per round), for (B, N) in (2, 64), (4, 1024),
(16, 1024) and 1 and 2 threads, and prints per shape and thread count:

  steady   median step time after the refine step (steady state)
  first    step 0
  init     the step where the first k-means init runs: the first step at
           which the memory bank holds >= 2*K = 2048 rows
  refine   the step where the bank (20*K = 20480 rows) first becomes full and
           the k-means init runs again
  slowest  the slowest step of the run (normally the refine step)

for each implementation (the median over rounds, with the range) and the
ratio torch/vqkit (the median of the per-round ratios: each round's two runs
are adjacent in time, so a busy machine hits both). A ratio > 1 means vqkit
is faster.

Each run takes --steps steps; by default refine + 6, i.e. 5 steady-state
steps after the refine step (at (2, 64), 128 rows a step, the bank fills at
step 159: 166 steps). Both programs report at which steps their k-means
init ran; a mismatch with the expected steps is printed as a warning.

Examples:
  tools/compare_step.py --quick --vqkit build-step/bench/vqkit_step_compare
  tools/compare_step.py --rounds 3          # the full table (long: tens of minutes)
Every command line is printed. Per-run JSON and a summary go to --out.
"""
import argparse
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(2, 64), (4, 1024), (16, 1024)]
THREADS = [1, 2]
K = 1024
INIT_ROWS = 2 * K    # vqkit's default init_min_rows, and the torch block's
BANK_ROWS = 20 * K   # vqkit's default memory_bank_size, and the torch block's


def schedule(rows_per_step):
    """(init step, refine step) for a run with rows_per_step rows a step."""
    init = math.ceil(INIT_ROWS / rows_per_step) - 1
    refine = math.ceil(BANK_ROWS / rows_per_step) - 1
    return init, max(init, refine)


def default_python():
    """An interpreter that can import torch: this one, else Debian's."""
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    return "/usr/bin/python3"


def openblas_core(python, env_extra=None):
    """The kernel set OpenBLAS picks for torch here ("Core: ..." of
    OPENBLAS_VERBOSE=2), with env_extra (e.g. OPENBLAS_CORETYPE) set."""
    env = dict(os.environ)
    env.update(env_extra or {})
    env["OPENBLAS_VERBOSE"] = "2"
    probe = "import torch; (torch.ones(64, 64) @ torch.ones(64, 64)).sum()"
    p = subprocess.run([python, "-c", probe], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("Core: "):
            return line[len("Core: "):].strip()
    return "unknown (not OpenBLAS, or it printed nothing)"


def report_openblas(core, how_to_set, env_extra=None):
    """Prints the OpenBLAS core torch runs and warns on the SSE3 fallback;
    how_to_set names the way to pick another (an option or a variable)."""
    coretype = (env_extra or {}).get("OPENBLAS_CORETYPE")
    print(f"OpenBLAS kernels for torch: {core}"
          + (f" (OPENBLAS_CORETYPE={coretype})" if coretype else ""))
    if core == "Prescott":
        print("  warning: OpenBLAS does not know this CPU and runs its SSE3 kernels, which makes\n"
              f"  PyTorch's GEMMs slow; {how_to_set} (e.g. SkylakeX or Cooperlake on an\n"
              "  AVX-512 CPU, Haswell on an AVX2 one) for a fair comparison")


def find_program(path, build_hint):
    """path as given when it exists from the current directory, else from the
    repository root; exits naming build_hint when neither exists."""
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(REPO, path)
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: {build_hint}")
    return path


def run_one(cmd, env_extra, verbose, cwd=None, merge_stderr=False):
    """Runs cmd with env_extra added, printing the command line; returns
    (stdout, wall seconds). Exits with the output's tail when cmd fails.
    verbose shows stderr (with merge_stderr, the merged output)."""
    env = dict(os.environ)
    env.update(env_extra)
    line = " ".join(f"{k}={v}" for k, v in env_extra.items()) + " " + shlex.join(cmd)
    print(f"  $ {line}", flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if verbose:
        sys.stdout.write(p.stdout if merge_stderr else p.stderr)
    if p.returncode != 0:
        sys.stdout.write(p.stdout[-6000:] if merge_stderr else p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"command failed with exit status {p.returncode}: {line}")
    return p.stdout, wall


def figures(data, init, refine):
    ms = data["step_ms"]
    steady = ms[refine + 1:]
    slow = max(range(len(ms)), key=lambda i: ms[i])
    return {
        "steady": statistics.median(steady) if steady else float("nan"),
        "first": ms[0],
        "init": ms[init] if init < len(ms) else float("nan"),
        "refine": ms[refine] if refine < len(ms) else float("nan"),
        "slowest": ms[slow],
        "slowest_step": slow,
        "init_steps": data.get("init_steps"),
        "usage_last": (data.get("usage") or [None])[-1],
        "vq_loss_last": (data.get("vq_loss") or [None])[-1],
    }


def fmt_ms(v):
    if v != v:  # nan
        return "-"
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.1f} ms"


def med_range(vals, f):
    vals = [v for v in vals if v == v]
    if not vals:
        return "-"
    m = statistics.median(vals)
    if len(vals) == 1:
        return f(m)
    return f"{f(m)} [{f(min(vals))}-{f(max(vals))}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[1:]))
    ap.add_argument("--vqkit", default="build-dev/bench/vqkit_step_compare",
                    help="the vqkit_step_compare program (relative paths: to the repository root "
                         "unless they exist from the current directory)")
    ap.add_argument("--torch-script", default=os.path.join(REPO, "tools", "torch_seed_block.py"))
    ap.add_argument("--python", default=default_python(),
                    help="interpreter for the torch script (default: one that imports torch)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per run (default: refine step + 6, i.e. 5 steady-state steps)")
    ap.add_argument("--quick", action="store_true", help="only (4, 1024), 1 thread, 1 round")
    ap.add_argument("--shapes", default=None, help="B:N list, e.g. 4:1024,16:1024")
    ap.add_argument("--threads", default=None, help="thread counts, e.g. 1,2")
    ap.add_argument("--out", default=os.path.join(REPO, "runs", "step_compare"),
                    help="folder for each run's JSON and summary.json")
    ap.add_argument("--verbose", action="store_true", help="show each step's line")
    ap.add_argument("--search-precision", default="fp32", choices=["fp32", "bf16_rerank"],
                    help="vqkit's search arithmetic (bf16_rerank: the same indices, faster at D >= 256 "
                         "where the CPU has AVX512-BF16); PyTorch always runs fp32")
    args = ap.parse_args()

    vq = find_program(args.vqkit, "build it (cmake -DVQKIT_BUILD_BENCHMARKS=ON, target "
                                  "vqkit_step_compare) or pass --vqkit")
    shapes, threads, rounds = SHAPES, THREADS, args.rounds
    if args.quick:
        shapes, threads, rounds = [(4, 1024)], [1], 1
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
    if args.threads:
        threads = [int(t) for t in args.threads.split(",")]
    if rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    os.makedirs(args.out, exist_ok=True)

    blas = os.path.realpath("/usr/lib/x86_64-linux-gnu/libblas.so.3")
    print(f"vqkit: {vq}\ntorch: {args.python} {args.torch_script} (libblas.so.3 -> {blas})")
    core = openblas_core(args.python)
    report_openblas(core, "set OPENBLAS_CORETYPE")
    print(f"rounds {rounds}; each round runs vqkit then torch; output in {args.out}\n")

    summary = []
    for (B, N) in shapes:
        rows = B * N
        init, refine = schedule(rows)
        steps = args.steps if args.steps else refine + 6
        for T in threads:
            print(f"== B={B} N={N} ({rows} rows/step), {T} thread(s), {steps} steps; "
                  f"expected init at step {init}, refine at step {refine}")
            env = {"OMP_NUM_THREADS": str(T), "OPENBLAS_NUM_THREADS": str(T)}
            res = {"vqkit": [], "torch": []}
            for r in range(rounds):
                for impl in ("vqkit", "torch"):
                    path = os.path.join(args.out, f"{impl}_B{B}_N{N}_T{T}_r{r}.json")
                    flags = ["--batch", str(B), "--tokens", str(N), "--threads", str(T),
                             "--steps", str(steps), "--seed", str(r), "--json", path]
                    cmd = ([vq] if impl == "vqkit" else [args.python, args.torch_script]) + flags
                    if impl == "vqkit":
                        cmd += ["--search-precision", args.search_precision]
                    _, wall = run_one(cmd, env, args.verbose)
                    with open(path) as f:
                        data = json.load(f)
                    fig = figures(data, init, refine)
                    res[impl].append(fig)
                    want = [init] if refine == init or refine >= steps else [init, refine]
                    if init >= steps:
                        want = []
                    if fig["init_steps"] is not None and fig["init_steps"] != want:
                        print(f"  WARNING: {impl} ran its k-means init at steps {fig['init_steps']}, "
                              f"expected {want}")
                    print(f"    {impl:5s} round {r}: steady {fmt_ms(fig['steady'])}, first "
                          f"{fmt_ms(fig['first'])}, refine {fmt_ms(fig['refine'])}, slowest "
                          f"{fmt_ms(fig['slowest'])} (step {fig['slowest_step']}); usage "
                          f"{fig['usage_last']}, vq loss {fig['vq_loss_last']:.4g}  "
                          f"[{wall:.1f} s]", flush=True)
            print_table(B, N, T, init, refine, res)
            summary.append({"batch": B, "tokens": N, "threads": T, "steps": steps,
                            "init_step": init, "refine_step": refine, "rounds": res})
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"summary: {os.path.join(args.out, 'summary.json')}")
    return 0


def print_table(B, N, T, init, refine, res):
    keys = [("steady", f"steady (median of steps > {refine})"), ("first", "first (step 0)"),
            ("init", f"init (step {init})"), ("refine", f"refine (step {refine})"),
            ("slowest", "slowest step")]
    print(f"\n  B={B} N={N} threads={T}: median over {len(res['vqkit'])} round(s) [range]")
    w = 30
    print(f"  {'':{w}s} {'vqkit':>26s} {'torch':>26s} {'torch/vqkit':>22s}")
    for key, label in keys:
        v = [f[key] for f in res["vqkit"]]
        t = [f[key] for f in res["torch"]]
        ratios = [b / a for a, b in zip(v, t) if a == a and b == b and a > 0]
        print(f"  {label:{w}s} {med_range(v, fmt_ms):>26s} {med_range(t, fmt_ms):>26s} "
              f"{med_range(ratios, lambda x: f'{x:.2f}x'):>22s}")
    print()


if __name__ == "__main__":
    sys.exit(main())
