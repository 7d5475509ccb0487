"""One latent layer of the attentive VAE (``VariationalLayer``) and the channel widths it works at.

The layer owns its encoder cell, its decoder cell (or, for the top layer, the learned constant), the
merges, the prior and posterior parameter heads and the two depth-wise attentions; the top-down loop
that chains the layers lives in :mod:`avi_scale.model.vae`.  See ``docs/model.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import DepthwiseAttention
from .distributions import DiagGaussian
from .layers import ChannelLayerNorm, ConcatMerge, ParamHead, ResidualCell, SumMerge

LN_EPS = 1e-5


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
               record: Optional[dict] = None):
        """Returns (stored entry for later layers, prior condition, posterior query); ``record`` (a dict)
        receives the prior attention's weights as ``"prior_attention"``."""
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
        if record is not None:
            record["prior_attention"] = weights.detach()
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
                  prior: DiagGaussian, record: Optional[dict] = None) -> DiagGaussian:
        """``feats`` are this layer's bottom-up feature and every one below it (e_l ... e_L); ``record``
        receives the posterior attention's weights as ``"posterior_attention"``."""
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
            if record is not None:
                record["posterior_attention"] = weights.detach()
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
