"""A stream's state as a value: save / restore, fork, snapshots, packed rows (runtime/state.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from t2r_export.runtime import OrtDecoder, SamplingParams, generate, load_bundle
from t2r_export.runtime.resume import feed_row, generate_resumed
from t2r_export.runtime.sampling import sample_row
from t2r_export.runtime.state import Snapshots, bundle_identity, fork, load_state, row_shapes, save_state
from t2r_export.tolerances import TOLERANCES

from hostile_helpers import assert_one_line_failure, invoke
from toy_bundle import build_toy_bundle

BATCHED_TOL = TOLERANCES[("ort-batched-row", "fp32")]
PROMPT = "import os\nfor i in"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_toy_bundle(tmp_path_factory.mktemp("state") / "bundle", max_position=512)


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def decoder(bundle):
    with OrtDecoder(bundle, threads=1) as dec:
        yield dec


def _ids(bundle, text=PROMPT):
    return bundle.load_tokenizer().encode(text).ids


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_saved_and_restored_stream_continues_token_identical(bundle, decoder, tmp_path, temperature):
    tokenizer, identity = bundle.load_tokenizer(), bundle_identity(bundle)
    sampling = SamplingParams(temperature=temperature, seed=7)
    whole, _, _ = generate_resumed(decoder, tokenizer, _ids(bundle), identity, None, 24, sampling)
    first, _, state = generate_resumed(decoder, tokenizer, _ids(bundle), identity, None, 10, sampling)
    save_state(tmp_path / "s.safetensors", state)
    loaded = load_state(tmp_path / "s.safetensors", bundle.config, identity)
    assert loaded.position == len(_ids(bundle)) + 9 and loaded.pending == [first.token_ids[-1]]
    rest, _, _ = generate_resumed(decoder, tokenizer, [], identity, loaded, 14, sampling)
    assert first.token_ids + rest.token_ids == whole.token_ids
    assert len(whole.token_ids) == 24 and len(set(whole.token_ids)) > 1
    # and the stream is the runtime's own batch-1 generate
    plain = generate(decoder, tokenizer, PROMPT, max_new_tokens=24, sampling=sampling)
    assert plain.rows[0].token_ids == whole.token_ids


def test_fork_rows_equal_separate_runs_with_the_same_seeds(bundle, decoder):
    ids, seeds, steps = _ids(bundle), [3, 4, 5, 6], 16
    separate = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        decoder.reset(1)
        logits, tokens = feed_row(decoder, 0, ids, 0, fresh=True), []
        for t in range(steps):
            tokens.append(sample_row(logits[0], SamplingParams(temperature=1.0, seed=seed), rng))
            logits = feed_row(decoder, 0, [tokens[-1]], len(ids) + t, fresh=False)
        separate.append(tokens)
    decoder.reset(len(seeds))
    logits = np.repeat(feed_row(decoder, 0, ids, 0, fresh=True), len(seeds), axis=0)
    fork(decoder, 0, range(1, len(seeds)))
    rngs = [np.random.default_rng(seed) for seed in seeds]
    forked = [[] for _ in seeds]
    for t in range(steps):
        for row, seed in enumerate(seeds):
            forked[row].append(sample_row(logits[row], SamplingParams(temperature=1.0, seed=seed), rngs[row]))
        step_ids = np.array([[row[-1]] for row in forked])
        logits = decoder.step(step_ids, np.full((len(seeds), 1), len(ids) + t)).copy()
    assert forked == separate
    assert len({tuple(t) for t in forked}) > 1


def test_snapshots_roll_a_row_back_exactly(bundle, decoder):
    identity = bundle_identity(bundle)
    decoder.reset(2)
    ids = _ids(bundle)
    feed_row(decoder, 1, ids, 0, fresh=True)
    snaps = Snapshots(limit=2)
    position, tokens = len(ids), [5, 9, 11, 17, 23, 29]
    before = None
    for i, token in enumerate(tokens):
        if i in (1, 3):
            snaps.take(decoder, 1, position, identity)
            if i == 3:
                before = decoder.read_row(1)
        decoder.step(np.array([[4], [token]]), np.array([[0], [position]]))
        position += 1
    after_first = decoder.read_row(1)
    assert snaps.positions == [len(ids) + 1, len(ids) + 3]
    snaps.rollback(decoder, 1, len(ids) + 3)
    for name, value in decoder.read_row(1).items():
        np.testing.assert_array_equal(value, before[name])
    for token, pos in zip(tokens[3:], range(len(ids) + 3, position)):
        decoder.step(np.array([[4], [token]]), np.array([[0], [pos]]))
    for name, value in decoder.read_row(1).items():
        np.testing.assert_array_equal(value, after_first[name])
    with pytest.raises(KeyError, match="no snapshot at position"):
        snaps.rollback(decoder, 1, len(ids))


def test_step_rows_steps_the_packed_front_rows_like_the_full_batch(bundle, decoder):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, bundle.config.vocab_size, n) for n in (4, 7, 5)]
    decoder.reset(8)
    with OrtDecoder(bundle, threads=1) as full:
        full.reset(3)
        for row, ids in enumerate(prompts):
            feed_row(decoder, row, ids, 0, fresh=True)
            feed_row(full, row, ids, 0, fresh=True)
        for t in range(5):
            tokens = rng.integers(3, bundle.config.vocab_size, (3, 1))
            positions = np.array([[len(p) + t] for p in prompts])
            packed = decoder.step_rows(3, tokens, positions)
            assert packed.shape == (3, bundle.config.vocab_size)
            np.testing.assert_allclose(packed, full.step(tokens, positions), rtol=0, atol=BATCHED_TOL)
        # row 0 leaves: the last active row moves into its slot and the two rows step on
        decoder.copy_row(2, 0)
        full.copy_row(2, 0)
        tokens, positions = np.array([[7], [8]]), np.array([[len(prompts[2]) + 5], [len(prompts[1]) + 5]])
        packed = decoder.step_rows(2, tokens, positions).copy()
        reference = full.step(np.array([[7], [8], [9]]), np.vstack([positions, [[0]]]))
        np.testing.assert_allclose(packed, reference[:2], rtol=0, atol=BATCHED_TOL)
    with pytest.raises(ValueError, match=r"rows must be an integer in \[1, 8\]"):
        decoder.step_rows(9, np.zeros((9, 1), np.int64), np.zeros((9, 1), np.int64))


def test_batched_logits_equal_single_row_logits(bundle, decoder):
    """Rows are independent in the graphs: a row's logits do not depend on its batch-mates."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, bundle.config.vocab_size, n) for n in (3, 9, 6, 12)]
    decoder.reset(len(prompts))
    for row, ids in enumerate(prompts):
        feed_row(decoder, row, ids, 0, fresh=True)
    with OrtDecoder(bundle, threads=1) as single:
        single.reset(1)
        for t in range(6):
            tokens = rng.integers(3, bundle.config.vocab_size, (len(prompts), 1))
            positions = np.array([[len(p) + t] for p in prompts])
            before = [decoder.read_row(row) for row in range(len(prompts))]
            batched = decoder.step(tokens, positions).copy()
            for row in range(len(prompts)):
                single.write_row(0, before[row])
                alone = single.step(tokens[row:row + 1], positions[row:row + 1])
                np.testing.assert_allclose(batched[row:row + 1], alone, rtol=0, atol=BATCHED_TOL)


