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
See ``docs/model.md`` for the full walk-through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import DepthwiseAttention
from .distributions import Bernoulli, DiagGaussian, DiscretizedLogisticMixture, crop
from .layers import ChannelLayerNorm, ConcatMerge, ParamHead, ResidualCell, SumMerge, WNConv2d

LN_EPS = 1e-5


def image_dims(cfg: ModelConfig) -> int:
    """Dimensions of one image in the data (channels x size x size; the padding is not counted)."""
    return cfg.image_channels * cfg.image_size * cfg.image_size


def nats_to_bpd(nats, num_dims: int):
    """Nats per image -> bits per dimension, ``nats / (num_dims * ln 2)`` (floats or tensors): the one formula."""
    if num_dims < 1:
        raise ValueError(f"num_dims must be >= 1, got {num_dims}")
    return nats / (num_dims * math.log(2.0))


class VAEOutput(NamedTuple):
    """A named tuple (not a dataclass) so wrappers such as DeepSpeed ZeRO-3, which look for
    tensors inside tuples, see every output tensor."""

    loss: torch.Tensor  # scalar: batch mean of recon_nll + beta * kl.sum(1)
    neg_elbo: torch.Tensor  # [B] nats per image (beta = 1), detached
    recon_nll: torch.Tensor  # [B]
    kl: torch.Tensor  # [B, L]


@dataclass
class _Widths:
    f2: int  # 2F
    dq: int  # posterior attention key/query width (0 if off)
    dp: int  # prior attention key/query width (0 if off)

    @property
    def ctx(self) -> int:  # top-down context (= value) width
        return self.f2 + self.dq

    @property
    def enc(self) -> int:  # bottom-up feature width
        return self.f2 + self.dq


