"""The engine's costs on this machine, as ratios from one run (nothing is asserted).

1. Activation checkpointing (model config ``activation_checkpointing``): time of a training step
   (forward + backward of the model) and its memory, without and with: the activations held at the
   end of the forward pass (resident memory then minus just before the step) and the step's peak
   (sampled every millisecond from /proc).  glibc's freed memory is trimmed before each step (torch's
   CPU allocator does not cache), so the resident set follows live tensors.  Issue 4's target: memory <= 1/3 at <= 35% extra time.
2. ZeRO stage 0 vs 2 vs 3, 2 ranks through the deepspeed launcher: memory per rank, largest over
   ranks, from the engine's metrics: ``model_state_mb`` (weights, ZeRO's fp32 copies, gradients kept
   between steps, Adamax moments: counted tensor by tensor) and ``mem_mb`` (resident memory after a
   step, which adds the interpreter, libraries, buffers and activations; ``peak_mem_mb``, set by
   DeepSpeed's start-up copies, is printed too).
3. Throughput of 1 vs 2 ranks (ZeRO-0, the same micro-batch per rank): images/s of the engine,
   measured after warm-up steps.

    python benchmarks/bench_engine.py [--data DIR] [--batch 32] [--steps 6]

``--data``: shards written by ``avi-shards mnist5k`` (made in a temporary directory otherwise).
Every engine run is a fresh process (``python -m avi_scale.cli`` or ``launch/deepspeed_single_node.sh``)
whose metrics are read back from its ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PAGE = os.sysconf("SC_PAGE_SIZE")

# the model of configs/tiny_mnist5k.yaml: 4 layers, 16 filters, non-local blocks in the decoder
AC_CONFIG = REPO / "configs" / "tiny_mnist5k.yaml"
# wide (11.9M parameters) so that model states (weights, gradients, 2 Adamax moments) are visible next
# to the process's own ~0.5 GB; DeepSpeed's communication buckets are cut to 2M elements so that their fixed buffers
# (the 50M-element defaults are sized for large GPU models) do not hide the partitioning
ZERO_MODEL = ["model.num_layers=4", "model.num_filters=128", "model.latent_channels=16",
              "model.nonlocal_places=[]", "model.num_blocks=1", "deepspeed.reduce_bucket_size=2000000",
              "deepspeed.allgather_bucket_size=2000000", "deepspeed.stage3_prefetch_bucket_size=2000000"]


# glibc raises its mmap threshold after large frees and then keeps freed tensors in its heap, so the
# resident set stops following live memory; a fixed threshold keeps large tensors in mmaps that are
# returned on free (used for the ZeRO comparison, whose runs are separate processes)
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _release_free_memory() -> None:
    """Hand memory that glibc keeps after frees back to the system, so that the resident set
    before a measured step holds only live data."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


class _PeakRSS:
    """Samples the resident set size of this process in a thread while active."""

    def __enter__(self):
        self.start = _rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def grown_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def activation_checkpointing(batch: int, repeats: int) -> dict:
    """Step time and activation memory of the model with and without activation checkpointing,
    interleaved (this machine is shared) and summarised by the median."""
    import torch

    from avi_scale.config import load_config
    from avi_scale.model import AttentiveVAE

    base = load_config(AC_CONFIG).model
    models = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        models[ckpt] = AttentiveVAE(load_config(AC_CONFIG, [f"model.activation_checkpointing={ckpt}"]).model)
    models[True].load_state_dict(models[False].state_dict())
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, base.image_channels, base.image_size, base.image_size, generator=gen) > 0.5).float()

    def step(model, after_forward=None):
        model.zero_grad(set_to_none=False)
        torch.manual_seed(1)
        loss = model(x).loss
        if after_forward is not None:
            after_forward.append(_rss())
        loss.backward()

    for model in models.values():  # warm-up: kernels, gradient buffers
        step(model)
        step(model)
    times: dict = {False: [], True: []}
    saved: dict = {False: [], True: []}
    peaks: dict = {False: [], True: []}
    for _ in range(repeats):
        for ckpt, model in models.items():
            _release_free_memory()
            after_forward: list = []
            with _PeakRSS() as peak:
                t0 = time.perf_counter()
                step(model, after_forward)
                times[ckpt].append(time.perf_counter() - t0)
            saved[ckpt].append((after_forward[0] - peak.start) / 2**20)
            peaks[ckpt].append(peak.grown_mb)
    return {k: {"step_s": statistics.median(times[k]), "saved_mb": statistics.median(saved[k]),
                "peak_mb": statistics.median(peaks[k])} for k in (False, True)}


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.update(extra)
    return env


