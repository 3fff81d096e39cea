"""The plain prefill graph: the attention core in chunk-parallel form (the math: docs/design.md#prefill).

T tokens are padded to whole chunks of C (zero features add nothing to any sum). Within a chunk,
each query reads the chunk's earlier keys through a causally masked C×C product; everything before
the chunk reaches it through the running state at the chunk's start, an exclusive CumSum over the
chunks' own sums [T/C, K, Dv+1] instead of one over [T, K, Dv]. z rides along as a last column of v
set to 1, so one product gives numerator and denominator. The sums run in the fp32 island, like the
step's state core.

``PrefillEmitter`` (models without a sliding window) moves each layer's fused q|k|v output into the
chunk layout [B, N, H_kv, G+2, C, d] once, with one Pad, one Reshape and one Transpose, so RoPE,
the feature map and the core work there without a Pad or Transpose of their own; its RoPE swaps
the rotated halves with a Split and a Concat (a Gather of the head dims runs element by element).
The general emitter (``graph.py``) keeps its [B, T, ...] layout and reaches the same core through
``chunked_prefill``.
"""

from __future__ import annotations

import numpy as np

from .. import contract
from .chunking import CHUNK, first_rows, ones_row, pad_rows, pad_to_chunks
from .graph import DecoderEmitter, regroup, rotate_half_blocks
from .weights import LayerWeights


def _causal(e, chunk: int) -> str:
    """[C, C]: 1 where query c may read key c' (c' <= c), made once per graph from two small ranges
    (ONNX Runtime folds it into a constant): step(x) = relu(x) - relu(x - 1) on x = c - c' + 1."""
    if getattr(e, "_causal_mask", None) is None:
        g = e.g
        c = np.arange(chunk, dtype=np.float32)
        x = g.op("Sub", g.const(c[:, None] + 1.0), g.const(c[None, :]))
        mask = g.op("Sub", g.op("Relu", x), g.op("Relu", g.op("Sub", x, g.const(1.0, np.float32))))
        e._causal_mask = mask if e.state_dtype == np.float32 else g.cast(mask, e.state_dtype)
    return e._causal_mask


def chunk_core(e, q: str, key: str, val: str, i: int, chunk: int) -> str:
    """q [B, N, H_kv, G, C, K], key [B, N, H_kv, 1, C, K] (zero on padded rows), val [B, N, H_kv, 1, C, d],
    all in the state dtype -> [B, N, H_kv, G, C, d]; writes present_state.{i}.s and .z."""
    g, hkv, k, d = e.g, e.hkv, e.k, e.d
    dt = e.state_dtype
    i64 = lambda values: g.const(values, np.int64)  # noqa: E731
    s_in, z_in = contract.past_name(i, "s"), contract.past_name(i, "z")
    # [B, N, H_kv, 1, C, d+1]: the constant-1 channel carries z
    v1 = g.op("Pad", val, i64([0] * 11 + [1]), g.const(1.0, dt))
    key_t = g.op("Transpose", key, perm=[0, 1, 2, 3, 5, 4])                        # [B, N, H_kv, 1, K, C]
    scores = g.op("Mul", g.op("MatMul", q, key_t), _causal(e, chunk))               # [B, N, H_kv, G, C, C]
    own = g.op("MatMul", key_t, v1)                                                 # [B, N, H_kv, 1, K, d+1]
    state0 = g.op("Concat", s_in, g.unsqueeze(z_in, [-1]), axis=-1)                # [B, H_kv, K, d+1]
    before = g.op("Add", g.op("CumSum", own, i64(1), exclusive=1), g.unsqueeze(state0, [1, 3]))
    out = g.op("Add", g.op("MatMul", scores, v1), g.op("MatMul", q, before))        # [B, N, H_kv, G, C, d+1]
    final = g.op("Add", state0, g.op("ReduceSum", own, i64([1, 3]), keepdims=0))
    z_column = g._name("z_column")
    g.op("Split", final, i64([d, 1]), axis=-1, outputs=[contract.present_name(i, "s"), z_column])
    g.op("Reshape", z_column, i64([-1, hkv, k]), outputs=[contract.present_name(i, "z")])
    num, den = g.op("Split", out, i64([d, 1]), axis=-1, outputs=2)
    return g.op("Div", num, g.op("Max", den, g.const(e.dec.eps, dt)))


def unchunk(e, out: str) -> str:
    """[B, N, H_kv, G, C, d] -> [B, T, H·d] in the compute dtype: the first T of the N·C rows."""
    g = e.g
    out = g.op("Transpose", out, perm=[0, 1, 4, 2, 3, 5])                           # [B, N, C, H_kv, G, d]
    out = g.reshape(e.to_low(out), [0, -1, e.dec.num_heads * e.d])                 # [B, N·C, H·d]
    # the first T rows; a Gather, since TensorRT's parser wants a Slice's ends as constants
    return g.op("Gather", out, first_rows(e), axis=1)