class VariationalLayer(nn.Module):
    """One latent layer: its encoder cell, decoder cell (or learned constant), merges, prior and
    posterior heads, and the two depth-wise attentions."""

    def __init__(self, index: int, cfg: ModelConfig, w: _Widths, latent_hw: int):
        super().__init__()
        L, cz = cfg.num_layers, cfg.latent_channels
        self.index, self.is_last, self.cfg, self.w = index, index == L - 1, cfg, w
        nl = cfg.nonlocal_key_dim
        places = set(cfg.nonlocal_places)
        blocks = [0] * cfg.num_blocks
        ckpt = cfg.activation_checkpointing
        bn = cfg.batch_norm_momentum
        self.prior_att = cfg.prior_attention.enabled and index > 0
        self.post_att = cfg.posterior_attention.enabled
        self.emits_key = cfg.prior_attention.enabled and not self.is_last

        # bottom-up cell
        self.encoder = ResidualCell(w.enc, blocks, nl if "encoder" in places else None, bn, ckpt)

        # top-down: the learned constant (layer 0) or merge + decoder cell
        if index == 0:
            width = w.ctx + (w.dp if self.emits_key else 0)
            self.constant = nn.Parameter(torch.randn(1, width, latent_hw, latent_hw) * 0.05)
        else:
            width = w.ctx + (w.dp if self.prior_att else 0) + (w.dp if self.emits_key else 0)
            self.merge_decoder = ConcatMerge(w.ctx + cz, width, nl if "merge" in places else None)
            self.decoder = ResidualCell(width, blocks, nl if "decoder" in places else None, bn, ckpt)
            self.prior_head = ParamHead(w.ctx, 2 * cz, 1, "elu")

        # prior depth-wise attention (layers > 0)
        if self.prior_att:
            self.prior_attention = DepthwiseAttention()
            self.prior_gamma = nn.Parameter(torch.zeros(1))
            if cfg.prior_attention.layer_norm:
                self.ln_context = ChannelLayerNorm(w.ctx, eps=LN_EPS)
                self.ln_latest = ChannelLayerNorm(w.ctx, eps=LN_EPS)
                self.ln_prior_out = ChannelLayerNorm(w.ctx, eps=LN_EPS)

        # posterior: merge of (e_l, prior condition), attention, head
        if index > 0:
            self.merge_encoder = SumMerge(w.f2 if self.post_att else w.enc, w.ctx,
                                          w.enc if self.post_att else w.f2, nl if "merge" in places else None)
        if self.post_att:
            self.posterior_attention = DepthwiseAttention()
            self.posterior_gamma = nn.Parameter(torch.zeros(1))
            if cfg.posterior_attention.layer_norm:
                self.ln_post_out = ChannelLayerNorm(w.f2, eps=LN_EPS)
                self.ln_post_cond = ChannelLayerNorm(w.f2, eps=LN_EPS)
        head_in = w.enc if self.post_att else w.f2
        if index == 0:
            self.posterior_head = ParamHead(head_in, 2 * cz, 3, "elu", num_hidden=1)
        else:
            self.posterior_head = ParamHead(head_in, 2 * cz, 3, None)

    # -- top-down ---------------------------------------------------------------------------
    def decode(self, batch: int, prev_z: Optional[torch.Tensor], memory: list[torch.Tensor],
               attn_log: Optional[dict] = None):
        """Returns (stored entry for later layers, prior condition, posterior query)."""
        w = self.w
        if self.index == 0:
            s = self.constant.expand(batch, -1, -1, -1)
            query = s[:, :w.dq] if self.post_att else None
            return s, s, query
        x = self.decoder(self.merge_decoder(memory[-1][:, :w.ctx], prev_z))
        ctx = x[:, :w.ctx]
        key = x[:, w.ctx:w.ctx + w.dp] if self.emits_key else None
        query_p = x[:, x.shape[1] - w.dp:] if self.prior_att else None
        query_q = ctx[:, :w.dq] if self.post_att else None
        if not self.prior_att:
            return ctx, ctx, query_q
        ln = self.cfg.prior_attention.layer_norm
        if ln:
            ctx = ctx + F.gelu(self.ln_context(ctx))
        values = [m[:, :w.ctx] for m in memory]
        keys = torch.stack([m[:, w.ctx:w.ctx + w.dp] for m in memory], dim=1)
        if ln:
            values[-1] = self.ln_latest(values[-1])
        out, weights = self.prior_attention(query_p, keys, torch.stack(values, dim=1), return_weights=True)
        if attn_log is not None:
            attn_log.setdefault("prior", {})[self.index] = weights.detach()
        if ln:
            out = out + F.gelu(self.ln_prior_out(out))
        prior_cond = ctx + self.prior_gamma * out
        stored = torch.cat([ctx, key], dim=1) if key is not None else ctx
        return stored, prior_cond, query_q

    def prior(self, prior_cond: torch.Tensor, like: torch.Tensor) -> DiagGaussian:
        if self.index == 0:
            return DiagGaussian.standard(like)
        raw_mu, raw_ls = self.prior_head(prior_cond).chunk(2, dim=1)
        raw_ls = self._noisy(raw_ls)
        return DiagGaussian.from_raw(raw_mu, raw_ls, self.cfg.prior_log_sigma_bounds)

    def posterior(self, feats: list[torch.Tensor], prior_cond: torch.Tensor, query: Optional[torch.Tensor],
                  prior: DiagGaussian, attn_log: Optional[dict] = None) -> DiagGaussian:
        """``feats`` are this layer's bottom-up feature and every one below it (e_l ... e_L)."""
        w = self.w
        if self.post_att:
            values = [f[:, :w.f2] for f in feats]
            keys = [f[:, w.f2:] for f in feats]
            cond = values[0]
        else:
            cond = feats[0]
        if self.index > 0:
            cond = self.merge_encoder(cond, prior_cond)
        if self.post_att:
            if self.index > 0:
                cond, keys[0] = cond[:, :w.f2], cond[:, w.f2:]
                values[0] = cond
            out, weights = self.posterior_attention(query, torch.stack(keys, 1), torch.stack(values, 1),
                                                    return_weights=True)
            if attn_log is not None:
                attn_log.setdefault("posterior", {})[self.index] = weights.detach()
            if self.cfg.posterior_attention.layer_norm:
                out = out + F.gelu(self.ln_post_out(out))
                cond = cond + F.gelu(self.ln_post_cond(cond))
            cond = torch.cat([cond + self.posterior_gamma * out, keys[0]], dim=1)
        raw_mu, raw_ls = self.posterior_head(cond).chunk(2, dim=1)
        raw_ls = self._noisy(raw_ls)
        if self.index > 0:  # residual parameterisation on the prior's raw parameters
            raw_mu, raw_ls = prior.raw_mu + raw_mu, prior.raw_log_sigma + raw_ls
        return DiagGaussian.from_raw(raw_mu, raw_ls, self.cfg.posterior_log_sigma_bounds)

    def _noisy(self, raw_log_sigma: torch.Tensor) -> torch.Tensor:
        s = self.cfg.log_sigma_noise
        if s > 0 and self.training:
            return raw_log_sigma + s * torch.randn_like(raw_log_sigma)
        return raw_log_sigma


