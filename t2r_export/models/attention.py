"""T2R linear attention as a transformers attention function (``attn_implementation="t2r"``).

HF's attention modules keep doing what they already do (q/k/v projections, RoPE, output
projection); only the function that turns (q, k, v) into the attention output is ours. So a swap
copies no weights and touches no module code, and every supported architecture shares one path.

Extra keyword arguments, passed through the model's ``forward`` by HF:
- ``t2r_state``: a ``RecurrentState``; the layer reads its state from it and writes the new one
  back (decode / resume). Without it, each call starts from a zero state (training).
- ``t2r_form``: "parallel" (default), "naive" or "recurrent" — which form computes it (tests).
- ``t2r_parts``: "both" (default), "linear" or "window": with a sliding window, keep only one part's
  terms (the evaluation ablations of ``eval --positions``; parallel form only).
- ``t2r_transfer``: any object with ``.append``; when given, the layer appends MSE(linear, softmax)
  and returns the softmax output, so later layers see the teacher's activations (attention
  transfer). Not a plain list under FSDP or DDP on GPUs, which rebuild list arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.linear_attention import FORMS, zero_state
from ..ops.window_attention import WINDOW_FORMS, zero_window_state

ATTN_IMPLEMENTATION = "t2r"
FEATURE_MAP_ATTR = "t2r_feature_map"


@dataclass
class RecurrentState:
    """Per-layer state, fp32, no sequence axis: s[i] [B, H_kv, K, Dv], z[i] [B, H_kv, K]; with a
    sliding window W also wk[i] [B, H_kv, W, d], wv[i] [B, H_kv, W, Dv] and wm[i] [B, W] (slot filled)."""

    s: list
    z: list
    wk: list | None = None
    wv: list | None = None
    wm: list | None = None

    @classmethod
    def zeros(cls, num_layers: int, batch: int, num_kv_heads: int, feature_dim: int, head_dim: int,
              device=None, window: int = 0) -> "RecurrentState":
        if window:
            parts = [zero_window_state(batch, num_kv_heads, feature_dim, head_dim, head_dim, window, device)
                     for _ in range(num_layers)]
            return cls(*(list(p) for p in zip(*parts)))
        pairs = [zero_state(batch, num_kv_heads, feature_dim, head_dim, device) for _ in range(num_layers)]
        return cls([p[0] for p in pairs], [p[1] for p in pairs])

    @property
    def window(self) -> int:
        return 0 if self.wm is None else self.wm[0].shape[-1]

    def tensors(self) -> list:
        return [t for part in (self.s, self.z, self.wk, self.wv, self.wm) if part is not None for t in part]

    def layer(self, i: int) -> tuple:
        if self.wm is None:
            return self.s[i], self.z[i]
        return self.s[i], self.z[i], self.wk[i], self.wv[i], self.wm[i]

    def set_layer(self, i: int, parts: tuple) -> None:
        lists = (self.s, self.z) if self.wm is None else (self.s, self.z, self.wk, self.wv, self.wm)
        for target, value in zip(lists, parts, strict=True):
            target[i] = value

    def shallow(self) -> "RecurrentState":
        """New lists holding the same tensors: a layer's update replaces its entry, not the tensor."""
        copy = lambda part: None if part is None else list(part)  # noqa: E731
        return RecurrentState(*(copy(p) for p in (self.s, self.z, self.wk, self.wv, self.wm)))

    def clone(self) -> "RecurrentState":
        copy = lambda part: None if part is None else [t.clone() for t in part]  # noqa: E731
        return RecurrentState(*(copy(p) for p in (self.s, self.z, self.wk, self.wv, self.wm)))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _softmax_reference(query, key, value, scaling):
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)


def t2r_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                          t2r_state: RecurrentState | None = None, t2r_form: str | None = None,
                          t2r_transfer: list | None = None, t2r_parts: str | None = None, **kwargs):
    """query [B, H, T, d] (after RoPE), key/value [B, H_kv, T, d] -> ([B, T, H, d], None)."""
    feature_map = getattr(module, FEATURE_MAP_ATTR)
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
    layer = module.layer_idx
    state = None if t2r_state is None else t2r_state.layer(layer)
    form = t2r_form or ("recurrent" if t == 1 and state is not None else "parallel")
    extra = {"chunk_size": feature_map.chunk_size} if form == "parallel" else {}
    if t2r_parts not in (None, "both"):
        if not feature_map.window or form != "parallel":
            raise ValueError(f"t2r_parts={t2r_parts!r} needs a sliding window and the parallel form")
        extra["parts"] = t2r_parts
    if feature_map.window:
        if t2r_state is not None and t2r_state.window != feature_map.window:
            raise ValueError(f"the state holds a window of {t2r_state.window} keys, the model uses "
                             f"{feature_map.window}; build it with t2r_export.models.new_state")
        out, new = WINDOW_FORMS[form](q, key, value, feature_map, feature_map.window, state,
                                      eps=feature_map.eps, **extra)
    else:
        phi_q = feature_map(q)
        phi_k = feature_map(key.unsqueeze(2)).squeeze(2)
        out, new = FORMS[form](phi_q, phi_k, value, state, eps=feature_map.eps, **extra)
    if t2r_state is not None:
        t2r_state.set_layer(layer, new)
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