def chunked_prefill(e, phi_q: str, phi_k: str, v: str, i: int, chunk: int = CHUNK) -> str:
    """The general emitter's layout: phi_q [B, T, H_kv, G, K], phi_k [B, T, H_kv, 1, K], v [B, T, H_kv, 1, d]
    -> [B, T, H·d]; writes present_state.{i}.s and .z."""
    g, hkv, G, k, d = e.g, e.hkv, e.groups, e.k, e.d
    pad = pad_to_chunks(e, chunk)

    def chunks(x: str, rows: int, width: int) -> str:
        """[B, T, H_kv, rows, width] -> [B, N, H_kv, rows, C, width], T padded with zeros to N·C."""
        x = g.op("Pad", e.to_state(x), pad, g.const(0.0, e.state_dtype))
        return g.op("Transpose", g.reshape(x, [0, -1, chunk, hkv, rows, width]), perm=[0, 1, 3, 4, 2, 5])

    out = chunk_core(e, chunks(phi_q, G, k), chunks(phi_k, 1, k), chunks(v, 1, d), i, chunk)
    return unchunk(e, out)


class PrefillEmitter(DecoderEmitter):
    """The plain prefill graph for models without a sliding window (``build_graph`` picks it)."""

    def __init__(self, dec, precision: str = "fp32", store=None, chunk: int = CHUNK):
        if dec.window:
            raise ValueError("the chunk-layout prefill has no sliding-window part; use DecoderEmitter")
        super().__init__(dec, contract.PREFILL, precision, store)
        self.chunk = chunk

    def rope_tables(self):
        """cos and sin [B, N, 1, 1, C, d] in the chunk layout (padded positions rotate too; their
        rows are dropped), and how rotate_half moves blocks of head dims (``rotate_half_blocks``)."""
        g, dec = self.g, self.dec
        sizes, order, sign = rotate_half_blocks(np.asarray(dec.rotate_half))
        # angles reach 1e4+ at long positions: the tables are made in fp32 (docs/design.md#precision-plan)
        with g.scope("rope", fp32_island=True):
            pos = g.op("Pad", g.cast("position_ids", np.float32), pad_rows(self, self.chunk, 2),
                       g.const(0.0, np.float32))
            pos = g.reshape(pos, [0, -1, 1, 1, self.chunk, 1])                               # [B, N, 1, 1, C, 1]
            angle = g.op("Mul", pos, g.weight("rope.inv_freq", dec.inv_freq, fp32=True))
            scale = np.float32(dec.rope_scale)
            # one Mul gives the sine its rotate_half signs and the rope scale together
            sin = g.op("Mul", g.op("Sin", angle), g.weight("rope.sin_sign", sign * scale, fp32=True))
            cos = g.op("Cos", angle)
            if scale != 1.0:
                cos = g.op("Mul", cos, g.const(scale, np.float32))
            cos, sin = self.to_low(cos), self.to_low(sin)
        return cos, sin, (g.const(sizes, np.int64), order)

    def _valid_rows(self) -> str:
        """[1, N, 1, 1, C, 1]: 1 on the T real rows, 0 on the padding, in the state dtype (made once per graph)."""
        if getattr(self, "_valid", None) is None:
            g = self.g
            with g.scope("rows"):
                padded = g.op("Pad", ones_row(self), pad_rows(self, self.chunk, 2), g.const(0.0, np.float32))
                valid = g.reshape(padded, [1, -1, 1, 1, self.chunk, 1])
                self._valid = valid if self.state_dtype == np.float32 else g.cast(valid, self.state_dtype)
        return self._valid

    def attention(self, x: str, layer: LayerWeights, i: int, rope) -> str:
        g, hkv, G, d, c = self.g, self.hkv, self.groups, self.d, self.chunk
        p = f"layers.{i}.attn"
        qkv = self.linear(x, regroup(layer.qkv_weight, self.order), regroup(layer.qkv_bias, self.order), p + ".qkv")
        # [B, T, ...] -> [B, N, H_kv, G+2, C, d]: per KV head its G queries, its key, its value, by chunk
        with g.scope(f"layers.{i}.chunks"):
            qkv = g.op("Pad", qkv, pad_rows(self, self.chunk, 3), g.const(0.0, self.low))
            qkv = g.op("Transpose", g.reshape(qkv, [0, -1, c, hkv, G + 2, d]), perm=[0, 1, 3, 4, 2, 5])
            qk, v = g.op("Split", qkv, g.const([G + 1, 1], np.int64), axis=3, outputs=2)
        if rope:
            with g.scope(f"layers.{i}.rope"):
                qk = self.rotate(qk, rope)
        with g.scope(f"layers.{i}.phi"):
            # [B, N, H_kv, (G+1)·C, d]: one [(G+1)·C, d] x [d, K] product per chunk and KV head
            phi = self.feature_map(g.reshape(qk, [0, 0, hkv, -1, d]), layer.feature_map, f"layers.{i}.phi")
            phi = g.reshape(phi, [0, 0, hkv, G + 1, c, -1])
            phi_q, phi_k = g.op("Split", phi, g.const([G, 1], np.int64), axis=3, outputs=2)
        # the running sums, phi(q)·z and the division stay fp32 in every plan (docs/design.md#precision-plan)
        with g.scope(f"layers.{i}.state", fp32_island=True):
            # padded rows have features too (phi(0) need not be 0): they must not reach the sums
            key = g.op("Mul", self.to_state(phi_k), self._valid_rows())
            out = chunk_core(self, self.to_state(phi_q), key, self.to_state(v), i, c)
            out = unchunk(self, out)
        return self.linear(out, layer.o_weight, layer.o_bias, p + ".o")
