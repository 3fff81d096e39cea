"""Sliding-window + linear attention: naive fp32 loop == parallel (blocked) == recurrent (rolling buffer)."""

import pytest
import torch

from t2r_export.ops.feature_maps import FeatureMap
from t2r_export.ops.window_attention import (chunked_window_attention, naive_window_attention,
                                             recurrent_window_attention, zero_window_state)
from t2r_export.tolerances import TOLERANCES

B, HKV, G, D, DV, K = 2, 2, 2, 8, 5, 4


def _feature_map(kind="hedgehog", seed=0, decay=False, window=4):
    torch.manual_seed(seed)
    fm = FeatureMap(kind, HKV, D, K, window=window, decay=decay)
    with torch.no_grad():
        for p in fm.parameters():
            p.normal_(0, 0.5)
        if decay:
            # gamma 0.93 and 0.97: forgetting fast enough that a wrong power shows
            fm.decay.copy_(torch.logit(torch.tensor([0.93, 0.97])))
    return fm


def _inputs(t, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HKV, G, t, D, generator=gen)
    k = torch.randn(B, HKV, t, D, generator=gen)
    v = torch.randn(B, HKV, t, DV, generator=gen)
    for x in (q, k, v) if grad else ():
        x.requires_grad_(True)
    return q, k, v


