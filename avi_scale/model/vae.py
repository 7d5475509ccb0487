"""The attentive hierarchical VAE (Apostolopoulou et al., ICLR 2022) and, with the depth-wise
attention switched off, the local NVAE-style baseline.

Shapes (F = num_filters, d_p / d_q = prior / posterior attention key widths, 0 when off):
* bottom-up features e_l carry 2F value channels + d_q key channels (the stem makes F + d_q/2,
  the down-sampling block doubles it);
* the top-down context of every layer carries 2F + d_q channels, the first d_q of which are the
  posterior's query;
* decoder cell l > 1 runs at 2F + d_q + d_p (its query) + d_p (its key, absent in the last layer)
  channels and its output is split into [context, key, query]; the learned constant input of the
  top layer has 2F + d_q + d_p channels ([context, key]).
One latent layer is a :class:`~avi_scale.model.variational.VariationalLayer`; ``forward(x, stats=True)``
also returns what each layer computed (:class:`LayerStats`).  See ``docs/model.md`` for the walk-through.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .distributions import Bernoulli, DiagGaussian, DiscretizedLogisticMixture, crop
from .layers import ChannelLayerNorm, ConcatMerge, ParamHead, ResidualCell, WNConv2d
from .variational import LN_EPS, VariationalLayer, _Widths


def image_dims(cfg: ModelConfig) -> int:
    """Dimensions of one image in the data (channels x size x size; the padding is not counted)."""
    return cfg.image_channels * cfg.image_size * cfg.image_size


def nats_to_bpd(nats, num_dims: int):
    """Nats per image -> bits per dimension, ``nats / (num_dims * ln 2)`` (floats or tensors): the one formula."""
    if num_dims < 1:
        raise ValueError(f"num_dims must be >= 1, got {num_dims}")
    return nats / (num_dims * math.log(2.0))


class LayerStats(NamedTuple):
    """What one latent layer computed in a posterior pass (detached), as the model computed it."""

    prior: DiagGaussian  # p(z_l | z_<l); layer 0: N(0, I)
    posterior: DiagGaussian  # q(z_l | x, z_<l), residual on the prior's raw parameters
    z: torch.Tensor  # [B, C_z, h, w] the posterior sample passed to the layers below
    prior_attention: Optional[torch.Tensor]  # [B, l, h, w] weights over layers 0..l-1; None: no prior attention
    posterior_attention: Optional[torch.Tensor]  # [B, L-l+1, h, w] over e_l..e_{L-1}, e_pre; None: none


class VAEOutput(NamedTuple):
    """A named tuple (not a dataclass) so wrappers such as DeepSpeed ZeRO-3, which look for
    tensors inside tuples, see every output tensor (``stats`` nests named tuples of tensors)."""

    loss: torch.Tensor  # scalar: batch mean of recon_nll + beta * kl.sum(1)
    neg_elbo: torch.Tensor  # [B] nats per image (beta = 1), detached
    recon_nll: torch.Tensor  # [B]
    kl: torch.Tensor  # [B, L]
    stats: Optional[tuple[LayerStats, ...]] = None  # per layer, top (0) first; only with forward(stats=True)


class AttentiveVAE(nn.Module):
    """Hierarchical VAE with depth-wise attention in prior and posterior (attentive VAE), or the
    local baseline when both attentions are disabled in the config.

    Images enter as float tensors in [0, 1] at ``cfg.image_size`` (binary {0, 1} for the
    Bernoulli likelihood, k/255 for the logistic mixture); padding to ``cfg.padded_size`` happens
    inside, and the pad is cropped out of the likelihood.
    """

    @classmethod
    def from_pretrained(cls, path) -> "AttentiveVAE":
        """The model of an export folder (``model.safetensors`` + ``config.yaml``, as ``avi-train`` writes to
        ``<output_dir>/final/``), in eval mode on the CPU; see :mod:`avi_scale.model.pretrained`."""
        from .pretrained import load_into, load_pretrained

        state, cfg, _ = load_pretrained(path)
        return load_into(cls(cfg.model), state, path).eval()

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        F_, L = cfg.num_filters, cfg.num_layers
        dq = cfg.posterior_attention.key_dim if cfg.posterior_attention.enabled else 0
        dp = cfg.prior_attention.key_dim if cfg.prior_attention.enabled else 0
        self.w = w = _Widths(2 * F_, dq, dp)
        self.pad = (cfg.padded_size - cfg.image_size) // 2
        self.latent_hw = cfg.padded_size // 2
        places = set(cfg.nonlocal_places)
        nl = cfg.nonlocal_key_dim
        bn = cfg.batch_norm_momentum
        ckpt = cfg.activation_checkpointing

        # preprocessing (bottom-up stem): image -> F + d_q/2 -> (blocks, last down-samples) -> 2F + d_q
        self.stem = WNConv2d(cfg.image_channels, F_ + dq // 2, 3)
        scales = [0] * (cfg.num_preprocess_blocks - 1) + [-2]
        self.preprocess = ResidualCell(F_ + dq // 2, scales, nl if "preprocess" in places else None, bn, ckpt)
        assert self.preprocess.out_channels == w.enc

        self.layers = nn.ModuleList(VariationalLayer(i, cfg, w, self.latent_hw) for i in range(L))
        if cfg.prior_attention.enabled:
            # stored entries of layers 0..L-3 are layer-normed once, when two layers have passed
            self.memory_norms = nn.ModuleList(
                ChannelLayerNorm(w.ctx + dp, eps=LN_EPS) for _ in range(max(L - 2, 0)))

        # output: merge of last context and sample, post-processing (first block up-samples), head
        if L > 1:
            self.merge_out = ConcatMerge(w.ctx + cfg.latent_channels, w.ctx, nl if "merge" in places else None)
            post_in = w.ctx
        else:
            post_in = cfg.latent_channels
        scales = [2] + [0] * (cfg.num_postprocess_blocks - 1)
        self.postprocess = ResidualCell(post_in, scales, nl if "postprocess" in places else None, bn, ckpt)
        self.likelihood = Bernoulli if cfg.likelihood == "bernoulli" else DiscretizedLogisticMixture
        n_out = self.likelihood.num_params(cfg.image_channels, cfg.num_mixtures)
        self.data_head = ParamHead(self.postprocess.out_channels, n_out, 3, "elu")

    # -- helpers ----------------------------------------------------------------------------
    @property
    def num_dims(self) -> int:
        return image_dims(self.cfg)

    def bits_per_dim(self, nats: torch.Tensor) -> torch.Tensor:
        return nats_to_bpd(nats, self.num_dims)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, [self.pad] * 4) if self.pad else x

    @staticmethod
    def _check_generators(generators: Sequence[torch.Generator], x: torch.Tensor) -> Sequence[torch.Generator]:
        if len(generators) != x.shape[0]:
            raise ValueError(f"expected one generator per image ({x.shape[0]}), got {len(generators)}")
        return generators

    def _check_input(self, x: torch.Tensor) -> None:
        c, s = self.cfg.image_channels, self.cfg.image_size
        if x.dim() != 4 or x.shape[1:] != (c, s, s):
            raise ValueError(f"expected images of shape [B, {c}, {s}, {s}], got {tuple(x.shape)}")

    def _bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Returns [e_0, ..., e_{L-1}, e_pre]: layer l's feature and the preprocessed one last."""
        h = self.preprocess(self.stem(self._pad(2.0 * x - 1.0)))
        feats = [h]
        for layer in reversed(self.layers):
            feats.append(layer.encoder(feats[-1]))
        return feats[::-1]

    def _noise(self, generators: Sequence[torch.Generator], k: int, device: torch.device) -> torch.Tensor:
        """Standard normal noise for ``k`` samples of each of ``B = len(generators)`` images, image
        ``i``'s drawn from ``generators[i]`` only (sample-major, so sample 0 is the same whatever ``k``):
        [L, k * B, C_z, h, w], ordered like ``x.repeat(k, 1, 1, 1)``."""
        shape = (k, len(self.layers), self.cfg.latent_channels, self.latent_hw, self.latent_hw)
        eps = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators], dim=2)
        return eps.transpose(0, 1).reshape(shape[1], k * len(generators), *shape[2:])

    def _top_down(self, batch: int, feats: Optional[list[torch.Tensor]], temperature: float = 1.0,
                  want_logw: bool = False, noise: Optional[torch.Tensor] = None, stats: Optional[list] = None):
        """Posterior pass when ``feats`` is given, else ancestral sampling from the prior; ``noise``
        ([L, batch, C_z, h, w], standard normal) replaces the sampler's own draws.  ``stats`` (a list,
        posterior pass only) receives one :class:`LayerStats` per layer.

        Returns (output-distribution parameters, per-layer KL [B, L] or None, log p(z) - log q(z) [B] or None).
        """
        memory: list[torch.Tensor] = []
        z = None
        kls, logw = [], 0.0
        dtype = self.layers[0].constant.dtype
        like = None
        for i, layer in enumerate(self.layers):
            if i >= 2 and self.cfg.prior_attention.enabled:
                memory[i - 2] = self.memory_norms[i - 2](memory[i - 2])
            record = None if stats is None else {}
            stored, prior_cond, query = layer.decode(batch, z, memory, record)
            if like is None:
                like = stored.new_zeros(batch, self.cfg.latent_channels, self.latent_hw, self.latent_hw, dtype=dtype)
            prior = layer.prior(prior_cond, like)
            eps = None if noise is None else noise[i]
            if feats is None:
                z = prior.sample(temperature, eps)
            else:
                q = layer.posterior(feats[i:], prior_cond, query, prior, record)
                z = q.sample(temperature, eps)
                kls.append(q.kl(prior))
                if want_logw:
                    logw = logw + prior.log_prob(z) - q.log_prob(z)
                if record is not None:
                    stats.append(LayerStats(prior.detach(), q.detach(), z.detach(), record.get("prior_attention"),
                                            record.get("posterior_attention")))
            if self.cfg.prior_attention.enabled:
                memory.append(stored)
            else:
                memory = [stored]
        h = self.merge_out(memory[-1][:, :self.w.ctx], z) if len(self.layers) > 1 else z
        params = crop(self.data_head(self.postprocess(h)), self.pad)
        kl = torch.stack(kls, dim=1) if kls else None
        return params, kl, (logw if want_logw else None)

    def _distribution(self, params: torch.Tensor):
        if self.cfg.likelihood == "bernoulli":
            return Bernoulli(params)
        return DiscretizedLogisticMixture(params, self.cfg.image_channels, self.cfg.num_mixtures, self.cfg.num_bits)

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.cfg.likelihood == "bernoulli" else 2.0 * x - 1.0

    def _to_image(self, dist) -> torch.Tensor:
        if self.cfg.likelihood == "bernoulli":
            return dist.mean()
        return (dist.sample() + 1.0) / 2.0

    # -- public API -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, beta: float = 1.0, generators: Optional[Sequence[torch.Generator]] = None,
                stats: bool = False) -> VAEOutput:
        """Negative ELBO in nats per image; ``loss`` weights the KL by ``beta`` (KL warm-up).

        ``generators``: one per image; image ``i``'s posterior noise then comes from ``generators[i]``
        alone, so its result does not depend on the other images in the batch.  ``stats=True``: the
        output's ``stats`` holds each layer's prior, posterior, sample and attention weights
        (:class:`LayerStats`, detached); otherwise it is None and nothing extra is kept.
        """
        self._check_input(x)
        noise = None if generators is None else self._noise(self._check_generators(generators, x), 1, x.device)
        layers: Optional[list] = [] if stats else None
        params, kl, _ = self._top_down(x.shape[0], self._bottom_up(x), noise=noise, stats=layers)
        recon_nll = -self._distribution(params).log_prob(self._target(x))
        kl = kl.float()
        loss = (recon_nll + beta * kl.sum(1)).mean()
        neg_elbo = (recon_nll + kl.sum(1)).detach()
        return VAEOutput(loss=loss, neg_elbo=neg_elbo, recon_nll=recon_nll.detach(), kl=kl.detach(),
                         stats=None if layers is None else tuple(layers))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """``n`` images in [0, 1] from the prior, its sigmas scaled by ``temperature``; Bernoulli
        models return pixel probabilities, logistic-mixture models a sample."""
        params, _, _ = self._top_down(n, None, temperature=temperature)
        return self._to_image(self._distribution(params)).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        params, _, _ = self._top_down(x.shape[0], self._bottom_up(x))
        return self._to_image(self._distribution(params)).clamp(0, 1)

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor) -> dict:
        """Depth-wise attention weights for ``x``: {"prior": {layer: [B, n, H, W]}, "posterior": {...}}
        (the sides the model has; read off :class:`LayerStats`)."""
        self._check_input(x)
        layers: list[LayerStats] = []
        self._top_down(x.shape[0], self._bottom_up(x), stats=layers)
        log: dict = {}
        for i, s in enumerate(layers):
            for side, w in (("prior", s.prior_attention), ("posterior", s.posterior_attention)):
                if w is not None:
                    log.setdefault(side, {})[i] = w
        return log

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, num_samples: int = 100, chunk: int = 25,
                       generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
        """Importance-weighted estimate of log p(x) in nats, [B], with ``num_samples`` posterior
        samples evaluated ``chunk`` at a time (memory is bounded by chunk * B images).

        The bottom-up pass runs once per image and is shared by all samples (it is deterministic).
        ``generators``: one per image, as in ``forward``; the first sample then uses the same noise as
        ``forward`` given equally seeded generators.
        """
        self._check_input(x)
        if generators is not None:
            generators = self._check_generators(generators, x)
        b = x.shape[0]
        target = self._target(x)
        feats = self._bottom_up(x)
        parts = []
        done = 0
        while done < num_samples:
            k = min(chunk, num_samples - done)
            noise = None if generators is None else self._noise(generators, k, x.device)
            params, _, logw = self._top_down(b * k, [f.repeat(k, 1, 1, 1) for f in feats], want_logw=True,
                                             noise=noise)
            logp_x = self._distribution(params).log_prob(target.repeat(k, 1, 1, 1))
            parts.append((logp_x + logw).float().view(k, b))
            done += k
        logw_all = torch.cat(parts, dim=0)
        return torch.logsumexp(logw_all, dim=0) - math.log(num_samples)
