"""Training-step throughput of the model alone (no DeepSpeed, no data loading), side by side.

Runs every requested variant in one process, interleaved over several rounds (machines are noisy),
and prints a table: step time, images/s, achieved FLOP/s and the fraction of a peak; writes JSON.

    python benchmarks/bench_model.py --preset small-cpu                # issue 8's small CPU config
    python benchmarks/bench_model.py --preset cifar10 --device cuda --batch 64 --precision bf16 \
        --variants eager,channels_last,compile --peak-tflops 989

FLOPs are counted exactly from the model with ``torch.utils.flop_counter.FlopCounterMode``
(convolutions, matmuls and attention; forward and backward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avi_scale.config import load_config  # noqa: E402
from avi_scale.model import AttentiveVAE, count_parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# issue 8's "small configuration" of the official code: 4 layers of 20x16x16, 32 filters, 2 blocks per
# cell, non-local blocks (key 32) in preprocessing, encoder and decoder cells, depth-wise attention 20 + LN
SMALL = ["model.num_layers=4", "model.num_filters=32", "model.nonlocal_key_dim=32",
         "model.nonlocal_places=[preprocess,encoder,decoder]", "model.log_sigma_noise=0.0"]
PRESETS = {
    "small-cpu": ("cifar10_attentive.yaml", SMALL),
    "cifar10": ("cifar10_attentive.yaml", []),
    "cifar10-nvae16": ("cifar10_nvae16.yaml", []),
}
LOCAL = ["model.prior_attention.enabled=false", "model.posterior_attention.enabled=false"]


def build(config: str, overrides: list[str], device: str, channels_last: bool):
    cfg = load_config(REPO / "configs" / config, overrides)
    model = AttentiveVAE(cfg.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return cfg, model


def make_batch(cfg, batch: int, device: str, channels_last: bool) -> torch.Tensor:
    m = cfg.model
    x = torch.randint(0, 256, (batch, m.image_channels, m.image_size, m.image_size), device=device).float() / 255
    if m.likelihood == "bernoulli":
        x = (x > 0.5).float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def count_flops(model, x) -> float:
    """FLOPs of one forward + backward on batch ``x``."""
    with FlopCounterMode(display=False) as counter:
        model(x).loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small-cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--variants", default="attentive,local",
                    help="comma list of: attentive, local, channels_last, compile, ckpt")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak, for the MFU column")
    ap.add_argument("--json", default="", help="write results here")
    ap.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    args = ap.parse_args(argv)

    config, preset = PRESETS[args.preset]
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    runs = {}
    for v in args.variants.split(","):
        ov = preset + args.overrides + (LOCAL if v == "local" else [])
        if v == "ckpt":
            ov = ov + ["model.activation_checkpointing=true"]
        cl = v == "channels_last"
        cfg, model = build(config, ov, args.device, cl)
        x = make_batch(cfg, args.batch, args.device, cl)
        flops = count_flops(model, x)
        step_model = torch.compile(model) if v == "compile" else model
        opt = torch.optim.Adamax(model.parameters(), lr=1e-3, eps=1e-3)

        def step(step_model=step_model, opt=opt, x=x):
            with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                loss = step_model(x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(2):  # warm-up (and compilation)
            step()
        runs[v] = dict(step=step, flops=flops, params=count_parameters(model), times=[])

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for _ in range(args.rounds):
        for v, r in runs.items():
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                r["step"]()
            sync()
            r["times"].append((time.perf_counter() - t0) / args.steps)
            if args.device.startswith("cuda"):
                r["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9

    base = None
    rows = []
    print(f"preset={args.preset} device={args.device} batch={args.batch} precision={args.precision}")
    print(f"{'variant':<14}{'params':>10}{'GFLOP/img':>11}{'s/step':>9}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}{'ratio':>7}")
    for v, r in runs.items():
        t = statistics.median(r["times"])
        base = base or t
        tflops = r["flops"] / t / 1e12
        mfu = tflops / args.peak_tflops if args.peak_tflops else float("nan")
        row = dict(variant=v, params=r["params"], gflop_per_image=r["flops"] / args.batch / 1e9, step_s=t,
                   images_per_s=args.batch / t, tflops=tflops, mfu=mfu, ratio_to_first=t / base,
                   peak_mem_gb=r.get("peak_mem_gb"))
        rows.append(row)
        print(f"{v:<14}{r['params'] / 1e6:>9.2f}M{row['gflop_per_image']:>11.2f}{t:>9.3f}{row['images_per_s']:>9.1f}"
              f"{tflops:>9.3f}{mfu:>7.1%}{t / base:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), results=rows), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
