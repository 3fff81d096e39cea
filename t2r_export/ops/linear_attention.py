"""Causal linear attention in three forms that compute the same thing.

    out_t = phi(q_t)ᵀ S_t / max(phi(q_t)ᵀ z_t, eps)
    S_t = S_0 + Σ_{s≤t} phi(k_s) v_sᵀ      z_t = z_0 + Σ_{s≤t} phi(k_s)

Shapes (GQA: G query heads share each of the H_kv key/value heads and their state):
    phi_q [B, H_kv, G, T, K]     phi_k [B, H_kv, T, K]     v [B, H_kv, T, Dv]
    state: s [B, H_kv, K, Dv], z [B, H_kv, K]  (always fp32: they are un-decayed running sums)
    out   [B, H_kv, G, T, Dv]

- ``naive_linear_attention``: an fp32 loop over time, the reference every other form is tested against.
- ``chunked_linear_attention``: the parallel (training) form; chunks of C tokens, quadratic only
  inside a chunk, so memory grows linearly with T (no T×T matrix).
- ``recurrent_linear_attention``: the decode form, one token at a time from an explicit state.
"""

from __future__ import annotations

import torch

DEFAULT_EPS = 1e-2  # the official T2R code clamps the denominator here, in fp32
DEFAULT_CHUNK = 64