class AttentiveVAE(nn.Module):
    """Hierarchical VAE with depth-wise attention in prior and posterior (attentive VAE), or the
    local baseline when both attentions are disabled in the config.

    Images enter as float tensors in [0, 1] at ``cfg.image_size`` (binary {0, 1} for the
    Bernoulli likelihood, k/255 for the logistic mixture); padding to ``cfg.padded_size`` happens
    inside, and the pad is cropped out of the likelihood.
    """

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
                  attn_log: Optional[dict] = None, want_logw: bool = False, noise: Optional[torch.Tensor] = None):
        """Posterior pass when ``feats`` is given, else ancestral sampling from the prior; ``noise``
        ([L, batch, C_z, h, w], standard normal) replaces the sampler's own draws.

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
            stored, prior_cond, query = layer.decode(batch, z, memory, attn_log)
            if like is None:
                like = stored.new_zeros(batch, self.cfg.latent_channels, self.latent_hw, self.latent_hw, dtype=dtype)
            prior = layer.prior(prior_cond, like)
            eps = None if noise is None else noise[i]
            if feats is None:
                z = prior.sample(temperature, eps)
            else:
                q = layer.posterior(feats[i:], prior_cond, query, prior, attn_log)
                z = q.sample(temperature, eps)
                kls.append(q.kl(prior))
                if want_logw:
                    logw = logw + prior.log_prob(z) - q.log_prob(z)
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
        return DiscretizedLogisticMixture(params, self.cfg.image_channels, self.cfg.num_mixtures)

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.cfg.likelihood == "bernoulli" else 2.0 * x - 1.0

    def _to_image(self, dist) -> torch.Tensor:
        if self.cfg.likelihood == "bernoulli":
            return dist.mean()
        return (dist.sample() + 1.0) / 2.0

    # -- public API -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, beta: float = 1.0,
                generators: Optional[Sequence[torch.Generator]] = None) -> VAEOutput:
        """Negative ELBO in nats per image; ``loss`` weights the KL by ``beta`` (KL warm-up).

        ``generators``: one per image; image ``i``'s posterior noise then comes from ``generators[i]``
        alone, so its result does not depend on the other images in the batch.
        """
        self._check_input(x)
        noise = None if generators is None else self._noise(self._check_generators(generators, x), 1, x.device)
        params, kl, _ = self._top_down(x.shape[0], self._bottom_up(x), noise=noise)
        recon_nll = -self._distribution(params).log_prob(self._target(x))
        kl = kl.float()
        loss = (recon_nll + beta * kl.sum(1)).mean()
        neg_elbo = (recon_nll + kl.sum(1)).detach()
        return VAEOutput(loss=loss, neg_elbo=neg_elbo, recon_nll=recon_nll.detach(), kl=kl.detach())

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
        """Depth-wise attention weights for ``x``: {"prior": {layer: [B, n, H, W]}, "posterior": {...}}."""
        self._check_input(x)
        log: dict = {}
        self._top_down(x.shape[0], self._bottom_up(x), attn_log=log)
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
