"""Graph emission of LoLCATs' sliding-window + linear hybrid (the math: ops/window_attention.py).

Per layer the state holds s, z (the keys that left the window) and the window itself: wk, wv
[B, H_kv, W, d] (keys after RoPE and values, oldest first) and wm [B, W] (1.0 = slot filled).
Plain ONNX ops only and nothing data-dependent in shape: the window shifts by Slice + Concat, the
prefill gathers each query's W keys with indices built from CumSum over ones, masked slots get
-1e9 added to their score.
Everything after the feature map runs in the fp32 island (the max, the exponentials, both sums).

- step: slot 0 leaves the window (into S and z, if filled), the new key enters at slot W-1.
- prefill: the whole sequence is [window; T new keys]; query t reads the W keys ending at its own
  in the exact part (a Gather of W keys per query: memory T·W, not T²) and everything before them
  in the linear part (CumSum, as without a window).
- with a decay (gamma per KV head, a constant of the graph): the step multiplies S and z by gamma
  first; the prefill's running sums become decayed ones, computed in blocks of DECAY_BLOCK tokens
  (a CumSum of gamma^-i x_i inside each block, so no factor grows past gamma^-63) and carried
  between blocks by a log-depth scan whose factors gamma^(C·2^r) only shrink: nothing overflows
  whatever the prompt's length (docs/design.md#sliding-window-hybrid).
"""

from __future__ import annotations

import numpy as np

from .. import contract
from .chunking import CHUNK, first_rows, pad_to_chunks

INT64_MAX = np.iinfo(np.int64).max
# tokens per block of the decayed prefill sums (the plain prefill's chunk); gamma >= DECAY_MIN keeps
# gamma^-(C-1) below 1e3
DECAY_BLOCK = CHUNK
# rounds of the scan between blocks: exact for prompts of up to DECAY_BLOCK * 2^rounds tokens (1M); a
# key further back would weigh gamma^(2^20), below fp32's resolution for any gamma under 0.99998
DECAY_SCAN_ROUNDS = 14


def _names(i: int, io) -> dict:
    return {p.name: io(i, p.name) for p in contract.state_parts(window=1)}


def _mask_bias(e, filled: str) -> str:
    """0 where a slot holds a key, a large negative number where not: exp() of it is 0."""
    big = 1e9 if e.state_dtype == np.float32 else 3e4
    return e.g.op("Mul", e.g.op("Add", filled, e.g.const(-1.0, e.state_dtype)), e.g.const(big, e.state_dtype))


def _combine(e, scores: str, values: str, num_l: str, den_l: str) -> str:
    """(Σ exp(score - max) v + num_l) / max(Σ exp(score - max) + den_l, eps)."""
    g = e.g
    ex = g.op("Exp", g.op("Sub", scores, g.op("ReduceMax", scores, axes=[-1], keepdims=1)))
    num = g.op("Add", g.op("MatMul", ex, values), num_l)
    den = g.op("Add", g.op("ReduceSum", ex, g.const([-1], np.int64), keepdims=1), den_l)
    return g.op("Div", num, g.op("Max", den, g.const(e.dec.eps, e.state_dtype)))


def _slice(e, x: str, start: int, end: int, axis: int, outputs=1) -> str:
    c = e.g.const
    return e.g.op("Slice", x, c([start], np.int64), c([end], np.int64), c([axis], np.int64), outputs=outputs)


def _fp32_to_state(e, x: str) -> str:
    """An fp32 tensor in the state's dtype (a cast only in the all-fp16 plan)."""
    return x if e.state_dtype == np.float32 else e.g.cast(x, e.state_dtype)


