"""Building blocks: weight-normed convolutions, residual cells, non-local blocks, merge cells.

Layout is NCHW throughout (channels-last memory format works unchanged). Every convolution is
weight-normed (w = g * v / ||v||, one gain per output channel) as in the official implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RESIDUAL_SCALE = 0.1  # block output = shortcut + 0.1 * residual
BN_EPS = 1e-5


class WNConv2d(nn.Conv2d):
    """Weight-normalised conv: the effective kernel is g * v / ||v|| (norm over in x kh x kw).

    The direction ``weight`` and the gain ``gain`` are plain parameters of this module, so the
    layer works unchanged under DeepSpeed ZeRO-3 partitioning.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, bias: bool = True):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
        with torch.no_grad():
            norm = self.weight.flatten(1).norm(dim=1)
        self.gain = nn.Parameter(norm.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch._weight_norm(self.weight, self.gain.view(-1, 1, 1, 1), 0)  # one fused op
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor, independently per pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class NonLocalBlock(nn.Module):
    """Spatial self-attention (Wang et al. 2018 / SAGAN): softmax over all H*W positions.

    q, k: 1x1 convs to ``key_dim``; v: a full-width 1x1 conv; scores = scale * q.k (scale
    learnable, init 1, no 1/sqrt(d)); output = x + gamma * attention (gamma init 0).
    Uses ``scaled_dot_product_attention`` so fused/flash kernels apply where available. Scalar
    parameters are held as 1-element tensors (DeepSpeed cannot broadcast 0-dim parameters).
    """

    # Zero-pad q/k/v to one width so that the fused SDPA kernels apply (see forward); False keeps the
    # unpadded widths (the unfused math path) -- for benchmarks and exact FLOP counts.
    pad_for_fused_kernels: bool = True

    def __init__(self, channels: int, key_dim: int):
        super().__init__()
        self.query = WNConv2d(channels, key_dim)
        self.key = WNConv2d(channels, key_dim)
        self.value = WNConv2d(channels, channels)
        self.scale = nn.Parameter(torch.ones(1))
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = (self.query(x) * self.scale).flatten(2).transpose(1, 2)  # [B, HW, d]
        k = self.key(x).flatten(2).transpose(1, 2)  # [B, HW, d]
        v = self.value(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        # The fused (flash / memory-efficient) kernels need equal q/k and v widths and unit stride in the
        # last dim, else SDPA falls back to its unfused math path (2.8x slower at 32x32 on CPU).
        # Zero-padding the narrower side to the wider one leaves q.k and the output unchanged.
        width = max(q.shape[-1], c) if self.pad_for_fused_kernels else 0
        q, k, v = (F.pad(t, (0, max(width - t.shape[-1], 0))).contiguous().unsqueeze(1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        out = out.squeeze(1)[..., :c].transpose(1, 2).reshape(b, c, h, w)
        return x + self.gamma * out


class Node(nn.Module):
    """BatchNorm -> (non-local block) -> swish -> weight-normed conv."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, kernel_size: int = 3,
                 nonlocal_key_dim: int | None = None, bn_momentum: float = 0.1, upsample: bool = False):
        super().__init__()
        self.upsample = upsample
        self.bn = nn.BatchNorm2d(in_ch, eps=BN_EPS, momentum=bn_momentum)
        self.nonlocal_block = NonLocalBlock(in_ch, nonlocal_key_dim) if nonlocal_key_dim else None
        self.conv = WNConv2d(in_ch, out_ch, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.bn(x)
        if self.nonlocal_block is not None:
            x = self.nonlocal_block(x)
        return self.conv(F.silu(x))


class FactorizedReduce(nn.Module):
    """Down-sampling shortcut: swish, then four stride-2 1x1 convs on shifted inputs, concatenated."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        quarter = out_ch // 4
        widths = [quarter, quarter, quarter, out_ch - 3 * quarter]
        self.convs = nn.ModuleList(WNConv2d(in_ch, w, 1, stride=2) for w in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(x)
        shifted = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        return torch.cat([conv(s) for conv, s in zip(self.convs, shifted)], dim=1)


class UpsampleShortcut(nn.Module):
    """Up-sampling shortcut: bilinear resize (align_corners) then a 1x1 conv without bias."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = WNConv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return self.conv(F.interpolate(x, size=(2 * h, 2 * w), mode="bilinear", align_corners=True))


class ResidualBlock(nn.Module):
    """Two nodes plus a shortcut; ``scale`` 0 keeps the shape, -2 halves H, W and doubles channels,
    +2 doubles H, W and halves channels. Output = shortcut + 0.1 * residual."""

    def __init__(self, channels: int, scale: int = 0, nonlocal_key_dim: int | None = None,
                 bn_momentum: float = 0.1, num_nodes: int = 2):
        super().__init__()
        if scale == 0:
            out_ch, stride, self.shortcut = channels, 1, nn.Identity()
        elif scale == -2:
            out_ch, stride = 2 * channels, 2
            self.shortcut = FactorizedReduce(channels, out_ch)
        elif scale == 2:
            out_ch, stride = channels // 2, 1
            self.shortcut = UpsampleShortcut(channels, out_ch)
        else:
            raise ValueError(f"residual block scale must be 0, -2 or 2, got {scale}")
        nodes = [Node(channels, out_ch, stride=stride, nonlocal_key_dim=nonlocal_key_dim,
                      bn_momentum=bn_momentum, upsample=scale == 2)]
        nodes += [Node(out_ch, out_ch, nonlocal_key_dim=nonlocal_key_dim, bn_momentum=bn_momentum)
                  for _ in range(num_nodes - 1)]
        self.nodes = nn.Sequential(*nodes)
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + RESIDUAL_SCALE * self.nodes(x)


class ResidualCell(nn.Module):
    """A ResNet of ``len(scales)`` residual blocks; optionally recomputed in backward
    (activation checkpointing, non-reentrant)."""

    def __init__(self, channels: int, scales: list[int], nonlocal_key_dim: int | None = None,
                 bn_momentum: float = 0.1, checkpoint: bool = False):
        super().__init__()
        blocks = []
        for s in scales:
            blocks.append(ResidualBlock(channels, s, nonlocal_key_dim, bn_momentum))
            channels = blocks[-1].out_channels
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = channels
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.blocks, x, use_reentrant=False)
        return self.blocks(x)


class ConcatMerge(nn.Module):
    """Decoder merge: concatenate (context, latent sample), 1x1 conv, optional non-local block."""

    def __init__(self, in_ch: int, out_ch: int, nonlocal_key_dim: int | None = None):
        super().__init__()
        self.conv = WNConv2d(in_ch, out_ch, 1)
        self.nonlocal_block = NonLocalBlock(out_ch, nonlocal_key_dim) if nonlocal_key_dim else None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = self.conv(torch.cat([a, b], dim=1))
        return self.nonlocal_block(out) if self.nonlocal_block is not None else out


class SumMerge(nn.Module):
    """Encoder merge: conv1x1(b) + (conv1x1(a) if widths differ else a), optional non-local block."""

    def __init__(self, a_ch: int, b_ch: int, out_ch: int, nonlocal_key_dim: int | None = None):
        super().__init__()
        self.conv_b = WNConv2d(b_ch, out_ch, 1)
        self.conv_a = WNConv2d(a_ch, out_ch, 1) if a_ch != out_ch else nn.Identity()
        self.nonlocal_block = NonLocalBlock(out_ch, nonlocal_key_dim) if nonlocal_key_dim else None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = self.conv_a(a) + self.conv_b(b)
        return self.nonlocal_block(out) if self.nonlocal_block is not None else out


class ParamHead(nn.Module):
    """Distribution-parameter network: [activation -> conv] x (1 + num_hidden); the hidden convs are
    1x1 at the input width, the last has ``kernel_size``. No BatchNorm."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, activation: str | None, num_hidden: int = 0):
        super().__init__()
        self.act = {"elu": F.elu, None: None}[activation]
        self.hidden = nn.ModuleList(WNConv2d(in_ch, in_ch, 1) for _ in range(num_hidden))
        self.out = WNConv2d(in_ch, out_ch, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in [*self.hidden, self.out]:
            if self.act is not None:
                x = self.act(x)
            x = conv(x)
        return x


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

