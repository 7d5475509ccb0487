"""Test-set likelihood the way the papers report it: the negative ELBO and the importance-weighted
``-log p(x)`` with ``K`` posterior samples, in nats per image and bits per dimension, with standard
errors; plus how the latent layers are used (KL per layer, active units, active layers).

Each image's posterior noise comes from its own generator, seeded from ``(seed, the image's bytes)``.
The numbers therefore do not depend on the batch size, on the order of the data or on how many ranks
share the work: 2 ranks give what 1 rank gives, up to float rounding (batched kernels may round a
sample differently in a different batch: about 1e-6 relative).  One forward pass holds at most
``iw_chunk`` samples: with ``K >= iw_chunk`` one image's samples run ``iw_chunk`` at a time, with
smaller ``K`` ``iw_chunk // K`` images share a pass; the bottom-up pass runs once per image.  Memory
stays bounded whatever ``K`` is; raise ``iw_chunk`` for speed.

Across ranks, each rank accumulates float64 sums and sums of squares over its own images and one
``all_reduce(SUM)`` combines them after the loop (ranks may hold different numbers of images).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

import torch

from avi_scale.engine import distributed as D
from avi_scale.model import nats_to_bpd


def image_seed(seed: int, image: torch.Tensor) -> int:
    """A 63-bit seed from ``seed`` and the content of one image (values in [0, 1], quantised to 8 bits):
    the same image gets the same posterior noise on any rank, in any batch, at any position."""
    q = (image.detach().float().cpu().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).contiguous()
    h = hashlib.blake2b(digest_size=8)
    h.update(f"avi-eval|{int(seed)}|{tuple(q.shape)}|".encode())
    h.update(q.numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def check_images(x: Any, model_cfg) -> torch.Tensor:
    """``x`` as float [B, C, H, W] in [0, 1] fit for the model; a ValueError names what is wrong."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a tensor of images, got {type(x).__name__}")
    c, s = model_cfg.image_channels, model_cfg.image_size
    if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
        raise ValueError(f"expected images of shape [B, {c}, {s}, {s}] (model.image_channels, model.image_size), "
                         f"got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype}")
    x = x.float()
    if x.numel() == 0:
        return x
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"images must lie in [0, 1]; found values in [{lo:.4g}, {hi:.4g}]")
    if model_cfg.likelihood == "bernoulli":
        if not ((x == 0) | (x == 1)).all():
            raise ValueError("model.likelihood is bernoulli but the images are not binary: evaluate with "
                             "data.binarize=true (a fixed Bernoulli draw per test image) or binary data")
    else:
        top = 2 ** model_cfg.num_bits - 1
        levels = x * top
        if (levels - levels.round()).abs().max().item() > 1e-3:
            raise ValueError(f"model.likelihood is logistic_mixture but the images are not {model_cfg.num_bits}-bit "
                             f"(k/{top}) values (model.num_bits; data.num_bits quantises them)")
    return x


