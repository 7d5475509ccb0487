"""Training-step throughput of the model alone (no DeepSpeed, no data loading), side by side.

Runs every requested variant in one process, interleaved over several rounds (machines are noisy),
and prints a table: step time, images/s, achieved FLOP/s, the fraction of a peak (given, or this
machine's measured ceiling, see bench_ceiling.py) and peak memory per step; writes JSON.

    python benchmarks/bench_model.py --preset small-cpu                # issue 8's small CPU config
    python benchmarks/bench_model.py --preset cifar10 --device cuda --batch 64 --precision bf16 \
        --variants attentive,channels_last,compile,unfused --peak-tflops 989

Variants: ``attentive`` (the config), ``local`` (depth-wise attention off), ``nvae`` (depth-wise
attention and non-local blocks off: the official code's NVAE mode), ``unfused`` (non-local blocks on
SDPA's unfused math path), ``channels_last``, ``compile`` (torch.compile), ``ckpt`` (activation
checkpointing).  FLOPs per image are the model's, counted by :func:`avi_scale.model.flops.count_flops`
(torch's ``FlopCounterMode`` on a fresh CPU model: convolutions, matmuls and attention at their true widths,
forward and backward; the ``ckpt`` variant's recomputation is not model FLOPs).  Peak memory: CUDA's peak allocated
bytes; on CPU the growth of the peak resident set of a fresh process over one step (``--memory``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avi_scale.config import load_config  # noqa: E402
from avi_scale.model import AttentiveVAE, count_parameters  # noqa: E402
from avi_scale.model.flops import count_flops  # noqa: E402

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
NVAE = LOCAL + ["model.nonlocal_places=[]"]
VARIANTS = ("attentive", "local", "nvae", "unfused", "channels_last", "compile", "ckpt")


def variant_overrides(v: str, preset: list[str], extra: list[str]) -> list[str]:
    return preset + extra + {"local": LOCAL, "nvae": NVAE, "ckpt": ["model.activation_checkpointing=true"]}.get(v, [])


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


def cpu_peak_step_mb(config: str, overrides: list[str], batch: int, channels_last: bool, unfused: bool) -> float:
    """Peak resident-set growth of one training step, in a fresh process (CPU)."""
    import subprocess

    # VmHWM (this address space's peak), not ru_maxrss: Linux carries the parent's peak across fork + exec
    code = (
        "import re, sys, torch; sys.path.insert(0, sys.argv[1]);"
        "from bench_model import build, make_batch; from avi_scale.model.layers import NonLocalBlock;"
        "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1));"
        f"NonLocalBlock.pad_for_fused_kernels = {not unfused};"
        f"cfg, m = build({config!r}, {overrides!r}, 'cpu', {channels_last});"
        f"x = make_batch(cfg, {batch}, 'cpu', {channels_last});"
        "before = hwm();"
        "m(x).loss.backward();"
        "print((hwm() - before) / 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small-cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--variants", default="attentive,local,nvae,unfused",
                    help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="the device's peak for the MFU column (default: measure this machine's ceiling)")
    ap.add_argument("--memory", action="store_true", help="CPU: also measure each variant's peak memory per step "
                                                          "in a fresh process")
    ap.add_argument("--json", default="", help="write results here")
    ap.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    return ap


def _prepare(v: str, args: argparse.Namespace, config: str, preset: list[str]) -> dict:
    """One variant, built and warmed up: its step function, FLOPs per step, parameters, warm-up time."""
    from avi_scale.model.layers import NonLocalBlock

    dtype = torch.bfloat16 if args.precision == "bf16" else None
    ov = variant_overrides(v, preset, args.overrides)
    cl = v == "channels_last"
    cfg, model = build(config, ov, args.device, cl)
    x = make_batch(cfg, args.batch, args.device, cl)
    flops = count_flops(cfg.model)["train_per_image"] * args.batch  # one training step of the batch
    step_model = torch.compile(model) if v == "compile" else model
    opt = torch.optim.Adamax(model.parameters(), lr=1e-3, eps=1e-3)

    def step(fused=v != "unfused"):
        NonLocalBlock.pad_for_fused_kernels = fused
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            loss = step_model(x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    warmup_s = time.perf_counter()
    for _ in range(2):  # warm-up (and compilation)
        step()
    run = dict(step=step, flops=flops, params=count_parameters(model), times=[],
               warmup_s=time.perf_counter() - warmup_s)
    if args.memory and args.device == "cpu":
        run["peak_mem_gb"] = cpu_peak_step_mb(config, ov, args.batch, cl, v == "unfused") / 1024
    return run


def _time_rounds(runs: dict, args: argparse.Namespace) -> None:
    """``args.rounds`` rounds, each timing ``args.steps`` steps of every variant in turn (interleaved)."""
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.rounds):
        for r in runs.values():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                r["step"]()
            sync()
            r["times"].append((time.perf_counter() - t0) / args.steps)
            if cuda:
                r["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9


def _table(runs: dict, args: argparse.Namespace, peak: float) -> list[dict]:
    base = None
    rows = []
    print(f"preset={args.preset} device={args.device} batch={args.batch} precision={args.precision}")
    print(f"{'variant':<14}{'params':>10}{'GFLOP/img':>11}{'s/step':>9}{'img/s':>9}{'TFLOP/s':>9}"
          f"{'of peak':>9}{'ratio':>7}{'peak GB':>9}")
    for v, r in runs.items():
        t = statistics.median(r["times"])
        base = base or t
        tflops = r["flops"] / t / 1e12
        mfu = tflops / peak
        row = dict(variant=v, params=r["params"], gflop_per_image=r["flops"] / args.batch / 1e9, step_s=t,
                   images_per_s=args.batch / t, tflops=tflops, fraction_of_peak=mfu, peak_tflops=peak,
                   ratio_to_first=t / base, peak_mem_gb=r.get("peak_mem_gb"), warmup_s=r["warmup_s"],
                   times=r["times"])
        rows.append(row)
        mem = f"{row['peak_mem_gb']:>9.2f}" if row["peak_mem_gb"] is not None else f"{'-':>9}"
        print(f"{v:<14}{r['params'] / 1e6:>9.2f}M{row['gflop_per_image']:>11.2f}{t:>9.3f}{row['images_per_s']:>9.1f}"
              f"{tflops:>9.3f}{mfu:>9.1%}{t / base:>7.2f}{mem}")
    return rows


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    config, preset = PRESETS[args.preset]
    peak = args.peak_tflops
    if not peak:
        from bench_ceiling import measure

        peak = measure(args.device, dtypes=(args.precision,))[args.precision]["ceiling"] / 1e3
        print(f"measured ceiling of this machine ({args.precision}): {peak * 1e3:.1f} GFLOP/s")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    runs = {v: _prepare(v, args, config, preset) for v in args.variants.split(",")}
    _time_rounds(runs, args)
    rows = _table(runs, args, peak)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), device=args.device, results=rows), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
