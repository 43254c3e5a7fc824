#!/usr/bin/env python3
"""Times the seed's nearest-code formula in PyTorch on the GPU (docs/cuda.md).

    d = (x**2).sum(1, keepdim=True) - 2 * x @ e.T + (e**2).sum(1);  a = d.argmin(1)

for the benchmark shapes (N, K, D), float32 inputs (TF32 off, PyTorch's
default for matmul), Gaussian data, CUDA-event timing: 3 warm-ups, median of
`--reps` runs. Writes JSON {"torch": version, "device": name, "rows": [...]}
to --json (and prints a table). Exits 0 with a note when torch or a GPU is
missing, so tools/gpu_check.sh can go on without it.
"""
import argparse
import json
import sys

SHAPES = [(16384, 1024, 1024), (16384, 1024, 256), (65536, 512, 64),
          (4096, 8192, 256), (1024, 65536, 32), (65536, 1024, 1024)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        print(f"torch not importable ({exc}): no torch baseline")
        return 0
    if not torch.cuda.is_available():
        print("torch has no CUDA device: no torch baseline")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    rows = []
    for (n, k, d) in SHAPES:
        g = torch.Generator(device=dev).manual_seed(n + k + d)
        x = torch.randn(n, d, device=dev, generator=g)
        e = torch.randn(k, d, device=dev, generator=g)

        def step():
            dist = (x ** 2).sum(1, keepdim=True) - 2 * x @ e.T + (e ** 2).sum(1)
            return dist.argmin(1)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        times.sort()
        ms = times[len(times) // 2]
        tflops = 2.0 * n * k * d / (ms * 1e-3) / 1e12
        rows.append({"N": n, "K": k, "D": d, "ms": ms, "tflops": tflops})
        print(f"torch formula  N={n:6d} K={k:6d} D={d:5d}  {ms:9.3f} ms  {tflops:7.1f} TFLOP/s")
        del x, e
        torch.cuda.empty_cache()
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