@dataclass
class NLLResult:
    """Test-set numbers; nats per image unless named ``*_bpd``."""

    count: int
    num_dims: int
    iw_samples: int
    neg_elbo: float
    neg_elbo_se: float
    nll: float  # importance-weighted -log p(x) with iw_samples samples
    nll_se: float
    recon_nll: float
    kl_per_layer: list[float]  # layer 1 (top) first
    active_units_per_layer: list[int]
    units_per_layer: int
    active_unit_threshold: float
    active_layer_kl: float
    world_size: int = 1
    seed: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def neg_elbo_bpd(self) -> float:
        return nats_to_bpd(self.neg_elbo, self.num_dims)

    @property
    def neg_elbo_bpd_se(self) -> float:
        return nats_to_bpd(self.neg_elbo_se, self.num_dims)

    @property
    def nll_bpd(self) -> float:
        return nats_to_bpd(self.nll, self.num_dims)

    @property
    def nll_bpd_se(self) -> float:
        return nats_to_bpd(self.nll_se, self.num_dims)

    @property
    def kl(self) -> float:
        return float(sum(self.kl_per_layer))

    @property
    def active_units(self) -> int:
        return int(sum(self.active_units_per_layer))

    @property
    def active_layers(self) -> int:
        return sum(1 for k in self.kl_per_layer if k > self.active_layer_kl)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(neg_elbo_bpd=self.neg_elbo_bpd, neg_elbo_bpd_se=self.neg_elbo_bpd_se, nll_bpd=self.nll_bpd,
                 nll_bpd_se=self.nll_bpd_se, kl=self.kl, active_units=self.active_units,
                 active_layers=self.active_layers, num_layers=len(self.kl_per_layer))
        return d

    def table_rows(self) -> list[tuple[str, str, str]]:
        """(quantity, nats per image, bits per dim) rows, "mean ± standard error"."""
        return [
            ("negative ELBO", f"{self.neg_elbo:.3f} ± {self.neg_elbo_se:.3f}",
             f"{self.neg_elbo_bpd:.4f} ± {self.neg_elbo_bpd_se:.4f}"),
            (f"-log p(x), IW K={self.iw_samples}", f"{self.nll:.3f} ± {self.nll_se:.3f}",
             f"{self.nll_bpd:.4f} ± {self.nll_bpd_se:.4f}"),
            ("reconstruction -log p(x|z)", f"{self.recon_nll:.3f}", f"{nats_to_bpd(self.recon_nll, self.num_dims):.4f}"),
            ("KL (all layers)", f"{self.kl:.3f}", f"{nats_to_bpd(self.kl, self.num_dims):.4f}"),
        ]


def _mean_se(total: float, total_sq: float, n: int) -> tuple[float, float]:
    mean = total / n
    if n < 2:
        return mean, float("nan")
    var = max(total_sq - total * total / n, 0.0) / (n - 1)
    return mean, math.sqrt(var / n)


def _generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per image, on the model's device, seeded with the image's seed."""
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def _images_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("empty batch")
        return batch[0]
    return batch


class _training_mode:
    """Puts the model in eval mode for the block and restores its mode afterwards."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


class _Sums:
    """This rank's float64 sums, one tensor so that one ``all_reduce(SUM)`` combines the ranks: count,
    -ELBO and its square, -log p(x) and its square, reconstruction, KL per layer (L), the posterior mean of
    every unit (L x units) and its square (L x units)."""

    def __init__(self, model_cfg, device: torch.device):
        L, hw = model_cfg.num_layers, model_cfg.padded_size // 2
        self.L, self.units = L, model_cfg.latent_channels * hw * hw
        self.head = 6 + L
        self.t = torch.zeros(self.head + 2 * L * self.units, dtype=torch.float64, device=device)

    def add(self, out, log_px: torch.Tensor) -> None:
        """One pass's images: ``out`` from ``model(x, stats=True)``, ``log_px`` the IW estimate [B]."""
        t, L, head = self.t, self.L, self.head
        ne, nll = out.neg_elbo.double(), -log_px.double()
        means = torch.stack([s.posterior.mu.flatten(1) for s in out.stats], dim=1).double()  # E_q[z_u]: [B, L, units]
        t[0] += ne.shape[0]
        t[1] += ne.sum()
        t[2] += (ne * ne).sum()
        t[3] += nll.sum()
        t[4] += (nll * nll).sum()
        t[5] += out.recon_nll.double().sum()
        t[6:head] += out.kl.double().sum(0)
        t[head:head + L * self.units] += means.sum(0).flatten()
        t[head + L * self.units:] += (means * means).sum(0).flatten()

    def result(self, n: int, active_unit_threshold: float, **fields) -> NLLResult:
        """The means and standard errors over ``n`` images (the reduced count) as an :class:`NLLResult`."""
        s, L, head, units = self.t.cpu(), self.L, self.head, self.units
        neg_elbo, neg_elbo_se = _mean_se(s[1].item(), s[2].item(), n)
        nll, nll_se = _mean_se(s[3].item(), s[4].item(), n)
        mean_mu = s[head:head + L * units].view(L, units) / n
        var_mu = s[head + L * units:].view(L, units) / n - mean_mu * mean_mu  # Cov_x(E_q[z_u]) per unit
        active = (var_mu > active_unit_threshold).sum(1).tolist()
        return NLLResult(count=n, neg_elbo=neg_elbo, neg_elbo_se=neg_elbo_se, nll=nll, nll_se=nll_se,
                         recon_nll=s[5].item() / n, kl_per_layer=(s[6:head] / n).tolist(),
                         active_units_per_layer=[int(a) for a in active], units_per_layer=units,
                         active_unit_threshold=active_unit_threshold, **fields)


