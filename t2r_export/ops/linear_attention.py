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


def chunked_linear_sums(phi_q, phi_k, v, s0, z0, chunk_size: int = DEFAULT_CHUNK):
    """The causal sums of the parallel form, before the division (fp32):
    num [B, H_kv, G, T, Dv], den [B, H_kv, G, T], and the final (s, z)."""
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
