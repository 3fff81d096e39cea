"""T2R linear attention as a transformers attention function (``attn_implementation="t2r"``).

HF's attention modules keep doing what they already do (q/k/v projections, RoPE, output
projection); only the function that turns (q, k, v) into the attention output is ours. So a swap
copies no weights and touches no module code, and every supported architecture shares one path.

Extra keyword arguments, passed through the model's ``forward`` by HF:
- ``t2r_state``: a ``RecurrentState``; the layer reads its state from it and writes the new one
  back (decode / resume). Without it, each call starts from a zero state (training).
- ``t2r_form``: "parallel" (default), "naive" or "recurrent" — which form computes it (tests).
- ``t2r_transfer``: any object with ``.append``; when given, the layer appends MSE(linear, softmax)
  and returns the softmax output, so later layers see the teacher's activations (attention
  transfer). Not a plain list under FSDP or DDP on GPUs, which rebuild list arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.linear_attention import FORMS, zero_state

ATTN_IMPLEMENTATION = "t2r"
FEATURE_MAP_ATTR = "t2r_feature_map"


@dataclass
class RecurrentState:
    """Per-layer state: s[i] [B, H_kv, K, Dv], z[i] [B, H_kv, K], fp32. No sequence axis."""

    s: list
    z: list

    @classmethod
    def zeros(cls, num_layers: int, batch: int, num_kv_heads: int, feature_dim: int, head_dim: int,
              device=None) -> "RecurrentState":
        pairs = [zero_state(batch, num_kv_heads, feature_dim, head_dim, device) for _ in range(num_layers)]
        return cls([p[0] for p in pairs], [p[1] for p in pairs])

    def clone(self) -> "RecurrentState":
        return RecurrentState([t.clone() for t in self.s], [t.clone() for t in self.z])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.s + self.z)


def _softmax_reference(query, key, value, scaling):
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)


def t2r_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                          t2r_state: RecurrentState | None = None, t2r_form: str | None = None,
                          t2r_transfer: list | None = None, **kwargs):
    """query [B, H, T, d] (after RoPE), key/value [B, H_kv, T, d] -> ([B, T, H, d], None)."""
    feature_map = getattr(module, FEATURE_MAP_ATTR)
    settings = feature_map.settings
    b, h, t, d = query.shape
    h_kv = key.shape[1]
    if key.shape[2] != t:
        # HF appended to a KV cache: T2R keeps a fixed-size state instead
        raise ValueError("T2R attention got a KV cache; decode with t2r_export.models.decode_step (or call "
                         "the model with use_cache=False)")
    if scaling is None:
        scaling = d ** -0.5
    # queries are scaled before phi, keys are not (T2R, docs/design.md#feature-maps)
    q = (query * scaling).view(b, h_kv, h // h_kv, t, d)
    phi_q = feature_map(q)
    phi_k = feature_map(key.unsqueeze(2)).squeeze(2)

    layer = module.layer_idx
    state = None
    if t2r_state is not None:
        state = (t2r_state.s[layer], t2r_state.z[layer])
    form = t2r_form or ("recurrent" if t == 1 and state is not None else "parallel")
    fn = FORMS[form]
    extra = {"chunk_size": settings.chunk_size} if form == "parallel" else {}
    out, (s, z) = fn(phi_q, phi_k, value, state, eps=settings.eps, **extra)
    if t2r_state is not None:
        t2r_state.s[layer], t2r_state.z[layer] = s, z
    out = out.reshape(b, h, t, -1)

    if t2r_transfer is not None:
        with torch.no_grad():
            target = _softmax_reference(query, key, value, scaling)
        t2r_transfer.append(F.mse_loss(out.float(), target.float()))
        out = target
    return out.transpose(1, 2).contiguous(), None


def register_attention_function() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, t2r_attention_forward)
