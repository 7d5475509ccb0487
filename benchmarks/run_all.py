"""Every benchmark in one command: runs each script, prints a summary table, writes one JSON file.

    python benchmarks/run_all.py                      # CPU: the issue-8 small config, eval, memory, loader, engine
    python benchmarks/run_all.py --device cuda        # GPU: the paper's CIFAR-10 model (bf16) as well
    python benchmarks/run_all.py --quick              # fewer repeats (a smoke run, ~5 min on 2 cores)

Each script also runs on its own (see benchmarks/README.md); here their JSON results are gathered into
``--out`` (default ``benchmarks/results/<device>.json``) and the loader and engine reports, which are
printed tables, are kept as text.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run(script: str, args: list[str], want_json: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, str(HERE / script), *args] + (["--json", str(out)] if want_json else [])
        print(f"\n$ {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, text=True, capture_output=True)
        print(proc.stdout, end="", flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{script} failed with exit status {proc.returncode}")
        result = json.loads(out.read_text()) if want_json else {}
        result.update(stdout=proc.stdout, seconds=time.perf_counter() - t0)
        return result


def _summary(res: dict) -> None:
    """The headline figures of every part that ran."""
    r = res["results"]
    print("\n== summary (" + res["device"] + (f", {res['gpu']}" if res["gpu"] else "") + ")")
    for prec, rates in r.get("ceiling", {}).get("gflops", {}).items():
        print(f"ceiling {prec}: {rates['ceiling']:.1f} GFLOP/s")
    for key in ("model_small", "model_cifar10"):
        if key in r:
            for row in r[key]["results"]:
                print(f"{key:<14} {row['variant']:<14} {row['step_s']:8.3f} s/step {row['images_per_s']:9.1f} img/s "
                      f"{row['fraction_of_peak']:7.1%} of peak  x{row['ratio_to_first']:.2f}")
    for key in ("eval_small", "eval_cifar10"):
        if key in r:
            best = max(r[key]["results"], key=lambda row: row["images_per_s"])
            print(f"{key:<14} K={r[key]['args']['iw_samples']}: {best['images_per_s']:.2f} img/s (iw_chunk {best['iw_chunk']})")
    for key in ("memory_small", "memory_cifar10"):
        if key in r:
            print(f"{key:<14} " + ", ".join(f"{row['variant']}: batch {row['largest_batch']}" for row in r[key]["results"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", default="", help="comma list of parts to run (default all): ceiling, model, memory, "
                                                "eval, loader, engine")
    args = ap.parse_args(argv)
    parts = set(args.only.split(",")) if args.only else {"ceiling", "model", "memory", "eval", "loader", "engine"}
    q = args.quick
    steps = ["--steps", "1", "--rounds", "2"] if q else ["--steps", "3", "--rounds", "3"]
    res: dict = dict(device=args.device, machine=platform.processor() or platform.machine(),
                     cpus=torch.get_num_threads(), torch=torch.__version__,
                     gpu=torch.cuda.get_device_name() if args.device == "cuda" else None, results={})
    r = res["results"]
    if "ceiling" in parts:
        r["ceiling"] = run("bench_ceiling.py", ["--device", args.device])
    if "model" in parts:
        r["model_small"] = run("bench_model.py", ["--preset", "small-cpu", "--device", args.device, *steps,
                                                  "--variants", "attentive,local,nvae,unfused,channels_last"]
                               + (["--memory"] if args.device == "cpu" else []))
        if args.device == "cuda":
            r["model_cifar10"] = run("bench_model.py", ["--preset", "cifar10", "--device", "cuda", "--batch", "32",
                                                        "--precision", "bf16", "--peak-tflops", "989", *steps,
                                                        "--variants", "attentive,channels_last,unfused,compile,ckpt"])
    if "memory" in parts:
        if args.device == "cuda":
            r["memory_cifar10"] = run("bench_memory.py", ["--preset", "cifar10", "--device", "cuda",
                                                          "--precision", "bf16"])
        else:
            r["memory_small"] = run("bench_memory.py", ["--preset", "small-cpu", "--budget-gb", "0.5" if q else "1",
                                                        "--max-batch", "32" if q else "64"])
    if "eval" in parts:
        r["eval_small"] = run("bench_eval.py", ["--preset", "small-cpu", "--device", args.device, "-K", "20",
                                                "--chunks", "20,80", "--images", "8" if q else "32",
                                                "--rounds", "1" if q else "2"])
        if args.device == "cuda":
            r["eval_cifar10"] = run("bench_eval.py", ["--preset", "cifar10", "--device", "cuda", "-K", "1000",
                                                      "--chunks", "250,500,1000", "--images", "4" if q else "16"])
    if "loader" in parts:
        r["loader"] = run("bench_loader.py", ["--images", "2000" if q else "5000", "--epochs", "1" if q else "3"],
                          want_json=False)
    if "engine" in parts and not q:
        r["engine"] = run("bench_engine.py", [], want_json=False)

    _summary(res)
    out = args.out or HERE / "results" / f"{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
