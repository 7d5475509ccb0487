"""Latent and observation distributions of the attentive VAE.

* Diagonal Gaussians with the official bounds: mu = 5 tanh(x / 10); log sigma bounded by a tanh
  when the bounds are symmetric, else by a smoothstep between them; sigma = exp(.) + 1e-2.
  Posteriors are residual: their raw (mu, log sigma) are added to the prior's raw parameters.
* Bernoulli for binary images; discretised logistic mixture (PixelCNN++ style, with channel
  regression coefficients for RGB) for n-bit images (``model.num_bits``, 8 by default; NVAE's CelebA-HQ
  256 uses 5): pixels on the grid of ``2^n`` levels ``k / (2^n - 1)``, scaled to [-1, 1], so the bins
  have width ``2 / (2^n - 1)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

SIGMA_FLOOR = 1e-2
MU_BOUND = 5.0
LOG_2PI = math.log(2 * math.pi)


def bound(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """The official smooth bounding of a raw parameter into [low, high]."""
    if abs(low) == abs(high):
        return abs(low) * torch.tanh(x / (2 * abs(low)))
    t = ((x - low) / (high - low)).clamp(0.0, 1.0)
    return low + (high - low) * (3 * t * t - 2 * t * t * t)


class DiagGaussian(NamedTuple):
    """A diagonal Gaussian over a latent tensor; ``raw_mu``/``raw_log_sigma`` are kept for the
    residual parameterisation of the posterior.  A named tuple of tensors, so that wrappers which
    look for tensors inside outputs (DeepSpeed ZeRO-3) see them in ``AttentiveVAE(..., stats=True)``."""

    raw_mu: torch.Tensor
    raw_log_sigma: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor

    @classmethod
    def from_raw(cls, raw_mu: torch.Tensor, raw_log_sigma: torch.Tensor, log_sigma_bounds) -> "DiagGaussian":
        mu = bound(raw_mu, -MU_BOUND, MU_BOUND)
        sigma = torch.exp(bound(raw_log_sigma, *log_sigma_bounds)) + SIGMA_FLOOR
        return cls(raw_mu, raw_log_sigma, mu, sigma)

    @classmethod
    def standard(cls, like: torch.Tensor) -> "DiagGaussian":
        zeros = torch.zeros_like(like)
        return cls(zeros, zeros, zeros, torch.ones_like(like))

    def detach(self) -> "DiagGaussian":
        return DiagGaussian(*(t.detach() for t in self))

    def sample(self, temperature: float = 1.0, eps: torch.Tensor | None = None) -> torch.Tensor:
        """``mu + temperature * sigma * eps``; ``eps`` standard normal noise, drawn here if not given."""
        if eps is None:
            eps = torch.randn_like(self.mu)
        return self.mu + temperature * self.sigma * eps.to(self.mu.dtype)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Summed over all but the batch axis -> [B]."""
        e = (z - self.mu) / self.sigma
        lp = -0.5 * e * e - torch.log(self.sigma) - 0.5 * LOG_2PI
        return lp.flatten(1).sum(1)

    def kl(self, other: "DiagGaussian") -> torch.Tensor:
        """Closed-form KL(self || other) summed over all but the batch axis -> [B]."""
        var_ratio = (self.sigma / other.sigma) ** 2
        diff = (self.mu - other.mu) / other.sigma
        kl = 0.5 * (var_ratio + diff * diff - 1.0 - torch.log(var_ratio))
        return kl.flatten(1).sum(1)


def crop(t: torch.Tensor, pad: int) -> torch.Tensor:
    return t[..., pad:t.shape[-2] - pad, pad:t.shape[-1] - pad] if pad else t


class Bernoulli:
    """Pixel-wise Bernoulli for binary images; ``x`` in {0, 1}."""

    @staticmethod
    def num_params(channels: int, num_mixtures: int) -> int:
        return channels

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        lp = -F.binary_cross_entropy_with_logits(self.logits.float(), x.float(), reduction="none")
        return lp.flatten(1).sum(1)

    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def sample(self) -> torch.Tensor:
        return torch.bernoulli(self.mean())


