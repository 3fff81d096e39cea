"""Tests for the teacher's tokenizer, perplexity, and a tiny end-to-end pretrain run."""

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import typer
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from t2r_export.cli import pretrain_cmd
from t2r_export.data.corpus import stdlib_token_stream
from t2r_export.data.tokenizer import ENDOFTEXT, train_bpe_tokenizer
from t2r_export.train.evaluate import perplexity
from t2r_export.train.pretrain import PretrainConfig, lr_at, pretrain_teacher

DOCS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n", "# héllo wörld ✓\n"] * 20
TEXT = "def mul(x, y):\n    return x * y  # ünïcode ✓\n\tlast"


def test_tokenizer_round_trips_and_loads_with_both_libraries(tmp_path):
    tokenizer = train_bpe_tokenizer(DOCS, vocab_size=300)
    assert tokenizer.decode(tokenizer(TEXT)["input_ids"]) == TEXT
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == tokenizer.unk_token == ENDOFTEXT
    tokenizer.save_pretrained(tmp_path)
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    plain = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = reloaded(TEXT)["input_ids"]
    assert plain.encode(TEXT).ids == ids
    assert plain.decode(ids) == TEXT
    assert reloaded.eos_token_id == plain.token_to_id(ENDOFTEXT)


def test_tokenizer_is_deterministic():
    a = train_bpe_tokenizer(DOCS, vocab_size=300).backend_tokenizer.to_str()
    b = train_bpe_tokenizer(DOCS, vocab_size=300).backend_tokenizer.to_str()
    assert a == b


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        train_bpe_tokenizer(DOCS, vocab_size=100)


class UniformLM(torch.nn.Module):
    """Equal logits for every token: cross-entropy is exactly log(vocab)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.dummy)


def test_perplexity_of_uniform_model_is_vocab_size():
    stream = np.random.default_rng(0).integers(0, 50, 1000).astype(np.int32)
    result = perplexity(UniformLM(50), stream, block_size=64, batch_size=3)
    assert result["tokens"] == 999
    assert result["loss"] == pytest.approx(math.log(50), rel=1e-6)
    assert result["perplexity"] == pytest.approx(50, rel=1e-5)


def test_perplexity_token_cap_and_progress():
    stream = np.zeros(1000, dtype=np.int32)
    events = []
    result = perplexity(UniformLM(10), stream, block_size=64, max_tokens=200, progress=events.append)
    assert result["tokens"] == 199
    assert events[-1] == {"phase": "eval", "tokens": 199, "total": 199}
    with pytest.raises(ValueError, match="max_tokens must be at least 2"):
        perplexity(UniformLM(10), stream, max_tokens=1)


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(step, cfg) for step in range(cfg.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(cfg.steps, cfg) == pytest.approx(1e-4)
    # unset min_lr decays to a tenth of lr
    assert lr_at(100, PretrainConfig(steps=100, lr=2e-3)) == pytest.approx(2e-4)


def _tiny_config(tmp_path, **overrides):
    return PretrainConfig(
        out_dir=tmp_path / "teacher", steps=3, batch_size=2, block_size=32, vocab_size=300, hidden_size=32,
        num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64, warmup_steps=1,
        log_every=1, eval_max_tokens=500, max_files=3, num_threads=1, cache_dir=tmp_path / "cache", **overrides,
    )


def test_tiny_pretrain_writes_a_loadable_teacher(tmp_path):
    cfg = _tiny_config(tmp_path)
    events = []
    record = pretrain_teacher(cfg, progress=events.append, command="pytest tiny")
    out = cfg.out_dir
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob("teacher.tmp-*"))
    saved = json.loads((out / "training.json").read_text())
    assert saved["command"] == "pytest tiny" and saved["steps"] == 3 and saved["tokens_seen"] == 3 * 2 * 32
    assert saved["seed"] == 1337 and saved["config"]["hidden_size"] == 32
    assert math.isfinite(saved["final_train_loss"]) and math.isfinite(saved["valid"]["loss"])
    assert [e["step"] for e in events if e["phase"] == "train"] == [1, 2, 3]

    # the saved model and tokenizer reproduce the recorded validation loss
    model = LlamaForCausalLM.from_pretrained(out)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 1
    # stored as float16 to keep the package small, loaded for fp32 compute
    assert model.dtype == torch.float32
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    assert model.config.eos_token_id == tokenizer.eos_token_id
    stream = stdlib_token_stream(tokenizer, "valid", cfg.cache_dir, cfg.max_files)
    again = perplexity(model, stream, cfg.block_size, cfg.eval_batch_size, cfg.eval_max_tokens)
    assert again["loss"] == pytest.approx(record["valid"]["loss"], rel=1e-5)


def test_pretrain_rejects_bad_config(tmp_path):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        pretrain_teacher(dataclasses.replace(_tiny_config(tmp_path), steps=0))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        pretrain_teacher(dataclasses.replace(_tiny_config(tmp_path), num_kv_heads=3))


def test_cli_has_every_config_field_with_its_default():
    import inspect

    parameters = inspect.signature(pretrain_cmd.pretrain).parameters
    options = {name: param.default.default for name, param in parameters.items()}
    options["out_dir"] = options.pop("out")
    # --force is about the output folder, not a training setting
    options.pop("force")
    defaults = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}
    assert options == defaults


def test_cli_defaults_match_the_config():
    cfg = PretrainConfig()
    assert pretrain_cmd.DEFAULT_OUT == cfg.out_dir
    assert pretrain_cmd.DEFAULT_STEPS == cfg.steps
    assert pretrain_cmd.DEFAULT_BATCH_SIZE == cfg.batch_size
    assert pretrain_cmd.DEFAULT_LR == cfg.lr
    assert pretrain_cmd.DEFAULT_WARMUP_STEPS == cfg.warmup_steps
    assert pretrain_cmd.DEFAULT_SEED == cfg.seed
    assert pretrain_cmd.DEFAULT_EVAL_MAX_TOKENS == cfg.eval_max_tokens


def _cli():
    app = typer.Typer()
    app.command()(pretrain_cmd.pretrain)
    return app


def test_cli_rejects_bad_input_with_exit_2(tmp_path):
    runner = CliRunner()
    result = runner.invoke(_cli(), ["--steps", "0", "--out", str(tmp_path / "t")])
    assert result.exit_code == 2 and "--steps must be a positive integer" in result.output
    (tmp_path / "file").write_text("")
    result = runner.invoke(_cli(), ["--steps", "1", "--out", str(tmp_path / "file")])
    assert result.exit_code == 2 and "exists and is not a directory" in result.output
