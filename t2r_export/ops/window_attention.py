"""Sliding-window + linear attention (LoLCATs' hybrid) in three forms that compute the same thing.

For query t, with the last W keys (the current one included) in the window and every older key
in the linear part, in ONE numerator and ONE denominator:

    m_t   = max_{s in window} q_t·k_s                      (q is already scaled by d^-0.5)
    num_t = Σ_{window} exp(q_t·k_s - m_t) v_s + phi(q_t)ᵀ S_t
    den_t = Σ_{window} exp(q_t·k_s - m_t)     + phi(q_t)ᵀ z_t
    out_t = num_t / max(den_t, eps)
    S_t = S_0 + Σ_{s ≤ t-W} phi(k_s) v_sᵀ     z_t = z_0 + Σ_{s ≤ t-W} phi(k_s)

With a decay (``feature_map.log_decay()`` not None, one gamma per KV head) the linear part forgets:
every step multiplies S and z by gamma before the leaving key enters, so a key that left the
window n steps ago weighs gamma^n. Its mass then stays bounded however long the text, which keeps
the model's behaviour the same at 16k tokens as at 1k (docs/design.md#sliding-window-hybrid).

A key leaves the window by entering S and z. Everything here runs in fp32 (m_t, the exponentials
and both sums). The state is (s, z, wk, wv, wm):
    s [B, H_kv, K, Dv], z [B, H_kv, K]           the linear part's sums
    wk [B, H_kv, W, d], wv [B, H_kv, W, Dv]      the last W keys (after RoPE) and values, oldest first
    wm [B, W]                                    1.0 where a slot holds a key, 0.0 while still empty
Shapes of the inputs: q [B, H_kv, G, T, d] (scaled queries), k [B, H_kv, T, d], v [B, H_kv, T, Dv];
``feature_map`` maps [B, H_kv, G, T, d] -> [B, H_kv, G, T, K] (queries and keys alike).

- ``naive_window_attention``: the reference, a loop over t that reads the window and the linear
  part by index from the whole key sequence (buffer + new keys).
- ``chunked_window_attention``: the parallel (training) form; query blocks of C tokens see C + W
  keys, the linear part is ``chunked_linear_sums``: memory linear in T, no T×T matrix.
- ``recurrent_window_attention``: the decode form with the rolling buffer the exported step uses
  (evict slot 0 into S and z, shift by one, append the new key).
"""

from __future__ import annotations

import torch

from .linear_attention import DEFAULT_CHUNK, DEFAULT_EPS, chunked_linear_sums, zero_state

# masked window slots get this added to their score: exp() of it is exactly 0 in fp32
MASK_OFFSET = -1e9
# which terms enter the sums: both (the model), or one part alone (evaluation ablations)
ABLATIONS = ("both", "linear", "window")


def zero_window_state(batch: int, num_kv_heads: int, feature_dim: int, head_dim: int, value_dim: int,
                      window: int, device=None) -> tuple:
    """An empty state (s, z, wk, wv, wm), fp32, every window slot marked empty."""
    s, z = zero_state(batch, num_kv_heads, feature_dim, value_dim, device)
    wk = torch.zeros(batch, num_kv_heads, window, head_dim, dtype=torch.float32, device=device)
    wv = torch.zeros(batch, num_kv_heads, window, value_dim, dtype=torch.float32, device=device)
    wm = torch.zeros(batch, window, dtype=torch.float32, device=device)
    return s, z, wk, wv, wm


def _phi(feature_map, keys: torch.Tensor) -> torch.Tensor:
    """phi of keys [B, H_kv, N, d] -> [B, H_kv, N, K] (fp32)."""
    return feature_map(keys.unsqueeze(2)).squeeze(2).float()


def _initial(q, k, v, feature_map, window: int, state):
    if state is not None:
        return tuple(x.float() for x in state)
    b, h, _, d = k.shape
    kdim = _phi(feature_map, k[:, :, :1]).shape[-1]
    return zero_window_state(b, h, kdim, d, v.shape[-1], window, device=v.device)


def _combine(num_w, den_w, num_l, den_l, eps: float):
    return (num_w + num_l) / (den_w + den_l).clamp_min(eps).unsqueeze(-1)


