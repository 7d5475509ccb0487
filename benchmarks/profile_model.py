"""Where a training step's time goes: the PyTorch profiler's table of the most expensive ops.

    python benchmarks/profile_model.py --preset cifar10 --device cuda --batch 32 --precision bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_model import PRESETS, build, make_batch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small-cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--trace", default="", help="write a Chrome trace here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    config, preset = PRESETS[args.preset]
    cfg, model = build(config, preset + args.overrides, args.device, False)
    x = make_batch(cfg, args.batch, args.device, False)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    dev = args.device.split(":")[0]

    def step():
        with torch.autocast(dev, dtype=dtype, enabled=dtype is not None):
            loss = model(x).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(2):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=15))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
