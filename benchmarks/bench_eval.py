"""Importance-weighted NLL throughput (images/s), side by side for several ``iw_chunk`` groupings.

``iw_chunk = K`` evaluates one image per forward pass (K samples); larger chunks put ``chunk // K``
images into one pass.  Every setting evaluates the same images with the same seeds, so the NLLs agree
to float rounding (printed) and only the speed differs.

    python benchmarks/bench_eval.py --preset small-cpu -K 20 --chunks 20,80,320
    python benchmarks/bench_eval.py --preset cifar10 --device cuda -K 1000 --chunks 250,500,1000 --images 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import PRESETS, build, make_batch  # noqa: E402
from avi_scale.evaluate.nll import evaluate_nll  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small-cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("-K", "--iw-samples", type=int, default=20)
    ap.add_argument("--chunks", default="20,80,320", help="comma list of eval.iw_chunk values")
    ap.add_argument("--images", type=int, default=32, help="test images per setting")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default="")
    ap.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    args = ap.parse_args(argv)
    config, preset = PRESETS[args.preset]
    cfg, model = build(config, preset + args.overrides, args.device, False)
    model.eval()
    torch.manual_seed(0)
    x = make_batch(cfg, args.images, "cpu", False)
    chunks = [int(c) for c in args.chunks.split(",")]
    evaluate_nll(model, [x[:2]], iw_samples=2, iw_chunk=4)  # warm-up
    times: dict[int, list[float]] = {c: [] for c in chunks}
    nll: dict[int, float] = {}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for _ in range(args.rounds):
        for c in chunks:
            sync()
            t0 = time.perf_counter()
            r = evaluate_nll(model, [x], iw_samples=args.iw_samples, iw_chunk=c)
            sync()
            times[c].append(time.perf_counter() - t0)
            nll[c] = r.nll
    print(f"preset={args.preset} device={args.device} K={args.iw_samples} images={args.images}")
    print(f"{'iw_chunk':>9}{'img/pass':>9}{'s':>9}{'img/s':>9}{'speed-up':>9}{'NLL (nats)':>13}")
    rows, base = [], None
    for c in chunks:
        t = min(times[c])
        base = base or t
        row = dict(iw_chunk=c, images_per_pass=max(1, c // args.iw_samples), seconds=t,
                   images_per_s=args.images / t, speedup=base / t, nll=nll[c])
        rows.append(row)
        print(f"{c:>9}{row['images_per_pass']:>9}{t:>9.2f}{row['images_per_s']:>9.2f}{base / t:>9.2f}{nll[c]:>13.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), results=rows), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