def window_step(e, qk: str, v: str, layer, i: int) -> str:
    """One token: qk [B, 1, H_kv, G+1, d], v [B, 1, H_kv, 1, d] -> [B, 1, H·d]."""
    g, hkv, G, d, k, W = e.g, e.hkv, e.groups, e.d, e.k, e.dec.window
    past, present = _names(i, contract.past_name), _names(i, contract.present_name)
    q, key = g.op("Split", qk, g.const([G, 1], np.int64), axis=3, outputs=2)
    with g.scope(f"layers.{i}.phi"):
        # one feature-map chain for the queries and the key leaving the window
        old_k = e.to_low(g.reshape(_slice(e, past["wk"], 0, 1, 2), [-1, 1, hkv, 1, d]))
        phi = e.feature_map(g.op("Concat", q, old_k, axis=3), layer.feature_map, f"layers.{i}.phi")
        phi_q, phi_old = g.op("Split", phi, g.const([G, 1], np.int64), axis=3, outputs=2)
    with g.scope(f"layers.{i}.state", fp32_island=True):
        m0 = _slice(e, past["wm"], 0, 1, 1)                                          # [B, 1]
        pk = g.op("Mul", e.to_state(g.reshape(phi_old, [-1, hkv, k, 1])), g.reshape(m0, [-1, 1, 1, 1]))
        s_past, z_past = past["s"], past["z"]
        log_decay = layer.feature_map.log_decay
        if log_decay is not None:
            gamma = np.exp(log_decay.astype(np.float64))
            s_past = g.op("Mul", s_past, g.const(gamma.reshape(1, hkv, 1, 1), e.state_dtype))
            z_past = g.op("Mul", z_past, g.const(gamma.reshape(1, hkv, 1), e.state_dtype))
        s_out = g.op("Add", s_past, g.op("Mul", pk, _slice(e, past["wv"], 0, 1, 2)), outputs=[present["s"]])
        z_out = g.op("Add", z_past, g.reshape(pk, [-1, hkv, k]), outputs=[present["z"]])
        k_new = e.to_state(g.reshape(key, [-1, hkv, 1, d]))
        v_new = e.to_state(g.reshape(v, [-1, hkv, 1, d]))
        wk = g.op("Concat", _slice(e, past["wk"], 1, INT64_MAX, 2), k_new, axis=2, outputs=[present["wk"]])
        wv = g.op("Concat", _slice(e, past["wv"], 1, INT64_MAX, 2), v_new, axis=2, outputs=[present["wv"]])
        one = g.op("Add", g.op("Mul", m0, g.const(0.0, e.state_dtype)), g.const(1.0, e.state_dtype))
        wm = g.op("Concat", _slice(e, past["wm"], 1, INT64_MAX, 1), one, axis=1, outputs=[present["wm"]])
        qs = e.to_state(g.reshape(q, [-1, hkv, G, d]))
        scores = g.op("MatMul", qs, g.op("Transpose", wk, perm=[0, 1, 3, 2]))        # [B, H_kv, G, W]
        scores = g.op("Add", scores, g.reshape(_mask_bias(e, wm), [-1, 1, 1, W]))
        pq = e.to_state(g.reshape(phi_q, [-1, hkv, G, k]))
        out = _combine(e, scores, wv, g.op("MatMul", pq, s_out), g.op("MatMul", pq, g.unsqueeze(z_out, [-1])))
    return g.reshape(e.to_low(out), [-1, 1, e.dec.num_heads * d])


