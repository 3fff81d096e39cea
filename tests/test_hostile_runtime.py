"""Hostile use of the runtime and the command line: bad ids at the decoder API, non-UTF-8 prompts,
Ctrl-C at any moment, --debug, and failures nobody planned for.
"""

from __future__ import annotations

import signal
import subprocess
import time

import numpy as np
import pytest

from hostile_helpers import CLI, assert_one_line_failure, cli_env, invoke, temp_leftovers
from t2r_export.runtime import OrtDecoder, load_bundle
from t2r_export.runtime.decoder import DecoderBase, DecoderClosedError
from toy_bundle import build_toy_bundle

MAX_POSITION = 64


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_toy_bundle(tmp_path_factory.mktemp("hostile") / "bundle", max_position=MAX_POSITION)


@pytest.fixture(scope="module")
def vocab(bundle_dir) -> int:
    return load_bundle(bundle_dir).config.vocab_size


# (name, ids builder from vocab, positions, the words the error must hold)
BAD_IDS = {
    "negative id": (lambda v: np.array([[-1]]), np.array([[0]]), ["input_ids", "-1"]),
    "id equal to vocab": (lambda v: np.array([[v]]), np.array([[0]]), ["input_ids", "below"]),
    "id far past vocab": (lambda v: np.array([[v + 1000]]), np.array([[0]]), ["input_ids", "below"]),
    "float id": (lambda v: np.array([[3.7]]), np.array([[0]]), ["input_ids", "integers", "float64"]),
    "float32 whole id": (lambda v: np.array([[3.0]], np.float32), np.array([[0]]), ["input_ids", "float32"]),
    "bool id": (lambda v: np.array([[True]]), np.array([[0]]), ["input_ids", "bool"]),
    "string id": (lambda v: np.array([["7"]]), np.array([[0]]), ["input_ids", "integers"]),
    "uint64 past int64": (lambda v: np.array([[2 ** 63 + 5]], np.uint64), np.array([[0]]), ["input_ids"]),
    "negative position": (lambda v: np.array([[5]]), np.array([[-3]]), ["position_ids", "-3"]),
    "position past max": (lambda v: np.array([[5]]), np.array([[MAX_POSITION]]), ["position_ids", "max_position"]),
    "float position": (lambda v: np.array([[5]]), np.array([[1.5]]), ["position_ids", "integers"]),
}


@pytest.mark.parametrize("call", ["step", "prefill", "prefill_row"])
@pytest.mark.parametrize("case", list(BAD_IDS))
def test_the_decoder_refuses_bad_ids_before_running(case, call, bundle_dir, vocab):
    make_ids, positions, words = BAD_IDS[case]
    with OrtDecoder(bundle_dir) as dec:
        dec.reset(1)
        before = dec.read_state()
        run = {"step": dec.step, "prefill": dec.prefill,
               "prefill_row": lambda ids, pos: dec.prefill_row(0, ids, pos)}[call]
        with pytest.raises(ValueError) as caught:
            run(make_ids(vocab), positions)
        for word in words:
            assert word in str(caught.value), str(caught.value)
        for name, value in dec.read_state().items():
            np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_the_last_valid_id_and_position_still_run(bundle_dir, vocab):
    with OrtDecoder(bundle_dir) as dec:
        dec.reset(1)
        logits = dec.step(np.array([[vocab - 1]], np.int32), np.array([[MAX_POSITION - 1]], np.uint8))
        assert logits.shape == (1, vocab) and np.isfinite(logits).all()


def test_a_closed_decoder_says_so(bundle_dir):
    dec = OrtDecoder(bundle_dir)
    with dec:
        dec.reset(1)
    assert dec.closed
    dec.close()
    for call in (lambda: dec.reset(1), lambda: dec.step(np.array([[1]]), np.array([[0]]))):
        with pytest.raises(DecoderClosedError, match="closed"):
            call()


@pytest.mark.parametrize("batch", [0, -2, 1.5, True, "2"])
def test_reset_refuses_a_bad_batch(batch, bundle_dir):
    with OrtDecoder(bundle_dir) as dec:
        with pytest.raises(ValueError, match="batch must be an integer >= 1"):
            dec.reset(batch)


def test_every_backend_shares_the_checks():
    from t2r_export.trt.runner import TrtDecoder

    assert issubclass(OrtDecoder, DecoderBase) and issubclass(TrtDecoder, DecoderBase)
    for cls in (OrtDecoder, TrtDecoder):
        assert "_check_ids" not in vars(cls) and "__exit__" not in vars(cls)


# ---- generate on the command line -----------------------------------------------------------------

@pytest.mark.parametrize("args,named", [
    (["--prompt", "abc\udcff"], "byte 0xff"),
    (["--prompt", "ok", "--prompt", "\udce9t\udce9"], "prompt 1"),
    (["--prompt", "abc", "--stop", "\udcfe"], "--stop"),
], ids=["prompt", "second prompt", "stop string"])
def test_non_utf8_text_is_one_line(args, named, bundle_dir):
    result = invoke(["generate", bundle_dir, *args, "--max-new-tokens", "2"])
    assert_one_line_failure(result, 2, named, "UTF-8")


def test_non_utf8_argv_bytes_from_a_real_shell(bundle_dir):
    result = subprocess.run([*CLI, "generate", str(bundle_dir), "--prompt", b"caf\xe9 \xff"], capture_output=True,
                            text=True, env=cli_env(), timeout=120)
    assert_one_line_failure(result, 2, "not valid UTF-8")


# ---- Ctrl-C, --debug, the unexpected --------------------------------------------------------------

def _interrupt(args: list[str], when) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env())
    when(proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_during_start_up_is_one_line_130(tiny_t2r_dir, tmp_path):
    result = _interrupt(["onnx", tiny_t2r_dir, "-o", tmp_path / "out"], lambda proc: time.sleep(0.3))
    assert_one_line_failure(result, 130, "interrupted")
    assert not (tmp_path / "out").exists() and temp_leftovers(tmp_path) == []


def test_ctrl_c_mid_export_is_one_line_130_and_removes_the_temp(tiny_t2r_dir, tmp_path):
    def once_writing(proc):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any((p / "step.onnx").exists() for p in tmp_path.glob(".out.tmp-*")):
                return
            time.sleep(0.05)

    result = _interrupt(["onnx", tiny_t2r_dir, "-o", tmp_path / "out", "--chained-steps", "200000"], once_writing)
    assert_one_line_failure(result, 130, "interrupted")
    assert not (tmp_path / "out").exists() and temp_leftovers(tmp_path) == []


def test_debug_re_raises_the_original_exception(tmp_path):
    plain = invoke(["swap", tmp_path / "missing", "-o", tmp_path / "out"])
    assert_one_line_failure(plain, 2, "model directory not found")
    debug = invoke(["--debug", "swap", tmp_path / "missing", "-o", tmp_path / "out"])
    assert isinstance(debug.exception, ValueError) and "model directory not found" in str(debug.exception)


def test_an_unexpected_error_is_one_line_exit_1(monkeypatch, capsys, bundle_dir):
    from t2r_export import cli
    from t2r_export.runtime import bundle as bundle_module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug nobody planned for")

    monkeypatch.setattr(bundle_module, "load_bundle", broken)
    monkeypatch.setattr("t2r_export.runtime.load_bundle", broken)
    code = cli.run(["generate", str(bundle_dir), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and "unexpected ZeroDivisionError" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        cli.run(["--debug", "generate", str(bundle_dir), "--prompt", "hi"])
