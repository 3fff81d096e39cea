"""Every registered architecture: swap, the three forms on the whole model, resume, save/load."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_CONFIGS, VOCAB, make_tiny_model
from t2r_export.models import (ADAPTERS, T2RConfig, is_t2r_model, load_t2r_model, new_state, prefill,
                               swap_attention)
from t2r_export.models.attention import FEATURE_MAP_ATTR
from t2r_export.tolerances import TOLERANCES

ARCHS = sorted(ADAPTERS)


def test_every_registered_architecture_has_a_tiny_test_model():
    missing = set(ADAPTERS) - set(TINY_CONFIGS)
    assert not missing, f"registered architectures without a tiny test model: {sorted(missing)}"


def _ids(b=2, t=21, seed=0):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# the paper's T2R, Hedgehog, and LoLCATs' sliding-window hybrid on both maps
VARIANTS = {"t2r": dict(feature_dim=16), "hedgehog": dict(feature_map="hedgehog", feature_dim=8),
            "t2r-w5": dict(feature_dim=16, window=5), "hedgehog-w4": dict(feature_map="hedgehog", feature_dim=8,
                                                                          window=4),
            "hedgehog-w4-decay": dict(feature_map="hedgehog", feature_dim=8, window=4, decay=True)}


@pytest.fixture(params=[(a, v) for a in ARCHS for v in VARIANTS], ids=lambda p: f"{p[0]}-{p[1]}")
def swapped(request):
    arch, variant = request.param
    return arch, swap_attention(make_tiny_model(arch), T2RConfig(**VARIANTS[variant])).eval()


def test_swap_keeps_every_pretrained_weight_bit_identical(swapped):
    arch, model = swapped
    original = make_tiny_model(arch).state_dict()
    after = model.state_dict()
    added = [k for k in after if k not in original]
    assert added and all(FEATURE_MAP_ATTR in k for k in added)
    for key, value in original.items():
        assert torch.equal(after[key], value), key
    assert is_t2r_model(model) and model.config.model_type == f"t2r_{arch}"


def test_naive_parallel_recurrent_agree_on_the_whole_model(swapped):
    _, model = swapped
    ids = _ids()
    tol = TOLERANCES[("torch-naive", "fp32")]
    logits, states = {}, {}
    for form in ("naive", "parallel", "recurrent"):
        state = new_state(model, 2)
        with torch.no_grad():
            logits[form] = model(ids, t2r_state=state, t2r_form=form).logits
        states[form] = state
    for form in ("parallel", "recurrent"):
        torch.testing.assert_close(logits[form], logits["naive"], atol=tol, rtol=tol)
        assert len(states[form].tensors()) == (10 if model.config.t2r["window"] else 4)
        for a, b in zip(states[form].tensors(), states["naive"].tensors(), strict=True):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_parallel_gradients_equal_naive_gradients(swapped):
    _, model = swapped
    ids = _ids(t=13)
    grads = {}
    for form in ("naive", "parallel"):
        model.zero_grad()
        model(ids, labels=ids, t2r_form=form).loss.backward()
        grads[form] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    tol = TOLERANCES[("torch-grad", "fp32")]
    assert any(FEATURE_MAP_ATTR in n for n in grads["naive"]) or model.config.t2r["feature_map"] not in ("t2r",
                                                                                                       "hedgehog")
    for name, grad in grads["naive"].items():
        torch.testing.assert_close(grads["parallel"][name], grad, atol=tol, rtol=tol, msg=name)


def test_t_tokens_at_once_equal_half_then_resume(swapped):
    _, model = swapped
    ids = _ids(t=20)
    with torch.no_grad():
        full = model(ids).logits[:, -1]
    state = new_state(model, 2)
    prefill(model, ids[:, :10], state)
    resumed = prefill(model, ids[:, 10:], state, position_offset=10)
    tol = TOLERANCES[("torch-resume", "fp32")]
    torch.testing.assert_close(resumed, full, atol=tol, rtol=tol)


def test_save_and_load_round_trip_gives_identical_logits(swapped, tmp_path):
    _, model = swapped
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    ours = load_t2r_model(tmp_path / "m")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for loaded in (ours, auto):
        assert loaded.config.t2r == model.config.t2r and loaded.config._attn_implementation == "t2r"
        with torch.no_grad():
            assert torch.equal(loaded.eval()(ids).logits, expected)


@pytest.mark.parametrize("feature_map", ["elu", "rfa"])
def test_baseline_feature_maps_swap_and_round_trip(feature_map, tmp_path):
    model = swap_attention(make_tiny_model("llama"), T2RConfig(feature_map=feature_map)).eval()
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(load_t2r_model(tmp_path / "m")(ids).logits, expected)


def test_swap_rejects_what_it_cannot_convert():
    from transformers import BertConfig, BertModel, LlamaModel

    with pytest.raises(ValueError, match="unsupported architecture 'bert'; supported: gpt2, gpt_neox, llama"):
        swap_attention(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                            intermediate_size=32, vocab_size=50)))
    with pytest.raises(ValueError, match="causal LM"):
        swap_attention(LlamaModel(TINY_CONFIGS["llama"][1]))
    model = swap_attention(make_tiny_model("llama"))
    with pytest.raises(ValueError, match="already a T2R model"):
        swap_attention(model)
