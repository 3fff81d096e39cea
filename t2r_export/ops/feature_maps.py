"""Feature maps phi for linear attention.

All maps act on the last axis and keep one set of parameters per KV head, so a query head uses
the map of the KV head its group reads from (GQA): phi is tied between queries and keys.

- ``t2r``  (Kasai et al. 2021): phi(x) = relu(W x + b), W [H_kv, k, d], b [H_kv, k], learned.
- ``hedgehog`` (Zhang et al. 2024, as in LoLCATs): phi(x) = softmax([W x + b, -(W x + b)]) over the
  2k features, W [H_kv, k, d], b [H_kv, k], learned; feature size 2k. Its "default" init is the
  identity (W = eye(k, d), b = 0), LoLCATs' choice: phi starts as a softmax over ±x, already
  close to exp(q·k) for small inputs.
- ``elu``  (Katharopoulos et al. 2020): phi(x) = elu(x) + 1, feature size = d, no parameters.
- ``rfa``  (Peng et al. 2021): phi(x) = sqrt(1/m) [sin(W x̂), cos(W x̂)], x̂ = x / |x|,
  W [H_kv, m, d] ~ N(0, 1) drawn once from a seed and frozen; feature size k = 2m.

The module also carries the attention settings that go with it (denominator clamp, chunk size,
sliding window), as constructor arguments: the attention function reads them from here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import FEATURE_MAPS
from .linear_attention import DEFAULT_CHUNK, DEFAULT_EPS

LEARNED = ("t2r", "hedgehog")
# the decay's start: gamma = 1 - 1/256
DECAY_INIT_TOKENS = 256.0
# the decay's floor: gamma^-i over a 64-token block of the exported prefill then stays below 1e3,
# finite even in fp16 (docs/design.md#sliding-window-hybrid)
DECAY_MIN = 0.9
INITS = ("default", "identity")


def feature_size(kind: str, feature_dim: int, head_dim: int) -> int:
    """The state's feature axis k for a feature map."""
    if kind == "elu":
        return head_dim
    if kind == "hedgehog":
        return 2 * feature_dim
    return feature_dim


class FeatureMap(nn.Module):
    """phi applied per KV head.

    forward(x): x [B, H_kv, G, T, d] (G query heads per KV head, G = 1 for keys) -> [B, H_kv, G, T, k]
    """

    def __init__(self, kind: str, num_kv_heads: int, head_dim: int, feature_dim: int = 32,
                 init: str = "default", seed: int = 0, eps: float = DEFAULT_EPS,
                 chunk_size: int = DEFAULT_CHUNK, window: int = 0, decay: bool = False):
        super().__init__()
        if kind not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map {kind!r}; expected one of {', '.join(FEATURE_MAPS)}")
        if init not in INITS:
            raise ValueError(f"unknown feature-map init {init!r}; expected one of {', '.join(INITS)}")
        if feature_dim <= 0:
            raise ValueError(f"feature dim must be > 0, got {feature_dim}")
        if kind == "rfa" and feature_dim % 2:
            raise ValueError(f"rfa needs an even feature dim (sin and cos halves), got {feature_dim}")
        if window < 0:
            raise ValueError(f"window must be >= 0 (0 = off), got {window}")
        self.kind = kind
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.feature_dim = feature_size(kind, feature_dim, head_dim)
        self.eps = float(eps)
        self.chunk_size = int(chunk_size)
        self.window = int(window)
        if decay and not self.window:
            raise ValueError("a decay needs the sliding window (--window W > 0): it applies to the keys that left it")
        if decay:
            # one gamma per KV head, gamma = sigmoid(p), so 0 < gamma < 1 whatever p learns; starts
            # at 1 - 1/DECAY_INIT_TOKENS (a key keeps 1/e of its weight after ~that many steps)
            self.decay = nn.Parameter(torch.full((num_kv_heads,), math.log(DECAY_INIT_TOKENS - 1.0)))
        else:
            self.decay = None
        if kind in LEARNED:
            self.weight = nn.Parameter(torch.empty(num_kv_heads, feature_dim, head_dim))
            self.bias = nn.Parameter(torch.empty(num_kv_heads, feature_dim))
            self.reset_parameters(init)
        elif kind == "rfa":
            gen = torch.Generator().manual_seed(seed)
            omega = torch.randn(num_kv_heads, feature_dim // 2, head_dim, generator=gen)
            # a buffer, not a parameter: random features stay fixed, as in the paper's baseline
            self.register_buffer("omega", omega, persistent=True)

    def reset_parameters(self, init: str = "default") -> None:
        if self.kind not in LEARNED:
            return
        with torch.no_grad():
            if init == "default" and self.kind == "t2r":
                # what nn.Linear does, per head: the official T2R code's start
                bound = 1.0 / math.sqrt(self.head_dim)
                self.weight.uniform_(-bound, bound)
                self.bias.uniform_(-bound, bound)
            else:
                # t2r: relu(x[:k]) (zero-padded when k > d), close to the identity kernel;
                # hedgehog: softmax([x, -x]) — LoLCATs' identity start for every init
                eye = torch.eye(self.weight.shape[1], self.head_dim)
                self.weight.copy_(eye.expand_as(self.weight))
                self.bias.zero_()

    def log_decay(self) -> torch.Tensor | None:
        """log gamma per KV head [H_kv] (fp32), or None without a decay."""
        return None if self.decay is None else F.logsigmoid(self.decay.float()).clamp_min(math.log(DECAY_MIN))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        # [B, Hk, G, T, d] x [Hk, k, d] -> [B, Hk, G, T, k]
        y = torch.einsum("bhgtd,hkd->bhgtk", x, self.weight.to(x.dtype))
        return y + self.bias.to(x.dtype)[None, :, None, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "elu":
            return F.elu(x) + 1.0
        if self.kind == "t2r":
            return F.relu(self._project(x))
        if self.kind == "hedgehog":
            y = self._project(x)
            return torch.softmax(torch.cat([y, -y], dim=-1), dim=-1)
        xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        proj = torch.einsum("bhgtd,hmd->bhgtm", xn, self.omega.to(x.dtype))
        scale = 1.0 / math.sqrt(self.omega.shape[1])
        return torch.cat([proj.sin(), proj.cos()], dim=-1) * scale

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, k={self.feature_dim}, "
                f"window={self.window}, decay={self.decay is not None}")
