"""Read a T2R model's weights into one architecture-neutral description the graph emitter walks.

One small extraction function per architecture family, registered by model_type (the adapter
names). Layouts are chosen for the graph, so the emitter needs no transposes:
- every projection is stored as x @ W ([in, out]);
- q, k and v come out of ONE fused matmul whose columns are ordered per KV head (its G query
  heads, then its key head), then every value head: the step reshapes q|k to
  [B, T, H_kv, G+1, d] and rotates and feature-maps queries and keys together, in one op each;
- RoPE is x*cos + (x @ R)*sin with one shared [d, d] rotate_half matrix R; partial rotary
  (GPT-NeoX) uses zero frequencies on the pass-through dims (cos 1, sin 0);
- the query scale d**-0.5 is folded into the query columns (weight and bias): every feature map
  (and softmax) sees already-scaled queries, so queries and keys share one feature map weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..models.adapters import attention_dims, get_adapter
from ..models.attention import FEATURE_MAP_ATTR
from ..models.swap import attention_modules, decoder_layers


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


@dataclass
class LayerWeights:
    norm1: Norm
    norm2: Norm
    qkv_weight: np.ndarray                 # [D, (H + 2 H_kv) d]: per KV head (G scaled q heads, k), then v
    qkv_bias: np.ndarray | None
    o_weight: np.ndarray                   # [H*d, D]
    o_bias: np.ndarray | None
    mlp_kind: str                          # "gated" (act(x W_g) * x W_u) | "plain" (act(x W_u + b))
    mlp_in: np.ndarray                     # gated: [D, 2I] (gate | up); plain: [D, I]
    mlp_in_bias: np.ndarray | None
    mlp_out: np.ndarray                    # [I, D]
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
    embed: np.ndarray                      # [V, D]
    pos_embed: np.ndarray | None           # [P, D] (learned positions) or None
    inv_freq: np.ndarray | None            # [d] full-width RoPE frequencies, zeros on pass-through dims
    rope_scale: float
    rotate_half: np.ndarray | None         # [d, d]: x @ R == HF's rotate_half on the rotary dims, 0 elsewhere
    layers: list[LayerWeights] = field(default_factory=list)
    final_norm: Norm | None = None
    lm_head: np.ndarray | None = None      # [D, V]
    lm_head_bias: np.ndarray | None = None
    # sliding-window hybrid: the last W keys/values per layer are part of the state (0 = off)
    window: int = 0

    @property
    def vocab_size(self) -> int:
        return self.lm_head.shape[1]

    @property
    def rope(self) -> bool:
        return self.inv_freq is not None


def _np(t) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float32).cpu().numpy().copy()


def _linear(module) -> tuple[np.ndarray, np.ndarray | None]:
    """nn.Linear -> (W [in, out], b)."""
    return _np(module.weight).T.copy(), _np(module.bias)


def _rotate_half_matrix(head_dim: int, rotary_dim: int) -> np.ndarray:
    """R with (x @ R) == HF's rotate_half on the first rotary_dim dims, 0 elsewhere."""
    r = np.zeros((head_dim, head_dim), dtype=np.float32)
    half = rotary_dim // 2
    for i in range(half):
        r[i + half, i] = -1.0     # out_i = -x_{i+half}
        r[i, i + half] = 1.0      # out_{i+half} = x_i
    return r


def _fuse_qkv(q, k, v, heads: int, kv_heads: int, q_scale: float):
    """Fuse (W, b) pairs into one [D, (H + 2 H_kv) d] matmul: per KV head its G query heads (scaled by
    ``q_scale``) then its key head, then all value heads. Query head j reads KV head j // G (HF's repeat_kv)."""
    d = k[0].shape[1] // kv_heads
    groups = heads // kv_heads
    q = (q[0] * np.float32(q_scale), None if q[1] is None else q[1] * np.float32(q_scale))

    def cols(pair, first: int, count: int):
        w, b = pair
        sl = slice(first * d, (first + count) * d)
        return w[:, sl], (np.zeros(count * d, np.float32) if b is None else b[sl])

    parts = []
    for h in range(kv_heads):
        parts += [cols(q, h * groups, groups), cols(k, h, 1)]
    parts.append(cols(v, 0, kv_heads))
    weight = np.ascontiguousarray(np.concatenate([w for w, _ in parts], axis=1))
    if all(p[1] is None for p in (q, k, v)):
        return weight, None
    return weight, np.concatenate([b for _, b in parts])


def _feature_map(attn) -> FeatureMapWeights:
    fm = getattr(attn, FEATURE_MAP_ATTR)
    if fm.kind in ("t2r", "hedgehog"):
        w = _np(fm.weight).transpose(0, 2, 1).copy()          # [H_kv, d, k]
        return FeatureMapWeights(fm.kind, w, _np(fm.bias)[:, None, :])   # bias [H_kv, 1, k]
    if fm.kind == "rfa":
        return FeatureMapWeights("rfa", _np(fm.omega).transpose(0, 2, 1).copy())   # [H_kv, d, m]
    return FeatureMapWeights("elu")


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
    return Norm(kind, _np(module.weight), _np(getattr(module, "bias", None)), float(eps))


def _lm_head(model):
    head = model.get_output_embeddings()
    return _np(head.weight).T.copy(), _np(getattr(head, "bias", None))


