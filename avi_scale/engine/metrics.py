"""What rank 0 writes: ``metrics.jsonl``, TensorBoard scalars and images, a progress bar; and the
measurements behind them (memory in use and at peak, model state per rank, the device peak for MFU; the
FLOPs are counted by :func:`avi_scale.model.flops.count_flops`).

``metrics.jsonl`` holds one JSON object per line with a ``kind``:

* ``"train"`` (every ``train.log_every`` steps, averaged over the steps since the previous line):
  ``step, epoch, time, loss, neg_elbo, bpd, recon_nll, kl, kl_per_layer`` (list, nats per image,
  layer 1 = top), ``grad_norm, lr, beta, skipped_steps, images_per_s, step_time_s,
  data_wait_frac, mem_mb, peak_mem_mb, model_state_mb, tflops, skipped_samples`` (corrupt training
  samples skipped so far over all ranks, ``data.skip_corrupt``) and, when the device peak is known, ``mfu``;
* ``"eval"`` (every ``train.eval_every`` steps and at the end, EMA weights, the validation split):
  ``step, epoch, time, val_neg_elbo, val_nll, val_bpd, val_recon_nll, val_kl, val_kl_per_layer,
  val_images, val_skipped_samples, checkpoint``;
* ``"final"``: the returned metrics of :func:`avi_scale.engine.train`.
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from avi_scale.engine.tracking import build_trackers, flatten

# Dense peak TFLOP/s per device for the MFU estimate, by (name fragment, precision).
_PEAK_TFLOPS = {
    ("H200", "bf16"): 989.0, ("H200", "fp16"): 989.0, ("H200", "fp32"): 67.0,
    ("H100", "bf16"): 989.0, ("H100", "fp16"): 989.0, ("H100", "fp32"): 67.0,
    ("A100", "bf16"): 312.0, ("A100", "fp16"): 312.0, ("A100", "fp32"): 19.5,
}


def peak_tflops(device: torch.device, precision: str, configured: float) -> Optional[float]:
    """The configured per-device peak, else the table's for known GPUs, else None (CPU)."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (fragment, prec), value in _PEAK_TFLOPS.items():
            if fragment in name and prec == precision:
                return value
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or on CPU the peak resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def current_memory_mb(device: torch.device) -> float:
    """Memory in use now: allocated accelerator memory, or on CPU the resident set of this process
    (torch's CPU allocator does not cache, so it follows live tensors plus the process's code)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def model_state_mb(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """What this rank holds of the model state: its weights (its ZeRO-3 partition, else the whole
    module), the optimizer's own parameter copies (ZeRO's fp32 partitions), gradients kept between
    steps and the optimizer state.  Tensors sharing a storage (views into flat buffers) count once."""
    seen: set = set()
    total = 0

    def add(t: Optional[torch.Tensor]) -> None:
        nonlocal total
        if not torch.is_tensor(t):
            return
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if storage.nbytes() and key not in seen:
            seen.add(key)
            total += storage.nbytes()

    for p in module.parameters():
        add(p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
        add(p.grad)
    for group in optimizer.param_groups:
        for p in group["params"]:
            add(p)
            add(p.grad)
    for state in optimizer.state.values():
        for v in state.values():
            add(v)
    return total / 2**20


# -- the writer (rank 0 only) ------------------------------------------------------------------------
def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN/inf: null (e.g. the grad norm of a window of skipped steps)
    if isinstance(v, (list, tuple)):
        return [_jsonable(u) for u in v]
    if isinstance(v, dict):
        return {k: _jsonable(u) for k, u in v.items()}
    if isinstance(v, Path):
        return str(v)
    return v


class MetricsWriter:
    """metrics.jsonl + the trackers of ``logging.backends`` (avi_scale/engine/tracking.py) + tqdm on rank 0;
    every method is a no-op on other ranks."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, initial_step: int, progress_bar: bool,
                 logging: Any = None, run_name: str = "", config: Optional[dict] = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self._trackers: list = []
        self._bar = None
        self._file = None
        if not enabled:
            return
        from tqdm import tqdm

        from avi_scale.config import LoggingConfig

        path = run_dir / "metrics.jsonl"
        kept = []
        if path.exists() and initial_step > 0:  # a resumed run keeps what was logged up to its step
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # torn by a kill or a full disk in the middle of a write
                    continue
                if row["kind"] != "final" and row["step"] <= initial_step:
                    kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))
        self._file = open(path, "a", buffering=1)
        self._trackers = build_trackers(logging or LoggingConfig(), run_dir, initial_step, run_name, config or {})
        self._bar = tqdm(total=total_steps, initial=initial_step, disable=not progress_bar,
                         dynamic_ncols=True, desc="train")

    def record(self, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "time": time.time(), **values}
        self._file.write(json.dumps(_jsonable(row)) + "\n")
        if kind == "final":
            return
        scalars = flatten(kind, values)
        for tracker in self._trackers:
            tracker.scalars(int(values["step"]), scalars)

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        for tracker in self._trackers:
            tracker.image(tag, grid, step)

    def advance(self, n: int, postfix: Optional[dict] = None) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        """A line on the console that does not break the progress bar."""
        if self._bar is not None:
            self._bar.write(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []
        if self._file is not None:
            self._file.close()
        self._bar = self._file = None
