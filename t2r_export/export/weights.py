"""Read a T2R model's weights into one architecture-neutral description the graph emitter walks.

What to read and where it lives comes from the architecture's adapter (``t2r_export/architectures.py``,
``ArchitectureAdapter.weights``); this module knows layouts, not architectures. Layouts are
chosen for the graph, so the emitter needs no transposes:
- every projection is stored as x @ W ([in, out]);
- q, k and v come out of ONE fused matmul whose columns are ordered per KV head (its G query
  heads, then its key head), then every value head: the step reshapes q|k to
  [B, T, H_kv, G+1, d] and rotates and feature-maps queries and keys together, in one op each;
- RoPE is x*cos + (x @ R)*sin with one shared [d, d] rotate_half matrix R; partial rotary
  (GPT-NeoX) uses zero frequencies on the pass-through dims (cos 1, sin 0);
- the query scale d**-0.5 is folded into the query columns (weight and bias): every feature map
  (and softmax) sees already-scaled queries, so queries and keys share one feature map weight;
- a tied lm head is not copied: ``tied_lm_head`` tells the emitter to read the embedding.

The big matrices are ``LazyWeight``s: a shape and a recipe, computed from the torch model only
when a graph writes them, so an export streams weights into its weight file one at a time instead
of holding a numpy copy of the whole model beside the torch one (docs/sizes.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..architectures import ArchitectureAdapter, WeightLayout, attention_dims, get_adapter, resolve
from ..models.attention import FEATURE_MAP_ATTR
from ..models.swap import decoder_layers


class LazyWeight:
    """An fp32 weight known by its shape, computed by ``load()`` when it is needed and not kept."""

    dtype = np.dtype(np.float32)

    def __init__(self, shape, load: Callable[[], np.ndarray]):
        self.shape = tuple(int(n) for n in shape)
        self._load = load

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numpy(self) -> np.ndarray:
        arr = np.asarray(self._load(), dtype=np.float32)
        if arr.shape != self.shape:
            raise ValueError(f"lazy weight computed shape {arr.shape}, declared {self.shape}")
        return arr

    def __array__(self, dtype=None, copy=None):
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)


def materialize(arr) -> np.ndarray:
    return arr.numpy() if isinstance(arr, LazyWeight) else np.asarray(arr)


@dataclass
class Norm:
    kind: str                   # "rms" | "layer"
    weight: np.ndarray          # [D]
    bias: np.ndarray | None
    eps: float


@dataclass
class FeatureMapWeights:
    kind: str                            # "t2r" | "hedgehog" | "elu" | "rfa" (| "softmax" for the bench's peer graph)
    weight: np.ndarray | None = None     # t2r/hedgehog: [H_kv, d, k]; rfa: omega^T [H_kv, d, m]; the same for q and k
    bias: np.ndarray | None = None       # t2r/hedgehog: [H_kv, 1, k]
    log_decay: np.ndarray | None = None  # window hybrid with a decay: log gamma [H_kv] (fp32), else None


@dataclass
class LayerWeights:
    norm1: Norm
    norm2: Norm
    qkv_weight: LazyWeight | np.ndarray    # [D, (H + 2 H_kv) d]: per KV head (G scaled q heads, k), then v
    qkv_bias: np.ndarray | None
    o_weight: LazyWeight | np.ndarray      # [H*d, D]
    o_bias: np.ndarray | None
    mlp_kind: str                          # "gated" (act(x W_g) * x W_u) | "plain" (act(x W_u + b))
    mlp_in: LazyWeight | np.ndarray        # gated: [D, 2I] (gate | up); plain: [D, I]
    mlp_in_bias: np.ndarray | None
    mlp_out: LazyWeight | np.ndarray       # [I, D]
    mlp_out_bias: np.ndarray | None
    act: str                               # "silu" | "gelu" | "gelu_new" | "relu"
    parallel_residual: bool
    feature_map: FeatureMapWeights


@dataclass
class DecoderWeights:
    architecture: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    feature_dim: int
    eps: float                             # linear-attention denominator clamp
    embed: LazyWeight | np.ndarray         # [V, D]
    pos_embed: LazyWeight | np.ndarray | None   # [P, D] (learned positions) or None
    inv_freq: np.ndarray | None            # [d] full-width RoPE frequencies, zeros on pass-through dims
    rope_scale: float
    rotate_half: np.ndarray | None         # [d, d]: x @ R == HF's rotate_half on the rotary dims, 0 elsewhere
    layers: list[LayerWeights] = field(default_factory=list)
    final_norm: Norm | None = None
    lm_head: LazyWeight | np.ndarray | None = None   # [D, V]; for a tied head, the embedding transposed
    lm_head_bias: np.ndarray | None = None
    tied_lm_head: bool = False             # the lm head is the embedding: graphs store it once
    # sliding-window hybrid: the last W keys/values per layer are part of the state (0 = off)
    window: int = 0

    @property
    def vocab_size(self) -> int:
        return self.lm_head.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.embed.shape[1]

    @property
    def rope(self) -> bool:
        return self.inv_freq is not None


def _np(t) -> np.ndarray | None:
    """fp32 numpy of a tensor; shares memory with an fp32 CPU tensor (callers never write into it)."""
    return None if t is None else t.detach().to(torch.float32).cpu().numpy()


def _in_out(module, conv1d: bool) -> LazyWeight:
    """A projection's weight as x @ W ([in, out]): nn.Linear stores [out, in], GPT-2's Conv1D [in, out]."""
    w = module.weight
    shape = tuple(w.shape) if conv1d else tuple(w.shape)[::-1]
    return LazyWeight(shape, (lambda: _np(w)) if conv1d else (lambda: np.ascontiguousarray(_np(w).T)))


def _bias(module) -> np.ndarray | None:
    return _np(getattr(module, "bias", None))


def _rotate_half_matrix(head_dim: int, rotary_dim: int) -> np.ndarray:
    """R with (x @ R) == HF's rotate_half on the first rotary_dim dims, 0 elsewhere."""
    r = np.zeros((head_dim, head_dim), dtype=np.float32)
    half = rotary_dim // 2
    for i in range(half):
        r[i + half, i] = -1.0     # out_i = -x_{i+half}
        r[i, i + half] = 1.0      # out_{i+half} = x_i
    return r


