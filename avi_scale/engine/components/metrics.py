"""Running sums of the loss terms, the window of steps between two ``train`` rows, and those rows.

:class:`Sums` is the one accumulator of training and validation: named sums over images, stored as one
float64 tensor so that a single all-reduce adds them over ranks.  :class:`LogWindow` collects the steps
since the last row; :class:`TrainLog` turns a window into the ``"train"`` row of ``metrics.jsonl`` (the
keys are listed in :mod:`avi_scale.engine.metrics`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from avi_scale.config import ModelConfig
from avi_scale.engine import distributed as D
from avi_scale.engine.distributed import World
from avi_scale.engine.metrics import MetricsWriter, current_memory_mb, model_state_mb, peak_memory_mb
from avi_scale.model import VAEOutput, image_dims, nats_to_bpd


class Sums:
    """Sums over images: ``loss`` (the beta-weighted training loss), ``neg_elbo``, ``recon_nll``, the
    number of ``images``, samples ``skipped`` as corrupt, and ``kl_per_layer`` (top layer first)."""

    _LOSS, _NEG_ELBO, _RECON, _IMAGES, _SKIPPED, _KL = range(6)

    def __init__(self, values: torch.Tensor):
        self.values = values  # float64 [5 + num_layers]: loss, neg_elbo, recon_nll, images, skipped, kl...

    @classmethod
    def zeros(cls, num_layers: int, device: torch.device) -> "Sums":
        return cls(torch.zeros(cls._KL + num_layers, dtype=torch.float64, device=device))

    def add(self, out: VAEOutput, loss: Optional[torch.Tensor] = None) -> None:
        """Add a batch's per-image terms (and ``loss``, its batch mean, when training)."""
        n = out.neg_elbo.shape[0]
        v = self.values
        if loss is not None:
            v[self._LOSS] += loss.detach().double() * n
        v[self._NEG_ELBO] += out.neg_elbo.double().sum()
        v[self._RECON] += out.recon_nll.double().sum()
        v[self._IMAGES] += n
        v[self._KL:] += out.kl.double().sum(0)

    def __iadd__(self, other: "Sums") -> "Sums":
        self.values += other.values
        return self

    def reduced(self) -> "Sums":
        """A copy summed over all ranks (collective)."""
        return Sums(D.all_reduce(self.values.clone()))

    @property
    def loss(self) -> float:
        return self.values[self._LOSS].item()

    @property
    def neg_elbo(self) -> float:
        return self.values[self._NEG_ELBO].item()

    @property
    def recon_nll(self) -> float:
        return self.values[self._RECON].item()

    @property
    def images(self) -> float:
        return self.values[self._IMAGES].item()

    @property
    def skipped(self) -> float:
        return self.values[self._SKIPPED].item()

    @skipped.setter
    def skipped(self, count: float) -> None:
        self.values[self._SKIPPED] = float(count)

    @property
    def kl_per_layer(self) -> torch.Tensor:
        return self.values[self._KL:]

    def means(self) -> dict[str, Any]:
        """Per-image means (nats): ``loss, neg_elbo, recon_nll, kl`` and the list ``kl_per_layer``."""
        n = self.images
        kl_layers = (self.kl_per_layer / n).tolist()
        return {"loss": self.loss / n, "neg_elbo": self.neg_elbo / n, "recon_nll": self.recon_nll / n,
                "kl": sum(kl_layers), "kl_per_layer": kl_layers}


class LogWindow:
    """The steps since the last ``train`` row (this rank's own until logged)."""

    def __init__(self, num_layers: int, device: torch.device):
        self.sums = Sums.zeros(num_layers, device)  # applied steps only
        self.norms: list[float] = []
        self.steps = 0
        self.time = 0.0
        self.waited = 0.0
        self.lr = float("nan")
        self.beta = float("nan")
        self.last_neg_elbo = float("nan")

    def add(self, step_sums: Sums, norm: float, step_time: float, waited: float) -> None:
        """An applied step: its sums and gradient norm count."""
        self.sums += step_sums
        self.norms.append(norm)
        self.last_neg_elbo = step_sums.neg_elbo / step_sums.images
        self.skip(step_time, waited)

    def skip(self, step_time: float, waited: float) -> None:
        """A skipped step: only its time counts."""
        self.steps += 1
        self.time += step_time
        self.waited += waited


class TrainLog:
    """Writes the ``train`` rows: the window's averages over all ranks, throughput and memory."""

    def __init__(self, writer: MetricsWriter, world: World, model: ModelConfig, images_per_step: int,
                 train_flops_per_image: float, peak_tflops: Optional[float], module: torch.nn.Module,
                 optimizer: torch.optim.Optimizer):
        self.writer, self.world = writer, world
        self.num_layers = model.num_layers
        self.num_dims = image_dims(model)
        self.images_per_step = images_per_step
        self.train_flops_per_image = train_flops_per_image
        self.peak_tflops = peak_tflops
        self.module, self.optimizer = module, optimizer
        self.window = LogWindow(self.num_layers, world.device)
        self.last: dict[str, Any] = {}  # the latest row
        self.skipped_samples = 0  # corrupt training samples skipped over all ranks, as of the latest row

    def log(self, step: int, epoch: float, skipped_steps: int, skipped_samples_here: int) -> dict[str, Any]:
        """Write the row of the window ending at ``step`` (collective) and start a new window."""
        w, device = self.window, self.world.device
        sums = w.sums.reduced()
        memory = D.all_reduce(torch.tensor([current_memory_mb(device), peak_memory_mb(device),
                                            model_state_mb(self.module, self.optimizer)],
                                           dtype=torch.float64, device=device), "max")
        m: dict[str, Any] = {"step": step, "epoch": epoch}
        if sums.images > 0:
            means = sums.means()
            m.update(loss=means["loss"], neg_elbo=means["neg_elbo"], bpd=nats_to_bpd(means["neg_elbo"], self.num_dims),
                     recon_nll=means["recon_nll"], kl=means["kl"], kl_per_layer=means["kl_per_layer"])
        skipped = D.all_reduce(torch.tensor([float(skipped_samples_here)], dtype=torch.float64, device=device))
        elapsed = w.time or float("nan")
        images_per_s = self.images_per_step * w.steps / elapsed
        tflops = self.train_flops_per_image * images_per_s / self.world.world_size / 1e12
        m.update(
            grad_norm=(sum(w.norms) / len(w.norms)) if w.norms else float("nan"),
            lr=w.lr, beta=w.beta, skipped_steps=skipped_steps, skipped_samples=int(skipped.item()),
            images_per_s=images_per_s, step_time_s=elapsed / max(w.steps, 1),
            data_wait_frac=w.waited / elapsed, mem_mb=memory[0].item(), peak_mem_mb=memory[1].item(),
            model_state_mb=memory[2].item(), tflops=tflops,
        )
        if self.peak_tflops:
            m["mfu"] = tflops / self.peak_tflops
        if m["skipped_samples"] > self.skipped_samples:
            self.writer.write(f"step {step}: {m['skipped_samples']} corrupt training sample(s) skipped so far "
                              f"(data.skip_corrupt; the loaders log which)")
        self.skipped_samples = m["skipped_samples"]
        self.writer.record("train", m)
        self.window = LogWindow(self.num_layers, device)
        self.last = m
        return m
