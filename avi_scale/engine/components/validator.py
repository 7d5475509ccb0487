"""Validation of the EMA weights: the negative ELBO and its terms on the validation split, and the
sample and reconstruction grids (``images/stepNNNNNNNN/`` and ``final/``, and TensorBoard).

Every validation image is seen once over all ranks, its posterior noise seeded per rank and batch from
``(train.seed, "eval", rank, batch)``.  Under ZeRO-3 a forward pass gathers weights collectively, so every
rank runs as many forward passes as the rank with the most batches (a dummy one when it has none left).
The grids come from a plain :class:`AttentiveVAE` on rank 0 holding the EMA weights and the rank-averaged
BatchNorm statistics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from avi_scale.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from avi_scale.engine import distributed as D
from avi_scale.engine.components.metrics import Sums
from avi_scale.engine.components.model import average_buffers
from avi_scale.engine.components.state import noise_seed
from avi_scale.engine.distributed import World
from avi_scale.engine.ema import EMA
from avi_scale.engine.metrics import MetricsWriter
from avi_scale.model import image_dims, nats_to_bpd
from avi_scale.plots import image_grid, save_png

RECONSTRUCTED = 16  # validation images shown beside their reconstructions


def _val_loader(data: DataConfig, batch_size: int, world: World, pin_memory: bool):
    """This rank's validation loader, or None when the data names no validation split."""
    from avi_scale.data import build_loader, split_urls

    try:
        split_urls(data, "val")
    except ValueError:
        return None
    return build_loader(data, "val", batch_size, world.rank, world.world_size, pin_memory=pin_memory)


class Validator:
    """The validation pass and the image grids (every rank calls both: they are collective)."""

    def __init__(self, data: DataConfig, model: ModelConfig, e: EvalConfig, t: TrainConfig, world: World,
                 zero3: bool, pin_memory: bool):
        self.model_cfg, self.eval_cfg = model, e
        self.seed, self.max_batches = t.seed, t.eval_batches
        self.world, self.zero3 = world, zero3
        self.loader = _val_loader(data, t.micro_batch_size, world, pin_memory)
        self.recon_batch: Optional[torch.Tensor] = None  # rank 0: the first validation images seen
        self._plain: Optional[torch.nn.Module] = None  # rank 0: the model the grids are drawn with

    @property
    def enabled(self) -> bool:
        return self.loader is not None

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module, ema: EMA) -> dict[str, Any]:
        """``val_neg_elbo`` (= ``val_nll``), ``val_bpd``, ``val_recon_nll``, ``val_kl``,
        ``val_kl_per_layer``, ``val_images``, ``val_skipped_samples`` of the EMA weights."""
        average_buffers(module, self.world.world_size)
        sums = Sums.zeros(self.model_cfg.num_layers, self.world.device)
        skipped_before = self.loader.skipped
        with ema.swapped():
            module.eval()
            batches = self._batches()
            try:
                for i, x in batches:
                    if x is None:  # ZeRO-3: this rank has no batch left, the others have
                        c, s = self.model_cfg.image_channels, self.model_cfg.image_size
                        module(torch.zeros((1, c, s, s), device=self.world.device), beta=1.0)
                        continue
                    if self.recon_batch is None and self.world.is_main:
                        self.recon_batch = x[:RECONSTRUCTED].clone()
                    torch.manual_seed(noise_seed(self.seed, "eval", self.world.rank, i))
                    sums.add(module(x.to(self.world.device), beta=1.0))
            finally:
                batches.close()  # an unfinished pass (train.eval_batches) stops its loader workers
                module.train()
        sums.skipped = self.loader.skipped - skipped_before
        total = sums.reduced()
        if total.images == 0:
            raise RuntimeError("the validation split is empty" + (" (every sample was skipped as corrupt)"
                                                                   if total.skipped else ""))
        means = total.means()
        return {
            "val_neg_elbo": means["neg_elbo"], "val_nll": means["neg_elbo"],
            "val_bpd": nats_to_bpd(means["neg_elbo"], image_dims(self.model_cfg)),
            "val_recon_nll": means["recon_nll"], "val_kl": means["kl"], "val_kl_per_layer": means["kl_per_layer"],
            "val_images": int(total.images), "val_skipped_samples": int(total.skipped),
        }

    def _batches(self) -> Iterator[tuple[int, Optional[torch.Tensor]]]:
        """(index, images) of this rank's validation batches (``train.eval_batches`` of them, 0: all);
        under ZeRO-3 then (index, None) until no rank has a batch left."""
        it = iter(self.loader)
        i = 0
        try:
            while True:
                batch = next(it, None) if (self.max_batches == 0 or i < self.max_batches) else None
                if self.zero3:  # one collective per pass: does any rank still have a batch?
                    more = D.all_reduce(torch.tensor([float(batch is not None)], device=self.world.device), "max")
                    if more.item() == 0:
                        return
                elif batch is None:
                    return
                yield i, (batch[0] if batch is not None else None)
                i += 1
        finally:
            it.close()

    def images(self, module: torch.nn.Module, ema: EMA, step: int, out_dir: Path,
               writer: MetricsWriter) -> dict[str, str]:
        """Sample and reconstruction grids of the EMA weights: PNGs in ``out_dir`` and TensorBoard images
        (rank 0; the paths by name, ``{}`` elsewhere)."""
        plain = self._plain_model(module, ema)
        if plain is None:
            return {}
        e = self.eval_cfg
        torch.manual_seed(noise_seed(self.seed, "images", step))
        paths = {}
        samples = plain.sample(e.num_samples, temperature=e.temperatures[0] if e.temperatures else 1.0)
        grid = image_grid(samples, max(1, int(math.sqrt(e.num_samples))))
        paths["samples"] = str(save_png(grid, out_dir / "samples.png", scale=2))
        writer.image("samples", grid, step)
        if self.recon_batch is not None:
            x = self.recon_batch.to(self.world.device)
            recon = plain.reconstruct(x)
            pairs = torch.stack([x.float(), recon.float()], dim=1).flatten(0, 1)  # original, recon, ...
            grid = image_grid(pairs, 8)
            paths["reconstructions"] = str(save_png(grid, out_dir / "reconstructions.png", scale=2))
            writer.image("reconstructions", grid, step)
        return paths

    def _plain_model(self, module: torch.nn.Module, ema: EMA) -> Optional[torch.nn.Module]:
        """Rank 0: a plain AttentiveVAE holding the EMA weights and the (rank-averaged) buffers (collective)."""
        from avi_scale.model import AttentiveVAE

        ema_sd = ema.full_state_dict()  # collective under ZeRO-3
        buffers = {n: b.detach() for n, b in module.named_buffers()}
        if not self.world.is_main:
            return None
        if self._plain is None:
            self._plain = AttentiveVAE(self.model_cfg).to(self.world.device)
        reference = self._plain.state_dict()
        self._plain.load_state_dict({k: (ema_sd[k] if k in ema_sd else buffers[k]) for k in reference})
        return self._plain.eval()