def _split_qkv(cols: np.ndarray, layout: str, heads: int, d: int) -> list[np.ndarray]:
    """A fused projection's [rows, 3 H d] columns -> [q, k, v] columns (no GQA in fused layouts)."""
    if layout == "blocks":
        return np.split(cols, 3, axis=1)
    per_head = cols.reshape(cols.shape[0], heads, 3, d)        # GPT-NeoX rows ordered [H, 3, d]
    return [per_head[:, :, i].reshape(cols.shape[0], -1) for i in range(3)]


def _fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, kv_heads: int, q_scale: float) -> np.ndarray:
    """[rows, *] q, k, v columns -> [rows, (H + 2 H_kv) d]: per KV head its G query heads (scaled by
    ``q_scale``) then its key head, then all value heads. Query head j reads KV head j // G (HF's repeat_kv)."""
    d = k.shape[1] // kv_heads
    groups = heads // kv_heads
    parts = []
    for h in range(kv_heads):
        parts += [q[:, h * groups * d:(h + 1) * groups * d] * np.float32(q_scale), k[:, h * d:(h + 1) * d]]
    parts.append(v)
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def _qkv(attn, lay: WeightLayout, heads: int, kv_heads: int, d: int):
    """(fused weight as a LazyWeight, fused bias or None)."""
    mods = [getattr(attn, name) for name in lay.qkv]
    width = (heads + 2 * kv_heads) * d

    def columns(tensors: list[np.ndarray]) -> np.ndarray:
        parts = tensors if lay.qkv_layout == "separate" else _split_qkv(tensors[0], lay.qkv_layout, heads, d)
        return _fuse_qkv(*parts, heads, kv_heads, attn.scaling)

    weights = [_in_out(m, lay.conv1d) for m in mods]
    weight = LazyWeight((weights[0].shape[0], width), lambda: columns([w.numpy() for w in weights]))
    biases = [_bias(m) for m in mods]
    if all(b is None for b in biases):
        return weight, None
    sizes = [w.shape[1] for w in weights]
    rows = [(np.zeros(n, np.float32) if b is None else b)[None] for b, n in zip(biases, sizes)]
    return weight, columns(rows)[0]


def _mlp_in(mlp, lay: WeightLayout):
    mods = [getattr(mlp, name) for name in lay.mlp_in]
    weights = [_in_out(m, lay.conv1d) for m in mods]
    biases = [_bias(m) for m in mods]
    bias = None if all(b is None for b in biases) else np.concatenate(
        [np.zeros(w.shape[1], np.float32) if b is None else b for w, b in zip(weights, biases)])
    if len(weights) == 1:
        return weights[0], bias
    shape = (weights[0].shape[0], sum(w.shape[1] for w in weights))
    return LazyWeight(shape, lambda: np.concatenate([w.numpy() for w in weights], axis=1)), bias


