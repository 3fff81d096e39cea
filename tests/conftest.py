"""Tiny random models for every registered architecture, built in code (no downloads), seeded."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

VOCAB = 300


def _tiny_configs():
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    gqa = dict(common, num_key_value_heads=2, intermediate_size=64, bos_token_id=0, eos_token_id=0)
    return {
        "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                             bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                             attn_pdrop=0.0)),
        "gpt_neox": (GPTNeoXForCausalLM, GPTNeoXConfig(**common, intermediate_size=64, rotary_pct=0.5,
                                                       bos_token_id=0, eos_token_id=0)),
        "llama": (LlamaForCausalLM, LlamaConfig(**gqa)),
        "mistral": (MistralForCausalLM, MistralConfig(**gqa)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**gqa)),
    }


TINY_CONFIGS = _tiny_configs()


def make_tiny_model(arch: str, seed: int = 0):
    """A tiny random softmax model of ``arch``, in eval mode; norms/biases perturbed so they matter."""
    cls, cfg = TINY_CONFIGS[arch]
    torch.manual_seed(seed)
    model = cls(copy.deepcopy(cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.5, 0.2)
    return model


def prefill_in_pieces(session, model, ids, cuts, layers: int):
    """The prefill graph over ``ids[:, cuts[i]:cuts[i + 1]]`` in turn, each piece from the state the
    one before left, beside torch over all of ``ids`` → (graph logits, graph state feeds, torch's
    last logits, torch's state)."""
    import numpy as np

    from t2r_export.export.verify import _run, _state_feeds
    from t2r_export.models import new_state

    batch = ids.shape[0]
    feeds = _state_feeds(new_state(model, batch), layers)
    for start, end in zip(cuts, cuts[1:]):
        pos = np.tile(np.arange(start, end, dtype=np.int64), (batch, 1))
        got, feeds = _run(session, ids[:, start:end].numpy(), pos, feeds, layers)
    state = new_state(model, batch)
    with torch.no_grad():
        expected = model(ids, t2r_state=state).logits[:, -1].numpy()
    return got["logits"], feeds, expected, state


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from t2r_export.data.tokenizer import train_bpe_tokenizer

    text = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\nprint(os.getcwd())\n"] * 20
    return train_bpe_tokenizer(text, vocab_size=VOCAB)


@pytest.fixture()
def tiny_t2r_dir(tmp_path, tiny_tokenizer):
    """A saved tiny T2R Llama with a tokenizer, as `t2r-export swap` would write it."""
    from t2r_export.models import T2RConfig, swap_attention

    model = swap_attention(make_tiny_model("llama"), T2RConfig())
    path = tmp_path / "tiny-t2r"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    """One torch thread for the test: CPU reductions, hence losses, become bit-reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
