"""The long hostile cases (``make test-all``): a real kill -9 during finetune then --resume, and a
100,000-token decode in fp32 and in the fp16 plan.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from hostile_helpers import CLI, cli_env, temp_leftovers
from t2r_export.tolerances import DECODE_RSS_GROWTH_BYTES

pytestmark = pytest.mark.slow

DECODE_TOKENS = 100_000


def _finetune_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["finetune", str(model), "-o", str(out), "--data", str(data), "--steps", "40", "--batch-size", "2",
            "--block-size", "32", "--feature-dim", "8", "--save-every", "5", "--eval-every", "0",
            "--eval-max-tokens", "512", "--num-threads", "1"]


def _checkpoint_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def test_kill_9_during_finetune_then_resume_is_exact(tmp_path):
    from safetensors.numpy import load_file

    from test_finetune import make_tiny_files

    model, data = make_tiny_files(tmp_path / "tiny")
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = subprocess.run([*CLI, *_finetune_args(model, data, full)], capture_output=True, text=True, env=cli_env(),
                          timeout=900)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen([*CLI, *_finetune_args(model, data, cut)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=cli_env())
    deadline = time.monotonic() + 600
    while _checkpoint_step(cut) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 10 <= _checkpoint_step(cut) < 40, "the run should have been killed between checkpoints"
    resumed = subprocess.run([*CLI, *_finetune_args(model, data, cut), "--resume"], capture_output=True, text=True,
                             env=cli_env(), timeout=900)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    a, b = (json.loads((run / "finetune.json").read_text()) for run in (full, cut))
    assert a["losses"] == b["losses"] and len(a["losses"]["finetune"]) == 40
    weights_a, weights_b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name, value in weights_a.items():
        np.testing.assert_array_equal(value, weights_b[name], err_msg=name)
    assert temp_leftovers(tmp_path) == [] and not (cut / "checkpoint").exists()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_100k_token_decode_stays_finite_with_flat_memory(precision, tmp_path):
    from t2r_export.export.bundle import export_bundle
    from t2r_export.runtime import OrtDecoder, load_bundle
    from t2r_export.teacher import bundled_model_dir

    out = export_bundle(bundled_model_dir("t2r"), tmp_path / precision, precision=precision, verify=False).out
    bundle = load_bundle(out)
    ids = bundle.load_tokenizer().encode("def main():\n").ids
    with OrtDecoder(bundle, threads=1) as dec:
        dec.reset(1)
        logits = dec.prefill_row(0, np.array([ids]), np.arange(len(ids))[None])
        position, rss_at_10k = len(ids), None
        for step in range(DECODE_TOKENS):
            assert np.isfinite(logits).all(), f"non-finite logits at token {step} ({precision})"
            token = int(np.argmax(logits[0]))
            logits = dec.step(np.array([[token]]), np.array([[position]]))
            position += 1
            if step == 10_000:
                rss_at_10k = _rss_bytes()
        state = dec.read_state()
    assert all(np.isfinite(value).all() for value in state.values())
    assert _rss_bytes() - rss_at_10k <= DECODE_RSS_GROWTH_BYTES