@pytest.mark.parametrize("io_binding", [True, False])
def test_rows_prefilled_together_equal_rows_prefilled_alone(bundle, io_binding):
    """prefill_rows: equal-length prompts in one call land in consecutive rows, each as if alone."""
    rng = np.random.default_rng(4)
    prompts = rng.integers(3, bundle.config.vocab_size, (3, 7))
    positions = np.tile(np.arange(7), (3, 1))
    with OrtDecoder(bundle, threads=1, io_binding=io_binding) as together, OrtDecoder(bundle, threads=1) as alone:
        together.reset(5)
        alone.reset(5)
        # row 0 decodes something else first: the group must leave it alone
        together.prefill_row(0, prompts[:1, :4], positions[:1, :4])
        kept = together.read_row(0)
        logits = together.prefill_rows(1, prompts, positions).copy()
        assert logits.shape == (3, bundle.config.vocab_size)
        for row in range(3):
            expected = alone.prefill_row(row + 1, prompts[row:row + 1], positions[:1]).copy()
            np.testing.assert_allclose(logits[row:row + 1], expected, rtol=0, atol=BATCHED_TOL)
            for name, value in alone.read_row(row + 1).items():
                np.testing.assert_allclose(together.read_row(row + 1)[name], value, rtol=0, atol=BATCHED_TOL)
        for name, value in kept.items():
            np.testing.assert_array_equal(together.read_row(0)[name], value)
        # and the batch steps on from there like rows prefilled one by one
        tokens, steps = np.array([[5], [6], [7], [8]]), np.array([[4], [7], [7], [7]])
        alone.prefill_row(0, prompts[:1, :4], positions[:1, :4])
        np.testing.assert_allclose(together.step_rows(4, tokens, steps), alone.step_rows(4, tokens, steps), rtol=0,
                                   atol=BATCHED_TOL)
        with pytest.raises(ValueError, match="outside the batch of 5"):
            together.prefill_rows(3, prompts, positions)
        with pytest.raises(ValueError, match=r"input_ids must have shape \[3, T>=1\]"):
            together.prefill_rows(0, prompts[:, :0], positions[:, :0])


