"""Rung 1 of the verification ladder: naive fp32 loop == parallel (chunked) == recurrent."""

import pytest
import torch

from t2r_export.ops.linear_attention import (chunked_linear_attention, naive_linear_attention,
                                             recurrent_linear_attention)
from t2r_export.tolerances import TOLERANCES


def _inputs(b=2, hkv=2, g=2, t=37, k=8, dv=5, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    phi_q = torch.rand(b, hkv, g, t, k, generator=gen, dtype=torch.float64).float()
    phi_k = torch.rand(b, hkv, t, k, generator=gen, dtype=torch.float64).float()
    v = torch.randn(b, hkv, t, dv, generator=gen)
    if grad:
        for x in (phi_q, phi_k, v):
            x.requires_grad_(True)
    return phi_q, phi_k, v


def _state(b=2, hkv=2, k=8, dv=5):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(b, hkv, k, dv, generator=gen), torch.rand(b, hkv, k, generator=gen) * 3


@pytest.mark.parametrize("t", [1, 16, 37, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_forms_agree_on_outputs_and_final_state(t, with_state):
    phi_q, phi_k, v = _inputs(t=t)
    state = _state() if with_state else None
    ref, (s_ref, z_ref) = naive_linear_attention(phi_q, phi_k, v, state)
    tol = TOLERANCES[("torch-naive", "fp32")]
    for fn in (chunked_linear_attention, recurrent_linear_attention):
        out, (s, z) = fn(phi_q, phi_k, v, state)
        assert out.shape == ref.shape == (2, 2, 2, t, 5)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        torch.testing.assert_close(s, s_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(z, z_ref, atol=tol, rtol=tol)


def test_small_chunks_match_too():
    phi_q, phi_k, v = _inputs(t=50)
    ref, _ = naive_linear_attention(phi_q, phi_k, v)
    out, _ = chunked_linear_attention(phi_q, phi_k, v, chunk_size=7)
    tol = TOLERANCES[("torch-naive", "fp32")]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("with_state", [False, True])
def test_parallel_gradients_match_naive(with_state):
    tol = TOLERANCES[("torch-grad", "fp32")]
    grads = []
    for fn in (naive_linear_attention, chunked_linear_attention):
        phi_q, phi_k, v = _inputs(t=45, grad=True)
        # from a non-zero initial state too, whose gradients must agree as well
        state = tuple(x.requires_grad_(True) for x in _state()) if with_state else None
        out, (s, z) = fn(phi_q, phi_k, v, state)
        (out.square().sum() + s.sum() * 1e-2 + z.sum() * 1e-2).backward()
        grads.append([x.grad for x in (phi_q, phi_k, v, *(state or ()))])
    assert len(grads[0]) == (5 if with_state else 3) and all(g is not None for g in grads[0] + grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_resume_from_returned_state_equals_one_pass():
    phi_q, phi_k, v = _inputs(t=40)
    full, (s_full, z_full) = chunked_linear_attention(phi_q, phi_k, v)
    first, state = chunked_linear_attention(phi_q[..., :20, :], phi_k[..., :20, :], v[..., :20, :])
    second, (s2, z2) = chunked_linear_attention(phi_q[..., 20:, :], phi_k[..., 20:, :], v[..., 20:, :], state)
    tol = TOLERANCES[("torch-resume", "fp32")]
    torch.testing.assert_close(torch.cat([first, second], dim=3), full, atol=tol, rtol=tol)
    torch.testing.assert_close(s2, s_full)
    torch.testing.assert_close(z2, z_full)


def test_denominator_is_clamped_at_eps():
    phi_q, phi_k, v = _inputs(t=4)
    out, _ = naive_linear_attention(torch.zeros_like(phi_q), phi_k, v, eps=1e-2)
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_state_is_fp32_whatever_the_input_dtype():
    phi_q, phi_k, v = (x.to(torch.bfloat16) for x in _inputs(t=9))
    out, (s, z) = chunked_linear_attention(phi_q, phi_k, v)
    assert out.dtype == torch.bfloat16 and s.dtype == z.dtype == torch.float32