def _engine_run(out: Path, overrides: list[str], ranks: int, log_every: int, **env_extra: str) -> dict:
    """One engine run; the metrics of its last logged window (the steps after the first window)."""
    common = [str(AC_CONFIG), f"train.output_dir={out}", "train.resume=never", "train.eval_every=0",
              "train.checkpoint_every=0", f"train.log_every={log_every}", "train.progress_bar=false",
              "train.device=cpu", *overrides]
    if ranks == 1:
        cmd = [sys.executable, "-m", "avi_scale.cli", *common]
        env = _env(OMP_NUM_THREADS=str(os.cpu_count() or 1), **env_extra)
    else:
        from avi_scale.engine.distributed import free_port

        cmd = ["bash", str(REPO / "launch" / "deepspeed_single_node.sh"), *common]
        env = _env(NPROC=str(ranks), MASTER_PORT=str(free_port()), **env_extra)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"][-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="mnist5k shards (default: made in a temporary directory)")
    ap.add_argument("--batch", type=int, default=32, help="micro-batch per rank (default 32)")
    ap.add_argument("--steps", type=int, default=6, help="engine steps per run; the first half is warm-up")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per activation-checkpointing variant")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            data = str(tmp / "mnist5k")
            subprocess.run([str(VENV_BIN / "avi-shards"), "mnist5k", "--out", data, "--no-progress"],
                           check=True, capture_output=True)
        data_override = [f"data.train_urls={data}", f"train.micro_batch_size={args.batch}"]
        half = max(1, args.steps // 2)
        steps = [f"train.steps={2 * half}"]
        print(f"machine: {os.cpu_count()} CPU cores; micro-batch {args.batch}; engine runs of {2 * half} steps, "
              f"metrics of the last {half}")

        ac = activation_checkpointing(args.batch, args.repeats)
        t_ratio = ac[True]["step_s"] / ac[False]["step_s"]
        print("\n1. activation checkpointing (configs/tiny_mnist5k.yaml model, forward + backward)")
        for k, name in ((False, "off"), (True, "on")):
            print(f"   {name:>3}: step {ac[k]['step_s'] * 1e3:8.1f} ms   held after forward {ac[k]['saved_mb']:7.1f} MB"
                  f"   step peak {ac[k]['peak_mb']:7.1f} MB")
        print(f"   ratio on/off: time {t_ratio:.2f}x ({(t_ratio - 1) * 100:+.0f}%, target <= +35%), "
              f"activation memory held after forward {ac[True]['saved_mb'] / ac[False]['saved_mb']:.2f}x "
              f"(target <= 0.33), step peak {ac[True]['peak_mb'] / ac[False]['peak_mb']:.2f}x")

        print("\n2. ZeRO stage, 2 ranks (deepspeed launcher), 11.9M parameters, micro-batch 2: memory per rank")
        zero = {}
        for stage in (0, 2, 3):
            zero[stage] = _engine_run(tmp / f"zero{stage}", [*data_override, *ZERO_MODEL, "train.micro_batch_size=2",
                                                             "train.steps=2", f"deepspeed.zero_stage={stage}"], 2, 1,
                                       **LIVE_MEMORY_ENV)
        for stage, m in zero.items():
            print(f"   stage {stage}: model state {m['model_state_mb']:7.1f} MB per rank   resident {m['mem_mb']:7.1f} MB"
                  f"   (peak {m['peak_mem_mb']:7.1f} MB)   {m['images_per_s']:.1f} images/s")
        for key, name in (("model_state_mb", "model state"), ("mem_mb", "resident")):
            print(f"   ratio to stage 0 ({name}): stage 2 {zero[2][key] / zero[0][key]:.2f}x, "
                  f"stage 3 {zero[3][key] / zero[0][key]:.2f}x")

        print("\n3. throughput, ZeRO-0, same micro-batch per rank")
        one = _engine_run(tmp / "one", [*data_override, *steps], 1, half)
        two = _engine_run(tmp / "two", [*data_override, *steps], 2, half)
        print(f"   1 rank : {one['images_per_s']:8.1f} images/s (step {one['step_time_s'] * 1e3:.0f} ms, "
              f"data wait {one['data_wait_frac'] * 100:.1f}%)")
        print(f"   2 ranks: {two['images_per_s']:8.1f} images/s (step {two['step_time_s'] * 1e3:.0f} ms, "
              f"data wait {two['data_wait_frac'] * 100:.1f}%)")
        print(f"   ratio 2/1 ranks: {two['images_per_s'] / one['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