def window_prefill(e, qk: str, v: str, layer, i: int) -> str:
    """T tokens: qk [B, T, H_kv, G+1, d], v [B, T, H_kv, 1, d] -> [B, T, H·d]."""
    g, hkv, G, d, k, W = e.g, e.hkv, e.groups, e.d, e.k, e.dec.window
    past, present = _names(i, contract.past_name), _names(i, contract.present_name)
    q, key = g.op("Split", qk, g.const([G, 1], np.int64), axis=3, outputs=2)
    with g.scope(f"layers.{i}.state", fp32_island=True):
        # the whole sequence [window; new], [B, W+T, H_kv, d]; its first T entries end up in S and z
        keys = g.op("Concat", g.op("Transpose", past["wk"], perm=[0, 2, 1, 3]),
                    e.to_state(g.reshape(key, [0, 0, hkv, d])), axis=1)
        vals = g.op("Concat", g.op("Transpose", past["wv"], perm=[0, 2, 1, 3]),
                    e.to_state(g.reshape(v, [0, 0, hkv, d])), axis=1)
        # positions are counted in fp32 whatever the plan: fp16 integers stop being exact at 2048
        ones_t = g.op("Add", g.op("Mul", g.cast("position_ids", np.float32), g.const(0.0, np.float32)),
                      g.const(1.0, np.float32))                                         # [B, T]
        wm32 = g.cast(past["wm"], np.float32) if e.state_dtype != np.float32 else past["wm"]
        filled = _fp32_to_state(e, g.op("Concat", wm32, ones_t, axis=1))              # [B, W+T]
        g.op("Transpose", _slice(e, keys, -W, INT64_MAX, 1), perm=[0, 2, 1, 3], outputs=[present["wk"]])
        g.op("Transpose", _slice(e, vals, -W, INT64_MAX, 1), perm=[0, 2, 1, 3], outputs=[present["wv"]])
        _slice(e, filled, -W, INT64_MAX, 1, outputs=[present["wm"]])
        lin_k = _slice(e, keys, 0, -W, 1)                                               # [B, T, H_kv, d]
    with g.scope(f"layers.{i}.phi"):
        phi = e.feature_map(g.op("Concat", q, g.reshape(e.to_low(lin_k), [0, 0, hkv, 1, d]), axis=3), layer.feature_map,
                            f"layers.{i}.phi")
        phi_q, phi_k = g.op("Split", phi, g.const([G, 1], np.int64), axis=3, outputs=2)
    with g.scope(f"layers.{i}.state", fp32_island=True):
        lin_m = g.reshape(_slice(e, filled, 0, -W, 1), [0, 0, 1, 1, 1])
        pk = g.op("Mul", e.to_state(g.reshape(phi_k, [0, 0, hkv, k, 1])), lin_m)     # [B, T, H_kv, K, 1]
        vv = g.reshape(_slice(e, vals, 0, -W, 1), [0, 0, hkv, 1, d])
        axis = g.const(1, np.int64)
        if layer.feature_map.log_decay is None:
            s_all = g.op("Add", g.op("CumSum", g.op("Mul", pk, vv), axis), g.unsqueeze(past["s"], [1]))
            z_all = g.op("Add", g.op("CumSum", g.reshape(pk, [0, 0, hkv, k]), axis), g.unsqueeze(past["z"], [1]))
        else:
            s_all, z_all = _decayed_sums(e, pk, vv, past["s"], past["z"], layer.feature_map.log_decay)
        g.op("Reshape", g.slice_last(s_all, 1), g.const([-1, hkv, k, d], np.int64), outputs=[present["s"]])
        g.op("Reshape", g.slice_last(z_all, 1), g.const([-1, hkv, k], np.int64), outputs=[present["z"]])
        pq = e.to_state(phi_q)                                                           # [B, T, H_kv, G, K]
        num_l = g.op("MatMul", pq, s_all)
        den_l = g.op("MatMul", pq, g.unsqueeze(z_all, [-1]))
        # query t's window is whole-sequence indices t+1 .. t+W: gather those W keys per query,
        # [B, T, W, H_kv, d], so memory grows as T·W (no T × T matrix); the indices come from a
        # CumSum over ones (their shape follows T, their values are computed; counted in fp32)
        first = g.op("CumSum", _slice(e, ones_t, 0, 1, 0), axis)                     # [1, T]: 1 .. T
        offsets = g.const(np.arange(W, dtype=np.float32), np.float32)               # 0 .. W-1
        index = g.cast(g.reshape(g.op("Add", g.unsqueeze(first, [-1]), offsets), [-1, W]), np.int64)   # [T, W]
        win_k = g.op("Transpose", g.op("Gather", keys, index, axis=1), perm=[0, 1, 3, 4, 2])   # [B, T, H_kv, d, W]
        win_v = g.op("Transpose", g.op("Gather", vals, index, axis=1), perm=[0, 1, 3, 2, 4])   # [B, T, H_kv, W, d]
        win_m = g.unsqueeze(g.op("Gather", filled, index, axis=1), [2, 3])         # [B, T, 1, 1, W]
        scores = g.op("Add", g.op("MatMul", e.to_state(q), win_k), _mask_bias(e, win_m))   # [B, T, H_kv, G, W]
        out = _combine(e, scores, win_v, num_l, den_l)
    return g.reshape(e.to_low(out), [0, 0, e.dec.num_heads * d])


