"""Largest batch per device that trains, with and without activation checkpointing.

CUDA: a training step (forward, backward, optimizer) at growing batch sizes until it runs out of
memory, then bisection; prints the largest batch and its peak allocated memory.  CPU: the same search
against ``--budget-gb`` using each batch's measured peak memory per step (a fresh process per size),
so that the script is checked end to end without a GPU.

    python benchmarks/bench_memory.py --preset cifar10 --device cuda --precision bf16
    python benchmarks/bench_memory.py --preset small-cpu --budget-gb 2
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import PRESETS, build, cpu_peak_step_mb, make_batch, variant_overrides  # noqa: E402


def cuda_step_fits(config: str, overrides: list[str], batch: int, device: str, dtype) -> float | None:
    """Peak GB of one training step at ``batch``, or None when it runs out of memory."""
    model = x = opt = None
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cfg, model = build(config, overrides, device, False)
        x = make_batch(cfg, batch, device, False)
        opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = model(x).loss
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 1e9
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        del model, x, opt
        gc.collect()
        torch.cuda.empty_cache()


def largest(fits, start: int, limit: int) -> tuple[int, float | None]:
    """Largest batch b <= limit with fits(b) not None (doubling, then bisection)."""
    best, best_peak = 0, None
    b = start
    while b <= limit:
        peak = fits(b)
        if peak is None:
            break
        best, best_peak = b, peak
        b *= 2
    lo, hi = best, min(b, limit + 1)  # fits(lo) held (or lo == 0), fits(hi) failed or hi > limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        peak = fits(mid)
        if peak is None:
            hi = mid
        else:
            lo, best_peak = mid, peak
    return lo, best_peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small-cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--budget-gb", type=float, default=2.0, help="CPU: the memory a step may use")
    ap.add_argument("--start", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=4096)
    ap.add_argument("--json", default="")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    config, preset = PRESETS[args.preset]
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    rows = []
    print(f"preset={args.preset} device={args.device} precision={args.precision}"
          + (f" budget={args.budget_gb} GB" if args.device == "cpu" else ""))
    print(f"{'variant':<10}{'largest batch':>14}{'peak GB':>9}")
    for v in ("attentive", "ckpt"):
        ov = variant_overrides(v, preset, args.overrides)
        if args.device.startswith("cuda"):
            fits = lambda b, ov=ov: cuda_step_fits(config, ov, b, args.device, dtype)  # noqa: E731
        else:
            def fits(b, ov=ov):
                gb = cpu_peak_step_mb(config, ov, b, False, False) / 1024
                return gb if gb <= args.budget_gb else None
        batch, peak = largest(fits, args.start, args.max_batch)
        rows.append(dict(variant=v, largest_batch=batch, peak_gb=peak))
        print(f"{v:<10}{batch:>14}{peak if peak is not None else float('nan'):>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), results=rows), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
