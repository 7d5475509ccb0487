"""This machine's measured matrix/convolution ceiling: the FLOP rate of large, well-shaped kernels.

The model benchmarks report their rate as a fraction of this ceiling (a measured peak, not a datasheet
one).  fp32 and bf16 matmul (2048^3) and a 3x3 convolution at 256 channels (batch 16, 16x16 -- the
shape class of the CIFAR-10 model's cells), each timed over several repeats; the best of the kernels
is the ceiling for its precision.

    python benchmarks/bench_ceiling.py [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _rate(fn, flops: float, device: str, min_seconds: float = 0.5) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync()
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return flops * n / dt


def measure(device: str = "cpu", dtypes=("fp32", "bf16"), min_seconds: float = 0.5) -> dict[str, dict[str, float]]:
    """{precision: {kernel: GFLOP/s, "ceiling": best}}."""
    out: dict[str, dict[str, float]] = {}
    torch.manual_seed(0)
    for name in dtypes:
        dt = torch.bfloat16 if name == "bf16" else torch.float32
        n = 2048 if device.startswith("cuda") or dt == torch.float32 else 512  # CPUs without bf16 units are slow
        a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
        x = torch.randn(16, 256, 16, 16, device=device, dtype=dt)
        w = torch.randn(256, 256, 3, 3, device=device, dtype=dt)
        rates = {
            f"matmul {n}^3": _rate(lambda: a @ b, 2 * n ** 3, device, min_seconds) / 1e9,
            "conv3x3 256ch 16x16 b16": _rate(lambda: F.conv2d(x, w, padding=1), 2 * 16 * 256 * 256 * 9 * 256, device,
                                             min_seconds) / 1e9,
        }
        xc = x.contiguous(memory_format=torch.channels_last)
        rates["conv3x3 channels_last"] = _rate(lambda: F.conv2d(xc, w, padding=1), 2 * 16 * 256 * 256 * 9 * 256,
                                               device, min_seconds) / 1e9
        rates["ceiling"] = max(rates.values())
        out[name] = rates
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    res = measure(args.device)
    print(f"device={args.device} threads={torch.get_num_threads()}")
    print(f"{'precision':<10}{'kernel':<28}{'GFLOP/s':>10}")
    for prec, rates in res.items():
        for k, v in rates.items():
            print(f"{prec:<10}{k:<28}{v:>10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=args.device, threads=torch.get_num_threads(), gflops=res),
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
