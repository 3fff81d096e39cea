"""Feature maps phi for linear attention.

All maps act on the last axis and keep one set of parameters per KV head, so a query head uses
the map of the KV head its group reads from (GQA): phi is tied between queries and keys.

- ``t2r``  (Kasai et al. 2021): phi(x) = relu(W x + b), W [H_kv, k, d], b [H_kv, k], learned.
- ``elu``  (Katharopoulos et al. 2020): phi(x) = elu(x) + 1, feature size = d, no parameters.
- ``rfa``  (Peng et al. 2021): phi(x) = sqrt(1/m) [sin(W x̂), cos(W x̂)], x̂ = x / |x|,
  W [H_kv, m, d] ~ N(0, 1) drawn once from a seed and frozen; feature size k = 2m.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_MAPS = ("t2r", "elu", "rfa")
INITS = ("default", "identity")


def feature_size(kind: str, feature_dim: int, head_dim: int) -> int:
    """The state's feature axis k for a feature map."""
    if kind == "elu":
        return head_dim
    return feature_dim


class FeatureMap(nn.Module):
    """phi applied per KV head.

    forward(x): x [B, H_kv, G, T, d] (G query heads per KV head, G = 1 for keys) -> [B, H_kv, G, T, k]
    """

    def __init__(self, kind: str, num_kv_heads: int, head_dim: int, feature_dim: int = 32,
                 init: str = "default", seed: int = 0):
        super().__init__()
        if kind not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map {kind!r}; expected one of {', '.join(FEATURE_MAPS)}")
        if init not in INITS:
            raise ValueError(f"unknown feature-map init {init!r}; expected one of {', '.join(INITS)}")
        if feature_dim <= 0:
            raise ValueError(f"feature dim must be > 0, got {feature_dim}")
        if kind == "rfa" and feature_dim % 2:
            raise ValueError(f"rfa needs an even feature dim (sin and cos halves), got {feature_dim}")
        self.kind = kind
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.feature_dim = feature_size(kind, feature_dim, head_dim)
        if kind == "t2r":
            self.weight = nn.Parameter(torch.empty(num_kv_heads, feature_dim, head_dim))
            self.bias = nn.Parameter(torch.empty(num_kv_heads, feature_dim))
            self.reset_parameters(init)
        elif kind == "rfa":
            gen = torch.Generator().manual_seed(seed)
            omega = torch.randn(num_kv_heads, feature_dim // 2, head_dim, generator=gen)
            # a buffer, not a parameter: random features stay fixed, as in the paper's baseline
            self.register_buffer("omega", omega, persistent=True)

    def reset_parameters(self, init: str = "default") -> None:
        if self.kind != "t2r":
            return
        with torch.no_grad():
            if init == "default":
                # what nn.Linear does, per head: the official T2R code's start
                bound = 1.0 / math.sqrt(self.head_dim)
                self.weight.uniform_(-bound, bound)
                self.bias.uniform_(-bound, bound)
            else:
                # relu(x[:k]) (padded with zeros when k > d): starts close to the identity kernel
                eye = torch.eye(self.feature_dim, self.head_dim)
                self.weight.copy_(eye.expand_as(self.weight))
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "elu":
            return F.elu(x) + 1.0
        if self.kind == "t2r":
            # [B, Hk, G, T, d] x [Hk, k, d] -> [B, Hk, G, T, k]
            y = torch.einsum("bhgtd,hkd->bhgtk", x, self.weight.to(x.dtype))
            return F.relu(y + self.bias.to(x.dtype)[None, :, None, None, :])
        xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        proj = torch.einsum("bhgtd,hmd->bhgtm", xn, self.omega.to(x.dtype))
        scale = 1.0 / math.sqrt(self.omega.shape[1])
        return torch.cat([proj.sin(), proj.cos()], dim=-1) * scale

    def extra_repr(self) -> str:
        return f"kind={self.kind}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, k={self.feature_dim}"