def _linear_prefix(phi_keys, values, s0, z0, n: int, lg):
    """S and z after indices 0 .. n-1 entered (each weighed gamma^(n-1-j), S_0 gamma^n, with a decay)."""
    if lg is None:
        return (s0 + torch.einsum("bhjk,bhjv->bhkv", phi_keys[:, :, :n], values[:, :, :n]),
                z0 + phi_keys[:, :, :n].sum(dim=2))
    w = torch.exp(lg.float()[None, :, None] * torch.arange(n - 1, -1, -1, device=values.device)[None, None, :])
    pk = phi_keys[:, :, :n] * w[..., None]
    g = torch.exp(lg.float() * n)
    return (s0 * g[None, :, None, None] + torch.einsum("bhjk,bhjv->bhkv", pk, values[:, :, :n]),
            z0 * g[None, :, None] + pk.sum(dim=2))


def naive_window_attention(q, k, v, feature_map, window: int, state=None, eps: float = DEFAULT_EPS):
    """Reference: an fp32 loop over t. Returns (out [B, H_kv, G, T, Dv], (s, z, wk, wv, wm))."""
    s0, z0, wk, wv, wm = _initial(q, k, v, feature_map, window, state)
    t_len = q.shape[3]
    # the whole key sequence: index j < W is a buffer slot, index W + t is new key t
    keys = torch.cat([wk, k.float()], dim=2)
    values = torch.cat([wv, v.float()], dim=2)
    filled = torch.cat([wm, torch.ones(wm.shape[0], t_len, device=wm.device)], dim=1)
    phi_keys = _phi(feature_map, keys) * filled[:, None, :, None]
    phi_q = feature_map(q.float()).float()
    q32 = q.float()
    lg = feature_map.log_decay()
    outs = []
    for t in range(t_len):
        # new key t sits at index W + t: the window is indices t+1 .. t+W, the linear part 0 .. t
        s, z = _linear_prefix(phi_keys, values, s0, z0, t + 1, lg)
        win_k, win_v = keys[:, :, t + 1 : t + 1 + window], values[:, :, t + 1 : t + 1 + window]
        scores = torch.einsum("bhgd,bhwd->bhgw", q32[:, :, :, t], win_k)
        scores = scores.masked_fill(filled[:, None, None, t + 1 : t + 1 + window] == 0, float("-inf"))
        e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        num_l = torch.einsum("bhgk,bhkv->bhgv", phi_q[:, :, :, t], s)
        den_l = torch.einsum("bhgk,bhk->bhg", phi_q[:, :, :, t], z)
        outs.append(_combine(e @ win_v, e.sum(-1), num_l, den_l, eps))
    s, z = _linear_prefix(phi_keys, values, s0, z0, t_len, lg)
    out = torch.stack(outs, dim=3)
    return out.to(v.dtype), (s, z, keys[:, :, t_len:], values[:, :, t_len:], filled[:, t_len:])


def recurrent_window_attention(q, k, v, feature_map, window: int, state=None, eps: float = DEFAULT_EPS):
    """Decode form, one token per iteration, with the ops of the exported step graph."""
    s, z, wk, wv, wm = _initial(q, k, v, feature_map, window, state)
    lg = feature_map.log_decay()
    gamma = None if lg is None else torch.exp(lg.float())
    outs = []
    for t in range(q.shape[3]):
        # slot 0 (the oldest key) leaves the window: it enters S and z if it held a key
        phi_old = _phi(feature_map, wk[:, :, :1])[:, :, 0] * wm[:, None, :1]        # [B, H, K]
        if gamma is not None:
            s, z = s * gamma[None, :, None, None], z * gamma[None, :, None]
        s = s + phi_old.unsqueeze(-1) * wv[:, :, 0].unsqueeze(-2)
        z = z + phi_old
        wk = torch.cat([wk[:, :, 1:], k[:, :, t : t + 1].float()], dim=2)
        wv = torch.cat([wv[:, :, 1:], v[:, :, t : t + 1].float()], dim=2)
        wm = torch.cat([wm[:, 1:], torch.ones_like(wm[:, :1])], dim=1)
        q_t = q[:, :, :, t].float()                                                  # [B, H, G, d]
        scores = torch.matmul(q_t, wk.transpose(-1, -2)) + (1.0 - wm[:, None, None]) * MASK_OFFSET
        e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))                   # [B, H, G, W]
        phi_q = feature_map(q_t.unsqueeze(3)).squeeze(3).float()                     # [B, H, G, K]
        num_l = torch.matmul(phi_q, s)
        den_l = torch.matmul(phi_q, z.unsqueeze(-1)).squeeze(-1)
        outs.append(_combine(torch.matmul(e, wv), e.sum(-1), num_l, den_l, eps))
    return torch.stack(outs, dim=3).to(v.dtype), (s, z, wk, wv, wm)