def _feature_map(attn) -> FeatureMapWeights:
    fm = getattr(attn, FEATURE_MAP_ATTR)
    log_decay = fm.log_decay()
    decay = None if log_decay is None else _np(log_decay).astype(np.float32)
    if fm.kind in ("t2r", "hedgehog"):
        w = _np(fm.weight).transpose(0, 2, 1).copy()          # [H_kv, d, K]
        return FeatureMapWeights(fm.kind, w, _np(fm.bias)[:, None, :].copy(), decay)   # bias [H_kv, 1, K]
    if fm.kind == "rfa":
        return FeatureMapWeights("rfa", _np(fm.omega).transpose(0, 2, 1).copy(), log_decay=decay)   # [H_kv, d, m]
    return FeatureMapWeights("elu", log_decay=decay)


def _rope(rotary_emb, head_dim: int):
    inv = _np(rotary_emb.inv_freq)                            # [rotary_dim / 2]
    if getattr(rotary_emb, "rope_type", "default") == "dynamic":
        raise ValueError("dynamic RoPE scaling changes frequencies with length; not exportable to a fixed step graph")
    rotary_dim = 2 * inv.shape[0]
    full = np.zeros(head_dim, dtype=np.float32)
    full[:rotary_dim] = np.concatenate([inv, inv])
    scale = float(getattr(rotary_emb, "attention_scaling", 1.0))
    return full, scale, _rotate_half_matrix(head_dim, rotary_dim)


def _norm(module, kind: str) -> Norm:
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-5)
    bias = _bias(module)
    return Norm(kind, _np(module.weight).copy(), None if bias is None else bias.copy(), float(eps))


def _embedding(module) -> LazyWeight:
    return LazyWeight(module.weight.shape, lambda: _np(module.weight))


def _lm_head(model, embed_module):
    """(lm head [D, V] as a LazyWeight, bias, tied): tied when it is the embedding's own tensor."""
    head = model.get_output_embeddings()
    bias = _bias(head)
    tied = head.weight is embed_module.weight or head.weight.data_ptr() == embed_module.weight.data_ptr()
    weight = _in_out(head, conv1d=False)
    return weight, (None if bias is None else bias.copy()), bool(tied and bias is None)


def _layer(layer, adapter: ArchitectureAdapter, cfg, dims) -> LayerWeights:
    lay = adapter.weights
    heads, kv_heads, head_dim = dims
    attn, mlp = getattr(layer, adapter.attention), getattr(layer, lay.mlp)
    qkv_weight, qkv_bias = _qkv(attn, lay, heads, kv_heads, head_dim)
    mlp_in, mlp_in_bias = _mlp_in(mlp, lay)
    o, down = getattr(attn, lay.o), getattr(mlp, lay.mlp_out)
    parallel = bool(getattr(cfg, lay.parallel_residual_field)) if lay.parallel_residual_field else False
    return LayerWeights(
        norm1=_norm(getattr(layer, lay.norm1), lay.norm), norm2=_norm(getattr(layer, lay.norm2), lay.norm),
        qkv_weight=qkv_weight, qkv_bias=qkv_bias, o_weight=_in_out(o, lay.conv1d), o_bias=_bias(o),
        mlp_kind="gated" if lay.gated else "plain", mlp_in=mlp_in, mlp_in_bias=mlp_in_bias,
        mlp_out=_in_out(down, lay.conv1d), mlp_out_bias=_bias(down), act=getattr(cfg, lay.act_field),
        parallel_residual=parallel, feature_map=_feature_map(attn))


def extract_decoder(model) -> DecoderWeights:
    """The decoder description of a T2R model, read where its adapter says; big matrices stay lazy."""
    cfg = model.config
    adapter = get_adapter(cfg.model_type)
    lay = adapter.weights
    dims = attention_dims(cfg)
    layers = decoder_layers(model, adapter)
    if len(layers) == 0:
        raise ValueError(f"{adapter.model_class} has no decoder layers at {adapter.layers!r}")
    fm = getattr(getattr(layers[0], adapter.attention), FEATURE_MAP_ATTR)
    inv, scale, rot = _rope(resolve(model, lay.rotary_emb), dims[2]) if lay.rotary_emb else (None, 1.0, None)
    embed_module = resolve(model, lay.embed)
    lm_head, lm_head_bias, tied = _lm_head(model, embed_module)
    return DecoderWeights(
        architecture=adapter.model_type, num_heads=dims[0], num_kv_heads=dims[1], head_dim=dims[2],
        feature_dim=fm.feature_dim, eps=float(fm.eps), embed=_embedding(embed_module),
        pos_embed=_embedding(resolve(model, lay.pos_embed)) if lay.pos_embed else None,
        inv_freq=inv, rope_scale=scale, rotate_half=rot,
        layers=[_layer(layer, adapter, cfg, dims) for layer in layers],
        final_norm=_norm(resolve(model, lay.final_norm), lay.norm),
        lm_head=lm_head, lm_head_bias=lm_head_bias, tied_lm_head=tied, window=fm.window)
