"""Hostile inputs: custom code without the flag, damaged weights, configs, tokenizers and checkpoints.

Custom code is a ``.py`` in the model folder that writes a marker file when it is imported: the
marker proves whether it ran. Every case expects one ``error:`` line naming the file, exit 2.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time

import pytest

from hostile_helpers import CLI, assert_one_line_failure, cli_env, copy_model, invoke

COMMANDS = {
    "swap": lambda model, tmp: ["swap", model, "-o", tmp / "out"],
    "eval": lambda model, tmp: ["eval", model, "--data", tmp / "corpus.txt", "--max-tokens", "32",
                                "--block-size", "8"],
    "finetune": lambda model, tmp: ["finetune", model, "-o", tmp / "out", "--steps", "1", "--batch-size", "1",
                                    "--block-size", "8", "--data", tmp / "corpus.txt"],
    "onnx": lambda model, tmp: ["onnx", model, "-o", tmp / "out", "--chained-steps", "2"],
}

EVIL_MODULE = '''
import pathlib
pathlib.Path({marker!r}).write_text("custom code ran")
from transformers import PreTrainedTokenizerFast, LlamaConfig


class EvilTokenizer(PreTrainedTokenizerFast):
    pass


class EvilConfig(LlamaConfig):
    pass
'''


@pytest.fixture()
def model(tmp_path, tiny_t2r_dir):
    """A copy of the tiny T2R model (with tokenizer) that a case may damage, and a small corpus."""
    (tmp_path / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    return copy_model(tiny_t2r_dir, tmp_path / "model")


def _plant_custom_code(model, where: str):
    marker = model.parent / "EXECUTED"
    (model / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    name = "tokenizer_config.json" if where == "tokenizer" else "config.json"
    data = json.loads((model / name).read_text())
    if where == "tokenizer":
        data["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
        data["tokenizer_class"] = "EvilTokenizer"
    else:
        data["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (model / name).write_text(json.dumps(data))
    return marker, model / name


# ---- remote code ------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["tokenizer", "config"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_custom_code_is_refused_without_the_flag_and_never_prompts(command, where, model, tmp_path):
    marker, named = _plant_custom_code(model, where)
    # "y" waits on stdin: a prompt would read it and run the code
    result = invoke(COMMANDS[command](model, tmp_path), input="y\n" * 4)
    assert_one_line_failure(result, 2, str(named), "evil.Evil", "--trust-remote-code")
    assert "[y/N]" not in result.output and not marker.exists()
    assert not (tmp_path / "out").exists()


def test_no_prompt_on_a_terminal_answered_y(model, tmp_path):
    """The case from the field: eval on a terminal, the user types "y"; nothing may ask, nothing may run."""
    marker, named = _plant_custom_code(model, "tokenizer")
    master, slave = os.openpty()
    env = dict(cli_env(), HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.Popen([*CLI, *map(str, COMMANDS["eval"](model, tmp_path))], stdin=slave, stdout=slave,
                            stderr=slave, env=env, close_fds=True)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        os.write(master, b"y\n")
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    proc.wait(timeout=30)
    text = output.decode(errors="replace")
    assert proc.returncode == 2, text
    assert "Traceback" not in text and "[y/N]" not in text and "custom code" in text and str(named) in text
    assert not marker.exists()


def test_the_flag_lets_custom_code_run(model, tmp_path):
    """The control: with --trust-remote-code the same folder's code does run, so the marker can catch it."""
    marker, _ = _plant_custom_code(model, "tokenizer")
    env = dict(cli_env(), HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([*CLI, *map(str, COMMANDS["eval"](model, tmp_path)), "--trust-remote-code"],
                            capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert marker.exists(), result.stderr
    assert "Traceback" not in result.stderr


# ---- damaged model folders -------------------------------------------------------------------------

def _truncate(model):
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garbage(model):
    (model / "model.safetensors").write_bytes(os.urandom(4096))


def _empty(model):
    (model / "model.safetensors").write_bytes(b"")


def _header_not_json(model):
    (model / "model.safetensors").write_bytes((12).to_bytes(8, "little") + b"not json!!!!" + b"\0" * 64)


def _wrong_dims(model):
    config = json.loads((model / "config.json").read_text())
    config["hidden_size"] = 48
    (model / "config.json").write_text(json.dumps(config))


def _config_not_json(model):
    (model / "config.json").write_text('{"model_type": "t2r_llama", ')


def _config_not_utf8(model):
    (model / "config.json").write_bytes(b"\xff\xfe{\x00}\x00")


def _pickle_only(model):
    (model / "model.safetensors").rename(model / "pytorch_model.bin")


MODEL_DAMAGE = {
    "truncated weights": (_truncate, "model.safetensors"),
    "garbage weights": (_garbage, "model.safetensors"),
    "empty weights": (_empty, "model.safetensors"),
    "weights header not JSON": (_header_not_json, "model.safetensors"),
    "config dims differ from weights": (_wrong_dims, "config.json"),
    "config not JSON": (_config_not_json, "config.json"),
    "config not UTF-8": (_config_not_utf8, "config.json"),
    "pickle-only weights": (_pickle_only, "safetensors"),
}


@pytest.mark.parametrize("damage", list(MODEL_DAMAGE))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_damaged_model_folder_is_one_line_naming_the_file(command, damage, model, tmp_path):
    spoil, named = MODEL_DAMAGE[damage]
    spoil(model)
    result = invoke(COMMANDS[command](model, tmp_path))
    assert_one_line_failure(result, 2, named)
    # nothing else either: the damage is found before transformers could print its own report
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


TOKENIZER_DAMAGE = {
    "tokenizer.json not JSON": ("tokenizer.json", b'{"version": "1.0", "model": '),
    "tokenizer.json not a tokenizer": ("tokenizer.json", b'{"hello": "world"}'),
    "tokenizer_config.json not UTF-8": ("tokenizer_config.json", b"\xff\xfe\xfd"),
}


@pytest.mark.parametrize("damage", list(TOKENIZER_DAMAGE))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_damaged_tokenizer_is_one_line_naming_it(command, damage, model, tmp_path):
    name, content = TOKENIZER_DAMAGE[damage]
    (model / name).write_bytes(content)
    result = invoke(COMMANDS[command](model, tmp_path))
    assert_one_line_failure(result, 2, name)
    assert not (tmp_path / "out").exists()


# ---- damaged checkpoints on --resume -------------------------------------------------------------

def _valid_state() -> dict:
    return {"stage": "finetune", "step": 1, "global_batch": 1, "config": {}, "tokens": {}, "losses": {},
            "valid": [], "rng": {"torch": "", "cuda": [], "python": [], "numpy": []}}


STATE_DAMAGE = {
    "not JSON": b'{"stage": "finetune", "step": ',
    "not UTF-8": b"\xff\xfe\x00{",
    "a list": b"[1, 2, 3]",
    "no config": json.dumps({k: v for k, v in _valid_state().items() if k != "config"}).encode(),
    "step is text": json.dumps({**_valid_state(), "step": "three"}).encode(),
    "unknown stage": json.dumps({**_valid_state(), "stage": "pretrain"}).encode(),
    "no rng": json.dumps({**_valid_state(), "rng": {"torch": ""}}).encode(),
}


@pytest.mark.parametrize("damage", list(STATE_DAMAGE))
def test_a_damaged_trainer_state_is_named_on_resume(damage, model, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    state = out / "checkpoint" / "trainer_state.json"
    state.write_bytes(STATE_DAMAGE[damage])
    result = invoke(["finetune", model, "-o", out, "--resume", "--steps", "2", "--batch-size", "1",
                     "--block-size", "8", "--data", tmp_path / "corpus.txt"])
    assert_one_line_failure(result, 2, str(state))
    assert state.read_bytes() == STATE_DAMAGE[damage]


def test_resume_refuses_a_folder_the_tool_did_not_write(model, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    result = invoke(["finetune", model, "-o", out, "--resume", "--data", tmp_path / "corpus.txt"])
    assert_one_line_failure(result, 2, "not written by t2r-export")
    assert (out / "thesis.tex").read_text() == "precious"