def chunked_window_attention(q, k, v, feature_map, window: int, state=None, eps: float = DEFAULT_EPS,
                             chunk_size: int = DEFAULT_CHUNK, parts: str = "both"):
    """Parallel form: memory O(T·(C + W)), differentiable. Returns (out, (s, z, wk, wv, wm)).

    ``parts`` is an evaluation ablation: "linear" drops the window's terms from the sums, "window"
    the linear part's (the state is updated as usual either way)."""
    if parts not in ABLATIONS:
        raise ValueError(f"unknown attention parts {parts!r}; expected one of {', '.join(ABLATIONS)}")
    s0, z0, wk, wv, wm = _initial(q, k, v, feature_map, window, state)
    b, h, g, t_len, d = q.shape
    dv = v.shape[-1]
    keys = torch.cat([wk, k.float()], dim=2)                                        # [B, H, W+T, d]
    values = torch.cat([wv, v.float()], dim=2)
    filled = torch.cat([wm, torch.ones(b, t_len, device=wm.device)], dim=1)        # [B, W+T]

    # linear part: query t reads indices 0 .. t of the whole sequence (the keys that left the window)
    phi_keys = _phi(feature_map, keys[:, :, :t_len]) * filled[:, None, :t_len, None]
    phi_q = feature_map(q).float()
    num_l, den_l, s, z = chunked_linear_sums(phi_q, phi_keys, values[:, :, :t_len], s0, z0, chunk_size,
                                             log_decay=feature_map.log_decay())

    # window part: query block n (queries nC .. nC+C-1) reads indices nC .. nC+C+W-1
    c = min(chunk_size, t_len)
    n = -(-t_len // c)
    pad = n * c - t_len
    q32 = torch.nn.functional.pad(q.float(), (0, 0, 0, pad)).view(b, h, g, n, c, d)
    # padded keys are marked filled so padded query rows stay finite; real queries never reach them
    kp = torch.nn.functional.pad(keys, (0, 0, 0, pad)).unfold(2, c + window, c)     # [B, H, n, d, C+W]
    vp = torch.nn.functional.pad(values, (0, 0, 0, pad)).unfold(2, c + window, c)   # [B, H, n, Dv, C+W]
    mp = torch.nn.functional.pad(filled, (0, pad), value=1.0).unfold(1, c + window, c)  # [B, n, C+W]
    scores = torch.einsum("bhgnid,bhndr->bhgnir", q32, kp)
    rel = torch.arange(c + window, device=q.device)[None, :] - torch.arange(c, device=q.device)[:, None]
    band = (rel >= 1) & (rel <= window)                                              # [C, C+W]
    valid = band[None, None, None, None] & (mp[:, None, None, :, None, :] > 0)
    scores = scores.masked_fill(~valid, float("-inf"))
    e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    num_w = torch.einsum("bhgnir,bhnvr->bhgniv", e, vp).reshape(b, h, g, n * c, dv)[:, :, :, :t_len]
    den_w = e.sum(-1).reshape(b, h, g, n * c)[:, :, :, :t_len]
    if parts == "linear":
        num_w, den_w = torch.zeros_like(num_w), torch.zeros_like(den_w)
    elif parts == "window":
        num_l, den_l = torch.zeros_like(num_l), torch.zeros_like(den_l)
    out = _combine(num_w, den_w, num_l, den_l, eps)
    return out.to(v.dtype), (s, z, keys[:, :, t_len:], values[:, :, t_len:], filled[:, t_len:])


WINDOW_FORMS = {
    "naive": naive_window_attention,
    "parallel": chunked_window_attention,
    "recurrent": recurrent_window_attention,
}