def _add_batch(model, x: torch.Tensor, seed: int, iw_samples: int, iw_chunk: int, sums: _Sums) -> None:
    """One loader batch, ``max(1, iw_chunk // iw_samples)`` images per pass, each with its own generator."""
    device = sums.t.device
    seeds = [image_seed(seed, x[i]) for i in range(x.shape[0])]
    x = x.to(device)
    chunk = min(iw_chunk, iw_samples)  # one pass holds at most max(iw_chunk, 1 image) samples
    per_pass = max(1, iw_chunk // iw_samples)
    for a in range(0, x.shape[0], per_pass):
        xs, group = x[a:a + per_pass], seeds[a:a + per_pass]
        out = model(xs, beta=1.0, generators=_generators(group, device), stats=True)
        # the same generators again: with K = 1 the IW sample is the ELBO's sample
        log_px = model.log_likelihood(xs, num_samples=iw_samples, chunk=chunk, generators=_generators(group, device))
        sums.add(out, log_px)


def _progress_bar(show: bool, total: Optional[int], iw_samples: int, world: int):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"eval K={iw_samples}" + (f" (rank 0 of {world})" if world > 1 else ""),
                unit="img", dynamic_ncols=True)


@torch.no_grad()
def evaluate_nll(model, batches: Iterable, *, iw_samples: int, iw_chunk: int, seed: int = 0,
                 expected_count: Optional[int] = None, progress: bool = False, progress_total: Optional[int] = None,
                 active_unit_threshold: float = 0.01, active_layer_kl: float = 0.1) -> NLLResult:
    """Negative ELBO and importance-weighted -log p(x) over ``batches`` (this rank's share).

    ``batches`` yields image tensors or ``(x, y)`` pairs, x float [B, C, H, W] in [0, 1] (binary for a
    Bernoulli model, k/255 for a logistic mixture).  When ``torch.distributed`` is initialised, the
    sums of all ranks are combined, and every rank returns the same result.  ``expected_count``: the
    number of images over all ranks (e.g. the manifest's); a different total raises RuntimeError.
    Active units are read off the posterior means the model returns (``model(x, stats=True)``).
    """
    if iw_samples < 1:
        raise ValueError(f"iw_samples (eval.iw_samples) must be >= 1, got {iw_samples}")
    if iw_chunk < 1:
        raise ValueError(f"iw_chunk (eval.iw_chunk) must be >= 1, got {iw_chunk}")
    rank, world = D.rank_and_world_size()
    sums = _Sums(model.cfg, next(model.parameters()).device)
    bar = _progress_bar(progress and rank == 0, progress_total, iw_samples, world)
    started = time.perf_counter()
    with _training_mode(model):
        for batch in batches:
            x = check_images(_images_of(batch), model.cfg)
            _add_batch(model, x, seed, iw_samples, iw_chunk, sums)
            if bar is not None:
                bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    D.all_reduce(sums.t)
    n = int(round(sums.t[0].item()))
    if expected_count is not None and n != expected_count:
        raise RuntimeError(f"evaluated {n} images over {world} rank(s) but the split holds {expected_count}: "
                           "every test image must be evaluated exactly once")
    if n == 0:
        raise RuntimeError("no images to evaluate: the data is empty")
    return sums.result(n, active_unit_threshold, num_dims=model.num_dims, iw_samples=iw_samples,
                       active_layer_kl=active_layer_kl, world_size=world, seed=seed,
                       seconds=time.perf_counter() - started)