def _decayed_sums(e, pk: str, vv: str, s_past: str, z_past: str, log_decay: np.ndarray) -> tuple[str, str]:
    """S_t = gamma^(t+1) S_past + Σ_{j<=t} gamma^(t-j) pk_j v_jᵀ for every t (and z alike), [B, T, H_kv, K, d]
    and [B, T, H_kv, K]; pk [B, T, H_kv, K, 1], vv [B, T, H_kv, 1, d]. S and z travel as one tensor with
    z as an extra value column (v with a constant-1 channel appended)."""
    g, hkv, k, d, c = e.g, e.hkv, e.k, e.d, DECAY_BLOCK
    lg = log_decay.astype(np.float64).reshape(1, 1, 1, hkv, 1, 1)
    i = np.arange(c, dtype=np.float64).reshape(1, 1, c, 1, 1, 1)
    table = lambda x: g.const(np.exp(x), e.state_dtype)  # noqa: E731
    v1 = g.op("Pad", vv, g.const([0, 0, 0, 0, 0, 0, 0, 0, 0, 1], np.int64), g.const(1.0, e.state_dtype))
    x = g.op("Mul", pk, v1)                                                               # [B, T, H, K, d+1]
    past = g.op("Concat", s_past, g.unsqueeze(z_past, [-1]), axis=-1)                    # [B, H, K, d+1]
    # pad T up to whole blocks (zero keys add nothing), then view the blocks
    pads = pad_to_chunks(e, c)
    xb = g.reshape(g.op("Pad", x, pads, g.const(0.0, e.state_dtype)), [0, -1, c, hkv, k, d + 1])  # [B, n, C, H, K, d+1]
    # inside a block: gamma^i · CumSum(gamma^-i x_i), the sums from the block's start
    local = g.op("Mul", g.op("CumSum", g.op("Mul", xb, table(-lg * i)), g.const(2, np.int64)), table(lg * i))
    # what each block adds by its end, and the state entering each block: a = [S_past, L_0 .. L_{n-2}],
    # carry_m = Σ_{m' <= m} gamma^(C (m - m')) a_m', by doubling (Hillis-Steele) with shrinking factors
    ends = g.reshape(_slice(e, local, c - 1, c, 2), [0, -1, hkv, k, d + 1])              # [B, n, H, K, d+1]
    carry = _slice(e, g.op("Concat", g.unsqueeze(past, [1]), ends, axis=1), 0, -1, 1)
    for r in range(DECAY_SCAN_ROUNDS):
        shift = 2 ** r
        pads_r = g.const([0, shift, 0, 0, 0, 0, 0, 0, 0, 0], np.int64)
        older = _slice(e, g.op("Pad", carry, pads_r), 0, -shift, 1)
        factor = np.exp(log_decay.astype(np.float64) * c * shift).reshape(1, 1, hkv, 1, 1)
        carry = g.op("Add", carry, g.op("Mul", older, g.const(factor, e.state_dtype)))
    sums = g.op("Add", local, g.op("Mul", g.unsqueeze(carry, [2]), table(lg * (i + 1))))
    # the first T rows, by a Gather (TensorRT 10's parser takes a Slice's ends only as constants)
    sums = g.op("Gather", g.reshape(sums, [0, -1, hkv, k, d + 1]), first_rows(e), axis=1)  # [B, T, H, K, d+1]
    s_all, z_col = g.op("Split", sums, g.const([d, 1], np.int64), axis=4, outputs=2)
    return s_all, g.reshape(z_col, [0, 0, hkv, k])
