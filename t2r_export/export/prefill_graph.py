"""The plain prefill graph's attention core in chunk-parallel form (the math: docs/design.md#prefill).

T tokens are padded to whole chunks of C (zero features and values add nothing to any sum).
Within a chunk, each query reads the chunk's earlier keys through a causally masked C×C product;
everything before the chunk reaches it through the running state at the chunk's start, an
exclusive CumSum over the chunks' own sums [T/C, K, Dv+1] instead of one over [T, K, Dv]. z rides
along as a last column of v set to 1, so one product gives numerator and denominator. Everything
here runs in the fp32 island, like the step's state core.
"""

from __future__ import annotations

import numpy as np

from .. import contract

CHUNK = 64


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


def chunked_prefill(e, phi_q: str, phi_k: str, v: str, i: int, chunk: int = CHUNK) -> str:
    """phi_q [B, T, H_kv, G, K], phi_k [B, T, H_kv, 1, K], v [B, T, H_kv, 1, d] -> [B, T, H·d];
    writes present_state.{i}.s and .z."""
    g, hkv, G, k, d = e.g, e.hkv, e.groups, e.k, e.d
    dt = e.state_dtype
    i64 = lambda values: g.const(values, np.int64)  # noqa: E731
    s_in, z_in = contract.past_name(i, "s"), contract.past_name(i, "z")
    pad = pad_to_chunks(e, chunk)
    # [B, T, H_kv, 1, d+1]: the constant-1 channel carries z
    v1 = g.op("Pad", e.to_state(v), i64([0, 0, 0, 0, 0, 0, 0, 0, 0, 1]), g.const(1.0, dt))

    def chunks(x: str, rows: int, width: int) -> str:
        """[B, T, H_kv, rows, width] -> [B, N, H_kv, rows, C, width], T padded with zeros to N·C."""
        x = g.op("Pad", x, pad, g.const(0.0, dt))
        return g.op("Transpose", g.reshape(x, [0, -1, chunk, hkv, rows, width]), perm=[0, 1, 3, 4, 2, 5])

    q = chunks(e.to_state(phi_q), G, k)                              # [B, N, H_kv, G, C, K]
    key_t = g.op("Transpose", chunks(e.to_state(phi_k), 1, k), perm=[0, 1, 2, 3, 5, 4])  # [B, N, H_kv, 1, K, C]
    val = chunks(v1, 1, d + 1)                                       # [B, N, H_kv, 1, C, d+1]
    scores = g.op("Mul", g.op("MatMul", q, key_t), _causal(e, chunk))                 # [B, N, H_kv, G, C, C]
    own = g.op("MatMul", key_t, val)                                 # [B, N, H_kv, 1, K, d+1]
    state0 = g.op("Concat", s_in, g.unsqueeze(z_in, [-1]), axis=-1)  # [B, H_kv, K, d+1]
    before = g.op("Add", g.op("CumSum", own, i64(1), exclusive=1), g.unsqueeze(state0, [1, 3]))
    out = g.op("Add", g.op("MatMul", scores, val), g.op("MatMul", q, before))         # [B, N, H_kv, G, C, d+1]
    final = g.op("Add", state0, g.op("ReduceSum", own, i64([1, 3]), keepdims=0))
    z_column = g._name("z_column")
    g.op("Split", final, i64([d, 1]), axis=-1, outputs=[contract.present_name(i, "s"), z_column])
    g.op("Reshape", z_column, i64([-1, hkv, k]), outputs=[contract.present_name(i, "z")])
    num, den = g.op("Split", out, i64([d, 1]), axis=-1, outputs=2)
    out = g.op("Div", num, g.op("Max", den, g.const(e.dec.eps, dt)))                  # [B, N, H_kv, G, C, d]
    out = g.op("Transpose", out, perm=[0, 1, 4, 2, 3, 5])                              # [B, N, C, H_kv, G, d]
    out = g.reshape(e.to_low(out), [0, -1, e.dec.num_heads * d])                      # [B, N·C, H·d]
    # the first T rows; a Gather, since TensorRT's parser wants a Slice's ends as constants
    return g.op("Gather", out, first_rows(e), axis=1)


def first_rows(e) -> str:
    """0..T-1 as int64 [T], counted in fp32 from position_ids' shape (made once per graph)."""
    if getattr(e, "_first_rows", None) is None:
        g = e.g
        row = g.op("Slice", g.cast("position_ids", np.float32), g.const([0], np.int64), g.const([1], np.int64),
                   g.const([0], np.int64))                                                 # [1, T]
        ones = g.op("Add", g.op("Mul", row, g.const(0.0, np.float32)), g.const(1.0, np.float32))
        count = g.op("Add", g.op("CumSum", ones, g.const(1, np.int64)), g.const(-1.0, np.float32))
        e._first_rows = g.reshape(g.cast(count, np.int64), [-1])
    return e._first_rows


def _sequence_length(e) -> str:
    """T as a 1-D int64 tensor, from input_ids (made once per graph)."""
    if getattr(e, "_sequence_length", None) is None:
        e._sequence_length = e.g.op("Shape", "input_ids", start=1, end=2)
    return e._sequence_length


def pad_to_chunks(e, chunk: int) -> str:
    """Pads for [B, T, ...] 5-D tensors: (C - T mod C) mod C zeros at the end of T (made once per graph)."""
    if getattr(e, "_chunk_pads", None) is None:
        g = e.g
        t = _sequence_length(e)
        c = g.const([chunk], np.int64)
        extra = g.op("Mod", g.op("Sub", c, g.op("Mod", t, c)), c)
        zeros = g.const([0], np.int64)
        e._chunk_pads = g.op("Concat", zeros, zeros, zeros, zeros, zeros, zeros, extra, zeros, zeros, zeros, axis=0)
    return e._chunk_pads