def _state(fm, window, grad=False):
    """A non-zero state whose window is partly filled (row 0) and full (row 1)."""
    gen = torch.Generator().manual_seed(7)
    s, z, wk, wv, wm = zero_window_state(B, HKV, fm.feature_dim, D, DV, window)
    s, wk, wv = (torch.randn(x.shape, generator=gen) for x in (s, wk, wv))
    z = torch.rand(z.shape, generator=gen) * 3
    wm[0, window // 2:] = 1.0
    wm[1] = 1.0
    for x in (s, z, wk, wv) if grad else ():
        x.requires_grad_(True)
    return s, z, wk, wv, wm


FORMS = {"parallel": chunked_window_attention, "recurrent": recurrent_window_attention}


@pytest.mark.parametrize("t, window, chunk", [(1, 4, 64), (3, 8, 64), (37, 5, 8), (37, 5, 64), (50, 3, 7)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("kind", ["t2r", "hedgehog", "hedgehog+decay"])
def test_forms_agree_on_outputs_and_final_state(t, window, chunk, with_state, kind):
    fm = _feature_map(kind.removesuffix("+decay"), decay=kind.endswith("+decay"))
    q, k, v = _inputs(t)
    state = _state(fm, window) if with_state else None
    ref, ref_state = naive_window_attention(q, k, v, fm, window, state)
    tol = TOLERANCES[("torch-naive", "fp32")]
    for name, fn in FORMS.items():
        extra = {"chunk_size": chunk} if name == "parallel" else {}
        out, new_state = fn(q, k, v, fm, window, state, **extra)
        assert out.shape == ref.shape == (B, HKV, G, t, DV)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol, msg=f"{name} out")
        for part, a, b in zip(("s", "z", "wk", "wv", "wm"), new_state, ref_state, strict=True):
            assert a.dtype == torch.float32 and a.shape == b.shape, part
            torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=f"{name} {part}")


@pytest.mark.parametrize("decay", [False, True])
def test_parallel_gradients_match_naive_from_a_nonzero_state(decay):
    fm_grads, input_grads = [], []
    for fn in (naive_window_attention, lambda *a: chunked_window_attention(*a, chunk_size=6)):
        fm = _feature_map(decay=decay)
        q, k, v = _inputs(23, grad=True)
        state = _state(fm, 5, grad=True)
        out, (s, z, wk, wv, _) = fn(q, k, v, fm, 5, state)
        (out.square().sum() + 1e-2 * (s.sum() + z.sum() + wk.sum() + wv.sum())).backward()
        input_grads.append([x.grad for x in (q, k, v, *state[:4])])
        fm_grads.append([p.grad for p in fm.parameters()])
    tol = TOLERANCES[("torch-grad", "fp32")]
    names = ("dq", "dk", "dv", "ds0", "dz0", "dwk0", "dwv0", "dW", "db") + (("dgamma",) if decay else ())
    for name, a, b in zip(names, input_grads[0] + fm_grads[0], input_grads[1] + fm_grads[1], strict=True):
        assert a is not None and a.abs().sum() > 0, name
        torch.testing.assert_close(b, a, atol=tol, rtol=tol, msg=name)


def test_resume_from_returned_state_equals_one_pass():
    fm = _feature_map()
    q, k, v = _inputs(40)
    full, full_state = chunked_window_attention(q, k, v, fm, 6, chunk_size=8)
    first, state = chunked_window_attention(q[..., :17, :], k[..., :17, :], v[..., :17, :], fm, 6, chunk_size=8)
    second, end_state = chunked_window_attention(q[..., 17:, :], k[..., 17:, :], v[..., 17:, :], fm, 6, state,
                                                 chunk_size=8)
    tol = TOLERANCES[("torch-resume", "fp32")]
    torch.testing.assert_close(torch.cat([first, second], dim=3), full, atol=tol, rtol=tol)
    for a, b in zip(end_state, full_state, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_a_window_covering_every_key_is_exact_softmax_attention():
    fm = _feature_map()
    q, k, v = _inputs(12)
    out, (s, z, *_) = chunked_window_attention(q, k, v, fm, 12)
    scores = torch.einsum("bhgtd,bhsd->bhgts", q, k)
    scores = scores.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ v[:, :, None]
    tol = TOLERANCES[("torch-naive", "fp32")]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    assert s.abs().max() == 0 and z.abs().max() == 0


def test_a_window_of_one_adds_the_current_value_to_the_linear_sums():
    fm = _feature_map()
    q, k, v = _inputs(9)
    out, _ = chunked_window_attention(q, k, v, fm, 1)
    phi_q, phi_k = fm(q), fm(k.unsqueeze(2)).squeeze(2)
    # key t is in the window with weight exp(0) = 1; keys s < t enter through phi
    a = torch.einsum("bhgtk,bhsk->bhgts", phi_q, phi_k) * torch.ones(9, 9).tril(-1)
    a = a + torch.eye(9)
    expected = (a @ v[:, :, None]) / a.sum(-1, keepdim=True)
    tol = TOLERANCES[("torch-naive", "fp32")]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


def test_parallel_memory_is_linear_in_t(monkeypatch):
    # the largest intermediate of a 4096-token call is T x (C + W) per head, not T x T
    fm = _feature_map()
    q, k, v = _inputs(4096)
    sizes = []
    real = torch.einsum

    def spy(eq, *ops):
        out = real(eq, *ops)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "einsum", spy)
    chunked_window_attention(q, k, v, fm, 16, chunk_size=32)
    assert len(sizes) >= 4 and max(sizes) <= B * HKV * G * 4096 * (32 + 16)


def test_a_decay_bounds_the_linear_part_and_matches_the_running_sums():
    """gamma^n: the weight of a key that left the window n steps ago; the sums stay bounded."""
    fm = _feature_map(decay=True, window=3)
    q, k, v = _inputs(400)
    _, (s, z, *_) = chunked_window_attention(q, k, v, fm, 3, chunk_size=16)
    gamma = torch.exp(fm.log_decay())
    phi = fm(k.unsqueeze(2)).squeeze(2)                                   # [B, H, T, K]
    left = phi[:, :, : 400 - 3]                                           # keys that left the window
    weights = gamma[None, :, None] ** torch.arange(400 - 4, -1, -1, dtype=torch.float32)[None, None, :]
    expected = (left * weights[..., None]).sum(2)
    tol = TOLERANCES[("torch-naive", "fp32")]
    torch.testing.assert_close(z, expected, atol=tol, rtol=tol)
    # never more than 1 / (1 - gamma) keys' worth of mass (phi of hedgehog sums to 1 per key)
    assert (z.sum(-1) <= (1.0 + tol) / (1.0 - gamma)[None, :]).all()


def test_a_decay_without_a_window_is_one_clear_error():
    with pytest.raises(ValueError, match="a decay needs the sliding window"):
        FeatureMap("hedgehog", HKV, D, K, window=0, decay=True)
