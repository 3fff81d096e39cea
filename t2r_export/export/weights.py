"""Read a T2R model's weights into one architecture-neutral description the graph emitter walks.

One small extraction function per architecture family, registered by model_type (the adapter
names). Layouts are chosen for the graph, so the emitter needs no transposes:
- every projection is stored as x @ W ([in, out]);
- q, rotate_half(q), k, rotate_half(k), v come out of ONE fused matmul: rotate_half is linear,
  so it is folded into copies of the q/k columns (RoPE then costs two Mul and one Add);
- partial rotary (GPT-NeoX) uses zero frequencies on the pass-through dims (cos 1, sin 0);
- the query scale d**-0.5 is folded into the query feature map's weight (t2r).
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
    kind: str                   # "t2r" | "elu" | "rfa"
    q_scale: float              # applied to queries before phi (folded into q_weight for t2r)
    q_weight: np.ndarray | None = None   # t2r: [H_kv, d, K] (already scaled); rfa: omega^T [H_kv, d, m]
    k_weight: np.ndarray | None = None
    bias: np.ndarray | None = None       # t2r: [H_kv, 1, K]


@dataclass
class LayerWeights:
    norm1: Norm
    norm2: Norm
    qkv_weight: np.ndarray                 # [D, N]: q | q_rot | k | k_rot | v  (no *_rot without RoPE)
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
    layers: list[LayerWeights] = field(default_factory=list)
    final_norm: Norm | None = None
    lm_head: np.ndarray | None = None      # [D, V]
    lm_head_bias: np.ndarray | None = None

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


def _rotated(w: np.ndarray, b: np.ndarray | None, heads: int, rot: np.ndarray):
    """Columns of x @ W (heads·d wide) with rotate_half folded in per head."""
    d = rot.shape[0]
    wr = (w.reshape(w.shape[0], heads, d) @ rot).reshape(w.shape)
    br = None if b is None else (b.reshape(heads, d) @ rot).reshape(-1)
    return wr, br


def _fuse_qkv(q, k, v, heads, kv_heads, rot):
    """Fuse (W, b) pairs into one [D, N] matmul; with RoPE add the rotate_half copies."""
    parts = [q, _rotated(*q, heads, rot), k, _rotated(*k, kv_heads, rot), v] if rot is not None else [q, k, v]
    weight = np.concatenate([p[0] for p in parts], axis=1)
    if all(p[1] is None for p in parts):
        return weight, None
    bias = np.concatenate([p[1] if p[1] is not None else np.zeros(p[0].shape[1], np.float32) for p in parts])
    return weight, bias


def _feature_map(attn, scaling: float) -> FeatureMapWeights:
    fm = getattr(attn, FEATURE_MAP_ATTR)
    if fm.kind == "t2r":
        w = _np(fm.weight).transpose(0, 2, 1).copy()          # [H_kv, d, K]
        bias = _np(fm.bias)[:, None, :]                       # [H_kv, 1, K]
        return FeatureMapWeights("t2r", scaling, q_weight=w * scaling, k_weight=w, bias=bias)
    if fm.kind == "rfa":
        omega_t = _np(fm.omega).transpose(0, 2, 1).copy()     # [H_kv, d, m]
        return FeatureMapWeights("rfa", scaling, q_weight=omega_t, k_weight=omega_t)
    return FeatureMapWeights("elu", scaling)


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
    inv, scale = (rope[0], rope[1]) if rope is not None else (None, 1.0)
    return DecoderWeights(get_adapter(model.config.model_type).model_type, heads, kv_heads, head_dim,
                          fm.feature_dim, float(fm.settings.eps), _np(embed), _np(pos_embed), inv, scale)


def extract_llama(model) -> DecoderWeights:
    """llama, mistral, qwen2: RMSNorm, RoPE, GQA, SwiGLU; optional q/k/v (and o) biases."""
    cfg = model.config
    heads, kv_heads, head_dim = attention_dims(cfg)
    rope = _rope(model.model.rotary_emb, head_dim)
    dec = _base(model, model.model.embed_tokens.weight, None, rope)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        qkv_w, qkv_b = _fuse_qkv(_linear(a.q_proj), _linear(a.k_proj), _linear(a.v_proj), heads, kv_heads, rope[2])
        gate, up = _linear(m.gate_proj), _linear(m.up_proj)
        mlp_b = None if gate[1] is None else np.concatenate([gate[1], up[1]])
        dec.layers.append(LayerWeights(
            _norm(layer.input_layernorm, "rms"), _norm(layer.post_attention_layernorm, "rms"),
            qkv_w, qkv_b, *_linear(a.o_proj), "gated", np.concatenate([gate[0], up[0]], axis=1), mlp_b,
            *_linear(m.down_proj), cfg.hidden_act, False, _feature_map(a, a.scaling)))
    dec.final_norm = _norm(model.model.norm, "rms")
    dec.lm_head, dec.lm_head_bias = _lm_head(model)
    return dec


def extract_gpt2(model) -> DecoderWeights:
    """GPT-2: LayerNorm, learned positions, Conv1D (already x @ W) fused c_attn, GELU MLP."""
    cfg = model.config
    t = model.transformer
    dec = _base(model, t.wte.weight, t.wpe.weight, None)
    for block in t.h:
        a, m = block.attn, block.mlp
        dec.layers.append(LayerWeights(
            _norm(block.ln_1, "layer"), _norm(block.ln_2, "layer"),
            _np(a.c_attn.weight), _np(a.c_attn.bias), _np(a.c_proj.weight), _np(a.c_proj.bias),
            "plain", _np(m.c_fc.weight), _np(m.c_fc.bias), _np(m.c_proj.weight), _np(m.c_proj.bias),
            cfg.activation_function, False, _feature_map(a, a.scaling)))
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
        qkv_w, qkv_b = _fuse_qkv(*split, heads, heads, rope[2])
        dec.layers.append(LayerWeights(
            _norm(layer.input_layernorm, "layer"), _norm(layer.post_attention_layernorm, "layer"),
            qkv_w, qkv_b, *_linear(a.dense), "plain", *_linear(m.dense_h_to_4h), *_linear(m.dense_4h_to_h),
            cfg.hidden_act, bool(cfg.use_parallel_residual), _feature_map(a, a.scaling)))
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
    assert len(decoder_layers(model, get_adapter(arch))) > 0
    return EXTRACTORS[arch](model)