class DiscretizedLogisticMixture:
    """Mixture of discretised logistics over the ``2^num_bits`` levels of pixels scaled to [-1, 1].

    Parameters per pixel: M logits, then per component 3 channel-regression coefficients (RGB only)
    and a location and log-scale per channel.  Level ``k`` of ``2^n`` sits at ``2k / (2^n - 1) - 1``
    and owns the bin of half-width ``1 / (2^n - 1)`` around it; the lowest and highest levels own the
    tails.  At ``num_bits=8`` (the default) every constant is the one of the 8-bit code (``1/255``,
    ``log 127.5``), so the numbers are bit for bit the same.
    """

    LOG_SCALE_MIN = -7.0

    @staticmethod
    def num_params(channels: int, num_mixtures: int) -> int:
        coeffs = 3 if channels == 3 else 0
        return num_mixtures * (1 + 2 * channels + coeffs)

    def __init__(self, params: torch.Tensor, channels: int, num_mixtures: int, num_bits: int = 8):
        if not 1 <= num_bits <= 8:
            raise ValueError(f"num_bits must be in 1..8, got {num_bits}")
        self.num_bits = num_bits
        self.max_level = float(2 ** num_bits - 1)  # 255.0 for 8-bit images
        b, _, h, w = params.shape
        m, c = num_mixtures, channels
        params = params.float()
        self.logits = params[:, :m]  # [B, M, H, W]
        rest = params[:, m:].reshape(b, m, -1, h, w)
        ncoef = 3 if c == 3 else 0
        self.coeffs = torch.tanh(rest[:, :, :ncoef])  # [B, M, 3, H, W]
        self.locs = rest[:, :, ncoef:ncoef + c]  # [B, M, C, H, W]
        self.log_scales = rest[:, :, ncoef + c:].clamp_min(self.LOG_SCALE_MIN)
        self.channels, self.num_mixtures = c, m

    def _conditioned_locs(self, x: torch.Tensor) -> torch.Tensor:
        """Locations with the channel regression applied, given x [B, C, H, W] in [-1, 1]."""
        if self.channels != 3:
            return self.locs
        xe = x.unsqueeze(1)
        l0 = self.locs[:, :, 0]
        l1 = self.locs[:, :, 1] + self.coeffs[:, :, 0] * xe[:, :, 0]
        l2 = self.locs[:, :, 2] + self.coeffs[:, :, 1] * xe[:, :, 0] + self.coeffs[:, :, 2] * xe[:, :, 1]
        return torch.stack([l0, l1, l2], dim=2)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1] on the grid of ``2^num_bits`` levels, [B, C, H, W] -> log p(x) [B].

        The edge tests ``x < -0.999`` / ``x > 0.999`` pick out the lowest and highest level only, for
        every ``num_bits`` in 1..8 (the next levels lie at least ``2/255`` inside)."""
        x = x.float()
        xe = x.unsqueeze(1)  # [B, 1, C, H, W]
        centered = xe - self._conditioned_locs(x)
        inv_s = torch.exp(-self.log_scales)
        half_bin = 1.0 / self.max_level  # half of the bin width 2 / (2^n - 1)
        plus_in = inv_s * (centered + half_bin)
        min_in = inv_s * (centered - half_bin)
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        log_cdf_plus = plus_in - F.softplus(plus_in)  # level 0 (-1 after scaling)
        log_one_minus_cdf_min = -F.softplus(min_in)  # level 2^n - 1 (+1)
        mid_in = inv_s * centered
        log_pdf_mid = mid_in - self.log_scales - 2.0 * F.softplus(mid_in)
        # tiny bins: the density at the centre times the bin width 2 / (2^n - 1) (8 bits: / 127.5)
        log_half_levels = math.log(self.max_level / 2.0)
        inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)), log_pdf_mid - log_half_levels)
        lp = torch.where(xe < -0.999, log_cdf_plus, torch.where(xe > 0.999, log_one_minus_cdf_min, inner))
        lp = lp.sum(2) + torch.log_softmax(self.logits, dim=1)  # [B, M, H, W]
        return torch.logsumexp(lp, dim=1).flatten(1).sum(1)

    def sample(self, temperature: float = 1.0) -> torch.Tensor:
        """A sample in [-1, 1], [B, C, H, W]."""
        gumbel = -torch.log(-torch.log(torch.rand_like(self.logits).clamp(1e-5, 1 - 1e-5)))
        sel = F.one_hot((self.logits + gumbel).argmax(1), self.num_mixtures).permute(0, 3, 1, 2).float()
        sel = sel.unsqueeze(2)  # [B, M, 1, H, W]
        locs = (self.locs * sel).sum(1)
        scales = torch.exp((self.log_scales * sel).sum(1)) * temperature
        u = torch.rand_like(locs).clamp(1e-5, 1 - 1e-5)
        x = locs + scales * (torch.log(u) - torch.log1p(-u))
        if self.channels != 3:
            return x.clamp(-1, 1)
        coeffs = (self.coeffs * sel).sum(1)
        x0 = x[:, 0].clamp(-1, 1)
        x1 = (x[:, 1] + coeffs[:, 0] * x0).clamp(-1, 1)
        x2 = (x[:, 2] + coeffs[:, 1] * x0 + coeffs[:, 2] * x1).clamp(-1, 1)
        return torch.stack([x0, x1, x2], dim=1)