def zero_state(batch: int, num_kv_heads: int, feature_dim: int, head_dim: int,
               device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty state: s [B, H_kv, K, Dv], z [B, H_kv, K], fp32."""
    s = torch.zeros(batch, num_kv_heads, feature_dim, head_dim, dtype=torch.float32, device=device)
    z = torch.zeros(batch, num_kv_heads, feature_dim, dtype=torch.float32, device=device)
    return s, z


def _initial_state(phi_k, v, state):
    if state is not None:
        return state[0].float(), state[1].float()
    b, h, _, k = phi_k.shape
    return zero_state(b, h, k, v.shape[-1], device=v.device)


def naive_linear_attention(phi_q, phi_k, v, state=None, eps: float = DEFAULT_EPS):
    """Reference: a plain fp32 loop over time. Returns (out, (s, z))."""
    s, z = _initial_state(phi_k, v, state)
    q, k, v32 = phi_q.float(), phi_k.float(), v.float()
    outs = []
    for t in range(q.shape[-2]):
        s = s + k[:, :, t, :, None] * v32[:, :, t, None, :]
        z = z + k[:, :, t]
        num = torch.einsum("bhgk,bhkv->bhgv", q[:, :, :, t], s)
        den = torch.einsum("bhgk,bhk->bhg", q[:, :, :, t], z)
        outs.append(num / den.clamp_min(eps)[..., None])
    out = torch.stack(outs, dim=3)
    return out.to(v.dtype), (s, z)


def recurrent_linear_attention(phi_q, phi_k, v, state=None, eps: float = DEFAULT_EPS):
    """Decode form: S += phi(k) vᵀ; z += phi(k); one token per iteration (T is usually 1).

    Written with the same ops as the exported step graph (outer product, matmul, reduce, max, div).
    """
    s, z = _initial_state(phi_k, v, state)
    outs = []
    for t in range(phi_q.shape[-2]):
        k_t = phi_k[:, :, t].float()                       # [B, H, K]
        s = s + k_t.unsqueeze(-1) * v[:, :, t].float().unsqueeze(-2)
        z = z + k_t
        q_t = phi_q[:, :, :, t].float()                    # [B, H, G, K]
        num = torch.matmul(q_t, s)                         # [B, H, G, Dv]
        den = torch.matmul(q_t, z.unsqueeze(-1))           # [B, H, G, 1]
        outs.append(num / torch.clamp(den, min=eps))
    return torch.stack(outs, dim=3).to(v.dtype), (s, z)


def chunked_linear_sums(phi_q, phi_k, v, s0, z0, chunk_size: int = DEFAULT_CHUNK, log_decay=None):
    """The causal sums of the parallel form, before the division (fp32):
    num [B, H_kv, G, T, Dv], den [B, H_kv, G, T], and the final (s, z).

    With ``log_decay`` [H_kv] (log gamma <= 0) every step first multiplies the sums by gamma:
    query t weighs key j <= t by gamma^(t - j) and the initial state by gamma^(t + 1)."""
    if log_decay is not None:
        return _decayed_linear_sums(phi_q, phi_k, v, s0, z0, chunk_size, log_decay)
    b, h, g, t, kdim = phi_q.shape
    dv = v.shape[-1]
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t
    q, k, vv = phi_q.float(), phi_k.float(), v.float()
    if pad:
        # zero keys/values add nothing to the sums; padded query rows are dropped below
        q = torch.nn.functional.pad(q, (0, 0, 0, pad))
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        vv = torch.nn.functional.pad(vv, (0, 0, 0, pad))
    q = q.view(b, h, g, n, c, kdim)
    k = k.view(b, h, n, c, kdim)
    vv = vv.view(b, h, n, c, dv)

    # per-chunk sums, then an exclusive prefix over chunks gives the state entering each chunk
    kv = torch.einsum("bhnck,bhncv->bhnkv", k, vv)
    kz = k.sum(dim=3)
    s_incl = torch.cumsum(kv, dim=2) + s0[:, :, None]
    z_incl = torch.cumsum(kz, dim=2) + z0[:, :, None]
    s_prev = s_incl - kv
    z_prev = z_incl - kz

    num = torch.einsum("bhgnck,bhnkv->bhgncv", q, s_prev)
    den = torch.einsum("bhgnck,bhnk->bhgnc", q, z_prev)
    mask = torch.ones(c, c, dtype=torch.bool, device=v.device).tril()
    scores = torch.einsum("bhgnck,bhnsk->bhgncs", q, k).masked_fill(~mask, 0.0)
    num = num + torch.einsum("bhgncs,bhnsv->bhgncv", scores, vv)
    den = den + scores.sum(dim=-1)
    num = num.reshape(b, h, g, n * c, dv)[:, :, :, :t]
    den = den.reshape(b, h, g, n * c)[:, :, :, :t]
    return num, den, s_incl[:, :, -1], z_incl[:, :, -1]


def _decayed_linear_sums(phi_q, phi_k, v, s0, z0, chunk_size: int, log_decay):
    """``chunked_linear_sums`` with a per-head decay: inside a chunk the scores carry gamma^(i - j),
    between chunks a loop carries the state (T / C small matmuls, memory still linear in T)."""
    b, h, g, t, kdim = phi_q.shape
    c = min(chunk_size, t)
    lg = log_decay.float().view(h, 1)                                   # [H, 1]
    idx = torch.arange(c, device=v.device, dtype=torch.float32)
    rel = idx[:, None] - idx[None, :]                                   # i - j
    # exp of a clamped exponent: the masked (j > i) entries would overflow, then be zeroed anyway
    intra = torch.exp(lg.view(h, 1, 1) * rel.clamp_min(0)) * (rel >= 0)  # [H, C, C]
    q, k, vv = phi_q.float(), phi_k.float(), v.float()
    s, z = s0, z0
    nums, dens = [], []
    for start in range(0, t, c):
        n = min(c, t - start)
        qc, kc, vc = q[:, :, :, start:start + n], k[:, :, start:start + n], vv[:, :, start:start + n]
        into = torch.exp(lg * (idx[:n] + 1))                            # [H, n]: gamma^(i+1) on the carried state
        scores = torch.einsum("bhgik,bhjk->bhgij", qc, kc) * intra[None, :, None, :n, :n]
        nums.append(torch.einsum("bhgik,bhkv->bhgiv", qc, s) * into[None, :, None, :, None]
                    + torch.einsum("bhgij,bhjv->bhgiv", scores, vc))
        dens.append(torch.einsum("bhgik,bhk->bhgi", qc, z) * into[None, :, None, :] + scores.sum(-1))
        # key j of this chunk reaches its end with gamma^(n-1-j)
        out_w = torch.exp(lg * (n - 1 - idx[:n]))[None, :, :, None]     # [1, H, n, 1]
        s = s * torch.exp(lg * n).view(1, h, 1, 1) + torch.einsum("bhjk,bhjv->bhkv", kc * out_w, vc)
        z = z * torch.exp(lg * n).view(1, h, 1) + (kc * out_w).sum(2)
    return torch.cat(nums, dim=3), torch.cat(dens, dim=3), s, z


def chunked_linear_attention(phi_q, phi_k, v, state=None, eps: float = DEFAULT_EPS,
                             chunk_size: int = DEFAULT_CHUNK):
    """Parallel causal form: memory O(T·C + (T/C)·K·Dv), differentiable. Returns (out, (s, z))."""
    s0, z0 = _initial_state(phi_k, v, state)
    num, den, s, z = chunked_linear_sums(phi_q, phi_k, v, s0, z0, chunk_size)
    out = num / den.clamp_min(eps).unsqueeze(-1)
    return out.to(v.dtype), (s, z)


FORMS = {
    "naive": naive_linear_attention,
    "parallel": chunked_linear_attention,
    "recurrent": recurrent_linear_attention,
}