def test_prefill_arena_modes(bundle):
    with pytest.raises(ValueError, match="unknown prefill_arena 'never'; expected one of keep, shrink, off"):
        OrtDecoder(bundle, prefill_arena="never")
    ids = np.arange(3, 40)[None]
    outputs = []
    for mode in ("keep", "shrink", "off"):
        with OrtDecoder(bundle, threads=1, prefill_arena=mode) as dec:
            dec.reset(1)
            outputs.append(dec.prefill_row(0, ids, np.arange(ids.shape[1])[None]).copy())
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], outputs[2])


def test_write_row_refuses_wrong_shapes(bundle, decoder):
    decoder.reset(2)
    state = decoder.read_row(0)
    name = next(iter(state))
    state[name] = state[name][..., :-1].copy()
    with pytest.raises(ValueError, match=f"state tensor '{name}' is float32"):
        decoder.write_row(0, state)


# ---- hostile state files, through the CLI: one line, exit 2 -----------------------------------------

@pytest.fixture(scope="module")
def saved(bundle_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "s.safetensors"
    result = invoke(["generate", bundle_dir, "-p", "def main", "--max-new-tokens", "3", "--state-out", path])
    assert result.exit_code == 0, result.output
    return path


def test_cli_state_out_then_in_continues_the_stream(bundle_dir, saved, tmp_path):
    whole = invoke(["generate", bundle_dir, "-p", "def main", "--max-new-tokens", "8"])
    rest = invoke(["generate", bundle_dir, "--max-new-tokens", "5", "--state-in", saved])
    assert whole.exit_code == rest.exit_code == 0, rest.output
    first = invoke(["generate", bundle_dir, "-p", "def main", "--max-new-tokens", "3"])
    first_text = first.stdout.splitlines()[0]
    assert whole.stdout.splitlines()[0] == first_text + rest.stdout.splitlines()[0]


def _hostile(kind, saved, tmp_path, bundle, other_dir):
    path = tmp_path / "bad.safetensors"
    if kind == "other-bundle":
        return saved, other_dir
    if kind == "truncated":
        path.write_bytes(saved.read_bytes()[:-100])
    elif kind == "not-safetensors":
        path.write_text("hello, I am a text file\n" * 10)
    elif kind in ("wrong-dtype", "wrong-shape", "missing-tensor"):
        state = load_state(saved, bundle.config, bundle_identity(bundle))
        tensors = dict(state.tensors)
        name = sorted(tensors)[0]
        if kind == "wrong-dtype":
            tensors[name] = tensors[name].astype(np.float64)
        elif kind == "wrong-shape":
            tensors[name] = np.zeros((2, *tensors[name].shape[1:]), np.float32)
        else:
            del tensors[name]
        metadata = {"format": "t2r-export-state", "format_version": "1", "bundle": bundle_identity(bundle),
                    "position": "3"}
        save_file(tensors, str(path), metadata=metadata)
    elif kind == "bad-header":
        header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": "no"}}).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header)
    return path, None


@pytest.mark.parametrize("kind, needle", [
    ("other-bundle", "another bundle"), ("truncated", "truncated"), ("not-safetensors", "not a safetensors"),
    ("wrong-dtype", "is float64"), ("wrong-shape", "expected float32[1,"), ("missing-tensor", "lacks state tensor"),
    ("bad-header", "not a valid safetensors")])
def test_hostile_state_files_fail_in_one_line(kind, needle, saved, tmp_path, bundle, bundle_dir):
    other_dir = build_toy_bundle(tmp_path / "other", max_position=512, seed=1)
    path, target = _hostile(kind, saved, tmp_path, bundle, other_dir)
    out = tmp_path / "out.safetensors"
    result = invoke(["generate", target or bundle_dir, "--state-in", path, "--state-out", out])
    assert_one_line_failure(result, 2, needle)
    assert not out.exists()


def test_state_cli_bad_usage_fails_in_one_line(bundle_dir, tmp_path):
    assert_one_line_failure(invoke(["generate", bundle_dir]), 2, "give a prompt")
    assert_one_line_failure(invoke(["generate", bundle_dir, "-p", "a", "-p", "b", "--state-out", tmp_path / "x"]),
                            2, "one stream")
    assert_one_line_failure(invoke(["generate", bundle_dir, "-p", "a", "--state-out", tmp_path]), 2, "--state-out")
    assert_one_line_failure(invoke(["generate", bundle_dir, "-p", "a", "--provider", "tensorrt", "--state-out",
                                    tmp_path / "s"]), 2, "ONNX Runtime")


def test_row_shapes_follow_the_contract(bundle):
    shapes = row_shapes(bundle.config)
    assert len(shapes) == 2 * bundle.config.num_layers
    assert shapes["past_state.0.s"] == (1, bundle.config.num_kv_heads, bundle.config.feature_dim,
                                        bundle.config.head_dim)


@pytest.mark.parametrize("io_binding, in_place", [(True, True), (True, False), (False, True)])
def test_take_row_moves_exactly_one_row_from_a_side_decoder(bundle, io_binding, in_place):
    """take_row (how a server moves a prefilled row into its batch): the row arrives bit for bit,
    its neighbours keep theirs, and later writes to either side do not reach the other."""
    rng = np.random.default_rng(7)
    with OrtDecoder(bundle, threads=1, io_binding=io_binding, in_place=in_place) as main:
        main.reset(4)
        main.prefill_rows(0, rng.integers(3, bundle.config.vocab_size, (4, 6)), np.tile(np.arange(6), (4, 1)))
        # a step flips the parity of a two-set decoder: the row must land in the set the next step reads
        main.step(np.full((4, 1), 5), np.full((4, 1), 6))
        side = main.side_decoder(3)
        try:
            side.prefill_rows(0, rng.integers(3, bundle.config.vocab_size, (3, 9)), np.tile(np.arange(9), (3, 1)))
            before = {row: main.read_row(row) for row in range(4)}
            moved = side.read_row(2)
            main.take_row(side, 2, 1)
            for name, value in moved.items():
                np.testing.assert_array_equal(main.read_row(1)[name], value)
            for row in (0, 2, 3):
                for name, value in before[row].items():
                    np.testing.assert_array_equal(main.read_row(row)[name], value)
            # the rows are copies: the side decoder's next prefill leaves the taken row as it was
            side.prefill_rows(0, rng.integers(3, bundle.config.vocab_size, (3, 4)), np.tile(np.arange(4), (3, 1)))
            for name, value in moved.items():
                np.testing.assert_array_equal(main.read_row(1)[name], value)
            # and the batch steps on from it as from the same state written with write_row
            with OrtDecoder(bundle, threads=1) as check:
                check.reset(4)
                for row in range(4):
                    check.write_row(row, main.read_row(row))
                ids, pos = np.full((4, 1), 7), np.full((4, 1), 9)
                np.testing.assert_allclose(main.step(ids, pos), check.step(ids, pos), rtol=0, atol=BATCHED_TOL)
            with pytest.raises(ValueError, match="outside the batch"):
                main.take_row(side, 3, 0)
        finally:
            side.close()
