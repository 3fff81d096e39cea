"""The torch-free decode runtime on a toy bundle built in code (tests/toy_bundle.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from t2r_export.cli import runtime_cmd
from t2r_export.contract import REQUIRED_FIELDS
from t2r_export.runtime import (BundleError, GenerationError, NonFiniteLogitsError, OrtDecoder, ProviderError,
                                SamplingParams, generate, generate_ids, inspect_bundle, load_bundle, sample_row)
from t2r_export.runtime.generate import _RowStream
from t2r_export.runtime.sampling import ARGMAX_CHUNK_BYTES, Sampler, _filtered_distribution, argmax_rows
from t2r_export.tolerances import TOLERANCES

from toy_bundle import EOS_ID, build_toy_bundle

PROMPTS = ["def main():", "import os\nimport sys\nfor i in", "héllo wörld ✓"]
MAX_POSITION = 128
REPO = Path(__file__).resolve().parents[1]
PREFILL_TOL = TOLERANCES[("ort-prefill", "fp32")]
BINDING_TOL = TOLERANCES[("ort-iobinding", "fp32")]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return build_toy_bundle(tmp_path_factory.mktemp("toy") / "bundle", max_position=MAX_POSITION)


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def tokenizer(bundle):
    return bundle.load_tokenizer()


@pytest.fixture(scope="module")
def decoder(bundle):
    with OrtDecoder(bundle, threads=1) as dec:
        yield dec


def _copy_with(bundle_dir: Path, dst: Path, **changes) -> Path:
    """A copy of the bundle whose runtime.json has ``changes`` ("a.b" keys as a__b; None deletes)."""
    shutil.copytree(bundle_dir, dst)
    raw = json.loads((dst / "runtime.json").read_text())
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = raw
        for parent in parents:
            node = node[parent]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value(node[leaf]) if callable(value) else value
    (dst / "runtime.json").write_text(json.dumps(raw))
    return dst


# ---- the decoder ---------------------------------------------------------------------------------

def test_io_binding_matches_plain_session_run_over_50_steps(bundle):
    rng = np.random.default_rng(0)
    vocab = bundle.config.vocab_size
    prompts = [rng.integers(3, vocab, 5), rng.integers(3, vocab, 9)]
    with OrtDecoder(bundle) as fast, OrtDecoder(bundle, io_binding=False) as plain:
        for dec in (fast, plain):
            dec.reset(2)
        for row, ids in enumerate(prompts):
            positions = np.arange(len(ids))[None]
            np.testing.assert_allclose(fast.prefill_row(row, ids[None], positions),
                                       plain.prefill_row(row, ids[None], positions), rtol=0, atol=BINDING_TOL)
        pointers = {name: v.data_ptr() for s in fast._io.sets for name, v in s.values.items()}
        positions = np.array([[5], [9]])
        for _ in range(50):
            tokens = rng.integers(3, vocab, (2, 1))
            fast_logits = fast.step(tokens, positions).copy()
            np.testing.assert_allclose(fast_logits, plain.step(tokens, positions), rtol=0, atol=BINDING_TOL)
            positions += 1
        for name, value in plain.read_state().items():
            np.testing.assert_allclose(fast.read_state()[name], value, rtol=0,
                                       atol=TOLERANCES[("ort-iobinding-state", "fp32")], err_msg=name)
        # the ping-pong sets were never reallocated
        assert pointers == {name: v.data_ptr() for s in fast._io.sets for name, v in s.values.items()}
        assert fast.state_nbytes() == plain.state_nbytes() == 2 * 2 * 2 * 4 * (3 + 1) * 4


def test_prefill_then_steps_equals_stepping_every_token(bundle):
    rng = np.random.default_rng(1)
    ids = rng.integers(3, bundle.config.vocab_size, (2, 12))
    positions = np.broadcast_to(np.arange(12), (2, 12))
    with OrtDecoder(bundle) as prefilled, OrtDecoder(bundle) as stepped, OrtDecoder(bundle) as chunked:
        prefilled.reset(2)
        stepped.reset(2)
        chunked.reset(2)
        logits = prefilled.prefill(ids[:, :8], positions[:, :8]).copy()
        for t in range(8):
            expected = stepped.step(ids[:, t:t + 1], positions[:, t:t + 1]).copy()
        np.testing.assert_allclose(logits, expected, rtol=PREFILL_TOL, atol=PREFILL_TOL)
        # prefill continues from the state it is given: 5 tokens then 3 == 8 at once
        chunked.prefill(ids[:, :5], positions[:, :5])
        np.testing.assert_allclose(chunked.prefill(ids[:, 5:8], positions[:, 5:8]), logits, rtol=PREFILL_TOL,
                                   atol=PREFILL_TOL)
        for t in range(8, 12):
            np.testing.assert_allclose(prefilled.step(ids[:, t:t + 1], positions[:, t:t + 1]),
                                       stepped.step(ids[:, t:t + 1], positions[:, t:t + 1]), rtol=PREFILL_TOL,
                                       atol=PREFILL_TOL)
        for name, value in stepped.read_state().items():
            np.testing.assert_allclose(prefilled.read_state()[name], value, rtol=PREFILL_TOL, atol=PREFILL_TOL,
                                       err_msg=name)


def test_prefill_row_writes_only_its_row(decoder, bundle):
    ids = np.array([[5, 6, 7]])
    decoder.reset(3)
    in_batch = decoder.prefill_row(1, ids, np.arange(3)[None]).copy()
    state = decoder.read_state()
    assert all(not value[[0, 2]].any() and value[1].any() for value in state.values())
    decoder.reset(1)
    np.testing.assert_allclose(decoder.prefill_row(0, ids, np.arange(3)[None]), in_batch, rtol=0, atol=BINDING_TOL)
    for name, value in decoder.read_state().items():
        np.testing.assert_allclose(value[0], state[name][1], rtol=0, atol=BINDING_TOL, err_msg=name)


def test_decoder_rejects_misuse(bundle):
    with OrtDecoder(bundle) as dec:
        with pytest.raises(RuntimeError, match="reset"):
            dec.step(np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64))
        dec.reset(2)
        with pytest.raises(ValueError, match=r"\[2, 1\]"):
            dec.step(np.zeros((2, 3), np.int64), np.zeros((2, 3), np.int64))
        with pytest.raises(ValueError, match="position_ids"):
            dec.prefill(np.zeros((2, 3), np.int64), np.zeros((2, 2), np.int64))
        with pytest.raises(ValueError, match="outside the batch"):
            dec.prefill_row(2, np.zeros((1, 3), np.int64), np.zeros((1, 3), np.int64))


def test_unknown_or_missing_provider_is_a_clear_error(bundle):
    import onnxruntime as ort

    with pytest.raises(ProviderError, match="unknown provider 'tpu'"):
        OrtDecoder(bundle, provider="tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ProviderError, match="CUDAExecutionProvider"):
            OrtDecoder(bundle, provider="cuda")
    with pytest.raises(ValueError, match="optimization level"):
        OrtDecoder(bundle, optimization="max")
    with pytest.raises(ValueError, match="threads"):
        OrtDecoder(bundle, threads=-1)


# ---- generation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("io_binding", [True, False])
def test_batched_greedy_generation_equals_each_prompt_alone(bundle, tokenizer, io_binding):
    with OrtDecoder(bundle, io_binding=io_binding) as dec:
        batched = generate(dec, tokenizer, PROMPTS, max_new_tokens=24)
        alone = [generate(dec, tokenizer, prompt, max_new_tokens=24).rows[0] for prompt in PROMPTS]
    assert len({row.prompt_tokens for row in batched.rows}) == 3
    assert [row.token_ids for row in batched.rows] == [row.token_ids for row in alone]
    assert batched.texts == [row.text for row in alone]
    assert len({tuple(row.token_ids) for row in batched.rows}) == 3
    assert batched.timing.steps == 23 and batched.timing.decode_tokens == 72 and batched.timing.tokens_per_s > 0


def test_sampling_is_reproducible_and_per_row(decoder, tokenizer):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    first = generate(decoder, tokenizer, PROMPTS, max_new_tokens=24, sampling=params)
    again = generate(decoder, tokenizer, PROMPTS, max_new_tokens=24, sampling=params)
    other = generate(decoder, tokenizer, PROMPTS, max_new_tokens=24,
                     sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=8))
    ids = [row.token_ids for row in first.rows]
    assert ids == [row.token_ids for row in again.rows]
    assert ids != [row.token_ids for row in other.rows]
    greedy = generate(decoder, tokenizer, PROMPTS, max_new_tokens=24)
    assert ids != [row.token_ids for row in greedy.rows]
    # row r of a batch with seed s draws like that prompt alone with seed s + r
    alone = generate(decoder, tokenizer, PROMPTS[2], max_new_tokens=24,
                     sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=9))
    assert alone.rows[0].token_ids == ids[2]


def test_top_k_1_equals_greedy(decoder, tokenizer):
    greedy = generate(decoder, tokenizer, PROMPTS, max_new_tokens=16)
    top1 = generate(decoder, tokenizer, PROMPTS, max_new_tokens=16,
                    sampling=SamplingParams(temperature=1.5, top_k=1, seed=3))
    assert [r.token_ids for r in top1.rows] == [r.token_ids for r in greedy.rows]
    logits = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    candidates, probs = _filtered_distribution(logits / 1.5, SamplingParams(temperature=1.5, top_k=1))
    assert candidates.tolist() == [int(np.argmax(logits))] and probs.tolist() == [1.0]


def test_top_k_and_top_p_restrict_the_support():
    logits = np.log(np.array([0.05, 0.5, 0.15, 0.3], np.float64))
    rng = np.random.default_rng(0)

    def support(**kw):
        params = SamplingParams(temperature=1.0, **kw)
        return {sample_row(logits, params, rng) for _ in range(400)}

    assert support(top_k=2) == {1, 3}
    assert support(top_p=0.7) == {1, 3}
    assert support(top_p=0.85) == {1, 3, 2}
    assert support() == {0, 1, 2, 3}
    draws = np.array([sample_row(logits, SamplingParams(temperature=1.0), rng) for _ in range(4000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, [0.05, 0.5, 0.15, 0.3],
                               atol=TOLERANCES[("sampling-frequency", "fp64")])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1), batch=3)
    picked = sampler(np.tile(logits.astype(np.float32), (3, 1)), rows=np.array([0, 2]))
    assert picked[1] == -1 and picked[0] >= 0 and picked[2] >= 0


@pytest.mark.parametrize("shape", [(64, 4096), (3, 40000), (2, 5, 300), (7,)])
def test_argmax_rows_reads_a_read_only_block_in_place_and_answers_as_argmax(shape):
    import tracemalloc

    block = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    flat = block.reshape(-1, shape[-1])
    flat[0, 3] = flat[0, 5] = 9.0           # ties: the first wins
    flat[-1, :] = -np.inf                   # all -inf: index 0
    if flat.shape[0] > 2:
        flat[1, 4] = np.nan                 # NaN: its index, as argmax says
    view = block.view()
    view.flags.writeable = False
    tracemalloc.start()
    try:
        picked = argmax_rows(view)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(picked, block.argmax(axis=-1))
    assert picked.dtype == np.int64 and picked.shape == shape[:-1]
    # the plain call on a read-only block copies all of it; this copies a chunk of rows at a time
    row = shape[-1] * 4
    assert peak <= max(ARGMAX_CHUNK_BYTES, row) + 4096, (peak, block.nbytes)
    assert Sampler(SamplingParams(temperature=0.0), batch=flat.shape[0])(view.reshape(-1, shape[-1])).tolist() \
        == block.reshape(-1, shape[-1]).argmax(-1).tolist()


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                dict(seed=-1)])
def test_bad_sampling_params(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def test_eos_finishes_only_its_row(bundle_dir, tmp_path, decoder, tokenizer):
    ids = generate(decoder, tokenizer, PROMPTS[0], max_new_tokens=24).rows[0].token_ids
    cut = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    stopping = load_bundle(_copy_with(bundle_dir, tmp_path / "eos", eos_token_id=[EOS_ID, ids[cut]]))
    with OrtDecoder(stopping) as dec:
        result = generate(dec, tokenizer, PROMPTS, max_new_tokens=24)
        alone = [generate(dec, tokenizer, prompt, max_new_tokens=24).rows[0] for prompt in PROMPTS]
    assert result.rows[0].token_ids == ids[:cut]
    assert result.rows[0].finish_reason == "eos"
    assert result.rows[0].text == tokenizer.decode(ids[:cut])
    assert [r.token_ids for r in result.rows] == [r.token_ids for r in alone]
    assert [r.finish_reason for r in result.rows] == [r.finish_reason for r in alone]


def test_stop_string_cuts_the_text_and_the_stream(decoder, tokenizer):
    full = generate(decoder, tokenizer, PROMPTS[1], max_new_tokens=40).rows[0]
    start = next(i for i in range(4, len(full.text) - 2) if "\ufffd" not in full.text[i:i + 2])
    stop = full.text[start:start + 2]
    cut = full.text.find(stop)
    deltas = []
    result = generate(decoder, tokenizer, [PROMPTS[1], PROMPTS[0]], max_new_tokens=40, stop_strings=[stop],
                      stream_callback=lambda row, delta: deltas.append((row, delta)))
    row = result.rows[0]
    assert row.finish_reason == "stop" and row.text == full.text[:cut]
    assert len(row.token_ids) < 40 and row.token_ids == full.token_ids[:len(row.token_ids)]
    assert "".join(d for r, d in deltas if r == 0) == row.text
    assert "".join(d for r, d in deltas if r == 1) == result.rows[1].text


def test_streaming_concatenates_to_the_final_text(decoder, tokenizer):
    deltas = {0: [], 1: [], 2: []}
    result = generate(decoder, tokenizer, PROMPTS, max_new_tokens=32,
                      stream_callback=lambda row, delta: deltas[row].append(delta))
    for row, out in enumerate(result.rows):
        assert "".join(deltas[row]) == out.text == tokenizer.decode(out.token_ids)
        assert len(deltas[row]) > 1


def test_streaming_releases_multibyte_characters_whole(tokenizer):
    text = "naïve café ✓ 日本語 wörld"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert any(tokenizer.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    stream = _RowStream(tokenizer, [])
    deltas = [stream.push(token) for token in ids] + [stream.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)


def test_stop_string_spanning_tokens_is_held_back(tokenizer):
    ids = tokenizer.encode("x = 1\nclass Point", add_special_tokens=False).ids
    stream = _RowStream(tokenizer, ["\nclass"])
    deltas = []
    for token in ids:
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    assert stream.stopped and "".join(deltas) == stream.text == "x = 1"


def test_non_finite_logits_are_reported(bundle, tokenizer):
    class NaNDecoder:
        config = bundle.config

        def reset(self, batch):
            pass

        def prefill_row(self, row, input_ids, position_ids):
            return np.full((1, self.config.vocab_size), np.nan, np.float32)

        def step(self, input_ids, position_ids):
            raise AssertionError("never reached")

    with pytest.raises(NonFiniteLogitsError, match=r"rows \[0\]"):
        generate(NaNDecoder(), tokenizer, "def", max_new_tokens=4)


# ---- bad input -----------------------------------------------------------------------------------

def test_empty_prompts_are_rejected(decoder, tokenizer):
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(decoder, tokenizer, ["ok", ""], max_new_tokens=4)
    with pytest.raises(GenerationError, match="no prompts"):
        generate(decoder, tokenizer, [], max_new_tokens=4)
    with pytest.raises(GenerationError, match="encodes to no tokens"):
        generate_ids(decoder, tokenizer, [[]], max_new_tokens=4)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate(decoder, tokenizer, "ok", max_new_tokens=0)


def test_token_ids_beyond_the_vocabulary_are_rejected(tmp_path, decoder, tokenizer):
    with pytest.raises(GenerationError, match=r"token id 10000 at position 1, outside .*\[0, 300\)"):
        generate_ids(decoder, tokenizer, [[5, 10_000]], max_new_tokens=4)
    small = load_bundle(build_toy_bundle(tmp_path / "small", model_vocab=260))
    prompt = "naïve café 日本語"
    assert max(small.load_tokenizer().encode(prompt).ids) >= 260
    with OrtDecoder(small) as dec, pytest.raises(GenerationError, match="tokenizer does not match the model"):
        generate(dec, small.load_tokenizer(), prompt, max_new_tokens=4)


def test_positions_beyond_max_position_are_rejected(decoder, tokenizer):
    length = len(tokenizer.encode(PROMPTS[0]).ids)
    with pytest.raises(GenerationError, match=f"needs {length + MAX_POSITION} positions, beyond the model's "
                                              f"max_position {MAX_POSITION}"):
        generate(decoder, tokenizer, PROMPTS[0], max_new_tokens=MAX_POSITION)
    # exactly at the limit is fine
    result = generate(decoder, tokenizer, PROMPTS[0], max_new_tokens=MAX_POSITION - length)
    assert len(result.rows[0].token_ids) == MAX_POSITION - length


# ---- the bundle ----------------------------------------------------------------------------------

TAMPERED = [
    ("format", "onnx-bundle"), ("format_version", 1), ("format_version", 3), ("architecture", ""), ("num_layers", 3),
    ("num_heads", 3), ("num_kv_heads", 1), ("head_dim", 5), ("feature_dim", 9), ("vocab_size", 299),
    ("max_position", 0), ("max_position", "long"), ("bos_token_id", 10_000), ("eos_token_id", [EOS_ID, 10_000]),
    ("pad_token_id", -1), ("state_dtype", "float16"), ("precision", "fp8"), ("opset", 13), ("opset", "17"),
    ("graphs", []), ("graphs__step__file", "missing.onnx"), ("graphs__prefill__inputs", lambda v: v[:-1]),
    ("graphs__step__outputs", lambda v: [*v, "extra"]), ("graphs__step__inputs", "input_ids"),
    ("tools", "1.0"), ("source_checkpoint_sha256", 5), ("state_bytes_per_sequence", 12),
]
# fields the graphs themselves contradict: the ONNX Runtime backend catches them on its own
GRAPH_CHECKED = {"num_layers", "num_kv_heads", "head_dim", "feature_dim", "vocab_size", "graphs__prefill__inputs",
                 "graphs__step__outputs", "state_bytes_per_sequence"}


@pytest.mark.parametrize("field,value", TAMPERED, ids=[f"{f}={v!r}"[:40] for f, v in TAMPERED])
def test_tampered_runtime_json_names_the_field(bundle_dir, tmp_path, field, value):
    path = _copy_with(bundle_dir, tmp_path / "b", **{field: value})
    name = field.replace("__", ".")
    with pytest.raises(BundleError, match=f"'{name}'") as err:
        inspect_bundle(path)
    assert "\n" not in str(err.value)
    if field in GRAPH_CHECKED:
        with pytest.raises(BundleError, match=f"'{name}'"):
            OrtDecoder(path)


@pytest.mark.parametrize("field", [*REQUIRED_FIELDS, "graphs__step__inputs", "graphs__prefill"])
def test_missing_runtime_json_field_names_it(bundle_dir, tmp_path, field):
    path = _copy_with(bundle_dir, tmp_path / "b", **{field: None})
    with pytest.raises(BundleError, match=f"missing field '{field.replace('__', '.')}'"):
        load_bundle(path)


def test_unreadable_bundles(bundle_dir, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        load_bundle(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="runtime.json is missing"):
        load_bundle(tmp_path / "empty")
    bad_json = shutil.copytree(bundle_dir, tmp_path / "bad_json")
    (bad_json / "runtime.json").write_text('{"format": ')
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bad_json)
    (bad_json / "runtime.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="JSON object"):
        load_bundle(bad_json)
    no_tok = shutil.copytree(bundle_dir, tmp_path / "no_tok")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json is missing"):
        load_bundle(no_tok)
    bad_tok = shutil.copytree(bundle_dir, tmp_path / "bad_tok")
    (bad_tok / "tokenizer.json").write_text("{}")
    with pytest.raises(BundleError, match="not a readable tokenizer"):
        load_bundle(bad_tok).load_tokenizer()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_onnx_file(bundle_dir, tmp_path, damage):
    path = shutil.copytree(bundle_dir, tmp_path / "b")
    step = path / "step.onnx"
    data = step.read_bytes()
    step.write_bytes(b"\x00not an onnx model" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(BundleError, match="step.onnx is not a"):
        OrtDecoder(path)
    with pytest.raises(BundleError, match="step.onnx is not a"):
        inspect_bundle(path)


def test_runtime_works_when_torch_cannot_be_imported(bundle_dir, decoder, tokenizer):
    expected = generate(decoder, tokenizer, PROMPTS[:2], max_new_tokens=8)
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "onnx"):
            sys.modules[name] = None  # importing them now raises ImportError
        import typer
        from typer.testing import CliRunner
        import t2r_export.runtime as rt
        from t2r_export.cli import runtime_cmd

        bundle = rt.inspect_bundle({str(bundle_dir)!r})  # graph I/O read through onnxruntime
        with rt.OrtDecoder(bundle) as dec:
            result = rt.generate(dec, bundle.load_tokenizer(), {PROMPTS[:2]!r}, max_new_tokens=8)
        app = typer.Typer()
        app.callback()(lambda: None)
        app.command("generate")(runtime_cmd.generate)
        cli = CliRunner().invoke(app, ["generate", {str(bundle_dir)!r}, "--prompt", "def", "--max-new-tokens", "4"])
        assert cli.exit_code == 0, cli.output
        loaded = sorted(m for m in sys.modules if sys.modules[m] is not None and (
            m.split(".")[0] in ("torch", "transformers", "onnx") or m.startswith("t2r_export.models")))
        assert not loaded, loaded
        print([row.token_ids for row in result.rows])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str([row.token_ids for row in expected.rows])


# ---- the command ---------------------------------------------------------------------------------

def _cli_app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("generate")(runtime_cmd.generate)
    return app


def _run_cli(*args):
    return CliRunner().invoke(_cli_app(), ["generate", *[str(a) for a in args]])


def test_cli_streams_text_and_reports_tokens_per_second(bundle_dir, decoder, tokenizer):
    expected = generate(decoder, tokenizer, PROMPTS[0], max_new_tokens=12).rows[0].text
    result = _run_cli(bundle_dir, "--prompt", PROMPTS[0], "--max-new-tokens", 12, "--threads", 1)
    assert result.exit_code == 0, result.output
    assert result.stdout == PROMPTS[0] + expected + "\n"
    assert "tokens/s" in result.stderr and "12 tokens" in result.stderr


def test_cli_batch_sampling_and_stop(bundle_dir):
    result = _run_cli(bundle_dir, "-p", PROMPTS[0], "-p", PROMPTS[1], "--temperature", 0.8, "--top-k", 20,
                      "--top-p", 0.9, "--seed", 3, "--stop", "zzz", "--max-new-tokens", 8)
    assert result.exit_code == 0, result.output
    assert PROMPTS[0] in result.stdout and PROMPTS[1] in result.stdout
    assert "batch 2" in result.stderr


@pytest.mark.parametrize("case", ["missing", "corrupt_json", "bad_field", "corrupt_onnx", "empty_prompt",
                                  "provider", "vocab", "max_position", "sampling", "threads"])
def test_cli_bad_input_exits_2(bundle_dir, tmp_path, case):
    args = [bundle_dir, "--prompt", "def"]
    if case == "missing":
        args[0] = tmp_path / "nowhere"
    elif case == "corrupt_json":
        args[0] = shutil.copytree(bundle_dir, tmp_path / "b")
        (args[0] / "runtime.json").write_text("{")
    elif case == "bad_field":
        args[0] = _copy_with(bundle_dir, tmp_path / "b", feature_dim=9)
    elif case == "corrupt_onnx":
        args[0] = shutil.copytree(bundle_dir, tmp_path / "b")
        (args[0] / "prefill.onnx").write_bytes(b"junk")
    elif case == "empty_prompt":
        args[2] = ""
    elif case == "provider":
        args += ["--provider", "tpu"]
    elif case == "vocab":
        args = [build_toy_bundle(tmp_path / "small", model_vocab=260), "--prompt", "naïve café 日本語"]
    elif case == "max_position":
        args += ["--max-new-tokens", MAX_POSITION]
    elif case == "sampling":
        args += ["--top-p", 0]
    elif case == "threads":
        args += ["--threads", -2]
    result = _run_cli(*args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
    assert "Traceback" not in result.output


# ---- a bundle from the real exporter -------------------------------------------------------------

def test_runtime_runs_a_bundle_from_the_exporter(tmp_path, tiny_tokenizer):
    torch = pytest.importorskip("torch")
    from conftest import make_tiny_model
    from t2r_export.export.bundle import export_bundle
    from t2r_export.models import T2RConfig, swap_attention

    model = swap_attention(make_tiny_model("llama"), T2RConfig()).eval()
    bundle = inspect_bundle(export_bundle(model, tmp_path / "b", tokenizer=tiny_tokenizer, verify=False).out)
    tokenizer = bundle.load_tokenizer()
    prompts = ["def f(x):", "import os\nprint(os"]
    with OrtDecoder(bundle) as dec:
        batched = generate(dec, tokenizer, prompts, max_new_tokens=8)
        alone = [generate(dec, tokenizer, prompt, max_new_tokens=8).rows[0] for prompt in prompts]
    assert [r.token_ids for r in batched.rows] == [r.token_ids for r in alone]
    for prompt, row in zip(prompts, batched.rows):
        ids = tokenizer.encode(prompt).ids
        with torch.no_grad():
            for _ in row.token_ids:
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert ids[-len(row.token_ids):] == row.token_ids