def _base(model, embed, pos_embed, rope) -> DecoderWeights:
    heads, kv_heads, head_dim = attention_dims(model.config)
    fm = getattr(attention_modules(model)[0], FEATURE_MAP_ATTR)
    inv, scale, rot = rope if rope is not None else (None, 1.0, None)
    return DecoderWeights(get_adapter(model.config.model_type).model_type, heads, kv_heads, head_dim,
                          fm.feature_dim, float(fm.eps), _np(embed), _np(pos_embed), inv, scale, rot,
                          window=fm.window)


def extract_llama(model) -> DecoderWeights:
    """llama, mistral, qwen2: RMSNorm, RoPE, GQA, SwiGLU; optional q/k/v (and o) biases."""
    cfg = model.config
    heads, kv_heads, head_dim = attention_dims(cfg)
    rope = _rope(model.model.rotary_emb, head_dim)
    dec = _base(model, model.model.embed_tokens.weight, None, rope)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        qkv_w, qkv_b = _fuse_qkv(_linear(a.q_proj), _linear(a.k_proj), _linear(a.v_proj), heads, kv_heads,
                                 a.scaling)
        gate, up = _linear(m.gate_proj), _linear(m.up_proj)
        mlp_b = None if gate[1] is None else np.concatenate([gate[1], up[1]])
        dec.layers.append(LayerWeights(
            _norm(layer.input_layernorm, "rms"), _norm(layer.post_attention_layernorm, "rms"),
            qkv_w, qkv_b, *_linear(a.o_proj), "gated", np.concatenate([gate[0], up[0]], axis=1), mlp_b,
            *_linear(m.down_proj), cfg.hidden_act, False, _feature_map(a)))
    dec.final_norm = _norm(model.model.norm, "rms")
    dec.lm_head, dec.lm_head_bias = _lm_head(model)
    return dec


def extract_gpt2(model) -> DecoderWeights:
    """GPT-2: LayerNorm, learned positions, Conv1D (already x @ W) fused c_attn, GELU MLP."""
    cfg = model.config
    t = model.transformer
    heads, _, head_dim = attention_dims(cfg)
    dec = _base(model, t.wte.weight, t.wpe.weight, None)
    for block in t.h:
        a, m = block.attn, block.mlp
        w, b = _np(a.c_attn.weight), _np(a.c_attn.bias)       # [D, 3D]: q | k | v
        width = heads * head_dim
        split = [(w[:, i * width:(i + 1) * width], None if b is None else b[i * width:(i + 1) * width])
                 for i in range(3)]
        dec.layers.append(LayerWeights(
            _norm(block.ln_1, "layer"), _norm(block.ln_2, "layer"),
            *_fuse_qkv(*split, heads, heads, a.scaling), _np(a.c_proj.weight), _np(a.c_proj.bias),
            "plain", _np(m.c_fc.weight), _np(m.c_fc.bias), _np(m.c_proj.weight), _np(m.c_proj.bias),
            cfg.activation_function, False, _feature_map(a)))
    dec.final_norm = _norm(t.ln_f, "layer")
    dec.lm_head, dec.lm_head_bias = _lm_head(model)
    return dec


def extract_gpt_neox(model) -> DecoderWeights:
    """GPT-NeoX: LayerNorm, partial rotary, per-head interleaved fused qkv, (parallel) residual."""
    cfg = model.config
    heads, _, head_dim = attention_dims(cfg)
    g = model.gpt_neox
    rope = _rope(g.rotary_emb, head_dim)
    dec = _base(model, g.embed_in.weight, None, rope)
    for layer in g.layers:
        a, m = layer.attention, layer.mlp
        w, b = _linear(a.query_key_value)                      # [D, H*3*d], rows of HF ordered [H, 3, d]
        w = w.reshape(w.shape[0], heads, 3, head_dim)
        b = b.reshape(heads, 3, head_dim) if b is not None else None
        split = [(w[:, :, i].reshape(w.shape[0], -1), None if b is None else b[:, i].reshape(-1)) for i in range(3)]
        qkv_w, qkv_b = _fuse_qkv(*split, heads, heads, a.scaling)
        dec.layers.append(LayerWeights(
            _norm(layer.input_layernorm, "layer"), _norm(layer.post_attention_layernorm, "layer"),
            qkv_w, qkv_b, *_linear(a.dense), "plain", *_linear(m.dense_h_to_4h), *_linear(m.dense_4h_to_h),
            cfg.hidden_act, bool(cfg.use_parallel_residual), _feature_map(a)))
    dec.final_norm = _norm(g.final_layer_norm, "layer")
    dec.lm_head, dec.lm_head_bias = _lm_head(model)
    return dec


EXTRACTORS = {
    "gpt2": extract_gpt2,
    "gpt_neox": extract_gpt_neox,
    "llama": extract_llama,
    "mistral": extract_llama,
    "qwen2": extract_llama,
}


def extract_decoder(model) -> DecoderWeights:
    arch = get_adapter(model.config.model_type).model_type
    if arch not in EXTRACTORS:
        raise ValueError(f"no ONNX weight extractor for {arch!r}; have: {', '.join(sorted(EXTRACTORS))}")
    if not len(decoder_layers(model, get_adapter(arch))):
        raise ValueError(f"the {arch} model has no decoder layers; nothing to export")
    return EXTRACTORS[arch](model)
