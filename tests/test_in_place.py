"""One state set where the graphs allow it (runtime/in_place.py): the rule on hand-built graphs, and
decoders with one set equal to decoders with two on the exporter's real graphs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from t2r_export import contract
from t2r_export.bench.streams import t2r_footprint
from t2r_export.runtime import OrtDecoder, load_bundle
from t2r_export.runtime.in_place import graph_updates_in_place
from t2r_export.runtime.onnx_scan import scan_onnx

from conftest import make_tiny_model
from toy_bundle import build_toy_bundle

PAIRS = [("past_state.0.s", "present_state.0.s")]
SHAPE = ["batch", 2, 3]


def _graph(folder, nodes, outputs=("present_state.0.s",), present_shape=SHAPE):
    """The bundle loader's scan (runtime/onnx_scan.py) of a model holding these nodes, written to a file."""
    value = {"logits": ["batch", 2, 3], "present_state.0.s": present_shape}
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("past_state.0.s", TensorProto.FLOAT, SHAPE),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, value[name]) for name in outputs])
    path = folder / "g.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return scan_onnx(path)


def test_an_add_that_is_the_only_reader_updates_in_place(tmp_path):
    graph = _graph(tmp_path, [helper.make_node("Add", ["past_state.0.s", "x"], ["present_state.0.s"])])
    assert graph_updates_in_place(graph, PAIRS)


def test_readers_that_run_before_the_writer_are_allowed(tmp_path):
    # a decay: the old state is scaled first, then the update writes the new one
    graph = _graph(tmp_path, [helper.make_node("Reshape", ["past_state.0.s", "x"], ["view"]),
                    helper.make_node("Mul", ["view", "x"], ["scaled"]),
                    helper.make_node("Add", ["scaled", "x"], ["present_state.0.s"])])
    assert graph_updates_in_place(graph, PAIRS)


@pytest.mark.parametrize("case", ["read-after-write", "read-through-a-view-after-write", "fused-op",
                                  "identity", "broadcast", "not-elementwise", "passed-through"])
def test_graphs_that_read_the_old_state_late_keep_two_sets(tmp_path, case):
    add = helper.make_node("Add", ["past_state.0.s", "x"], ["present_state.0.s"])
    outputs = ("present_state.0.s",)
    if case == "read-after-write":
        nodes = [add, helper.make_node("Mul", ["past_state.0.s", "present_state.0.s"], ["logits"])]
        outputs += ("logits",)
    elif case == "read-through-a-view-after-write":
        nodes = [helper.make_node("Squeeze", ["past_state.0.s"], ["view"]), add,
                 helper.make_node("Mul", ["view", "present_state.0.s"], ["logits"])]
        outputs += ("logits",)
    elif case == "fused-op":
        nodes = [helper.make_node("LinearAttention", ["x", "x", "x", "past_state.0.s"], ["logits", "present_state.0.s"],
                                  domain="com.microsoft")]
    elif case == "identity":
        nodes = [helper.make_node("Identity", ["past_state.0.s"], ["present_state.0.s"])]
    elif case == "broadcast":
        return assert_two_sets(_graph(tmp_path, [add], present_shape=["batch", 4, 2, 3]))
    elif case == "not-elementwise":
        nodes = [helper.make_node("MatMul", ["past_state.0.s", "x"], ["present_state.0.s"])]
    else:
        nodes = [add, helper.make_node("Identity", ["past_state.0.s"], ["logits"])]
        outputs += ("logits",)
    assert_two_sets(_graph(tmp_path, nodes, outputs))


def assert_two_sets(graph):
    assert not graph_updates_in_place(graph, PAIRS)


def _run(decoder: OrtDecoder, prompts, steps: int, rng_seed: int = 0):
    """Prefill rows in two groups, step every row, step the first rows only, copy rows, then continue
    all rows with one more prefill; every logits copy and the final state."""
    rng = np.random.default_rng(rng_seed)
    vocab = decoder.config.vocab_size
    decoder.reset(len(prompts))
    out = [decoder.prefill_rows(0, prompts[:2], np.tile(np.arange(prompts.shape[1]), (2, 1))).copy(),
           decoder.prefill_rows(2, prompts[2:], np.tile(np.arange(prompts.shape[1]), (len(prompts) - 2, 1))).copy()]
    position = prompts.shape[1]
    for t in range(steps):
        ids = rng.integers(3, vocab, (len(prompts), 1))
        out.append(decoder.step(ids, np.full((len(prompts), 1), position + t)).copy())
    out.append(decoder.step_rows(2, rng.integers(3, vocab, (2, 1)), np.full((2, 1), position + steps)).copy())
    # rows past the stepped ones are stale with two sets: give them defined states again
    decoder.copy_row(0, 2)
    decoder.copy_row(1, 3)
    tail = rng.integers(3, vocab, (len(prompts), 5))
    start = position + steps + 1
    out.append(decoder.prefill(tail, np.tile(np.arange(start, start + 5), (len(prompts), 1))).copy())
    return out, decoder.read_state()


def _assert_same(bundle, expect_in_place: bool):
    rng = np.random.default_rng(1)
    prompts = rng.integers(3, bundle.config.vocab_size, (4, 6))
    with OrtDecoder(bundle, threads=1) as one, OrtDecoder(bundle, threads=1, in_place=False) as two:
        assert one.in_place is expect_in_place and not two.in_place
        got, got_state = _run(one, prompts, 40)
        want, want_state = _run(two, prompts, 40)
        assert (one._io.sets[0] is one._io.sets[1]) is expect_in_place
        assert two._io.sets[0] is not two._io.sets[1]
        state = contract.state_nbytes(bundle.config.state_shape, 1, bundle.config.state_dtype)
        logits_row = 4 * bundle.config.vocab_size
        assert one.row_nbytes() == (1 if expect_in_place else 2) * state + logits_row
        assert two.row_nbytes() == 2 * state + logits_row
        # the streams bench counts what the runtime holds
        assert t2r_footprint(bundle)[1] == one.row_nbytes()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    for name, value in want_state.items():
        np.testing.assert_array_equal(got_state[name], value, err_msg=name)


def test_one_state_set_decodes_exactly_as_two_on_the_toy_bundle(tmp_path):
    _assert_same(load_bundle(build_toy_bundle(tmp_path / "toy")), expect_in_place=True)


@pytest.mark.parametrize("arch, t2r, target, expect", [
    ("llama", {}, "plain", True),
    ("gpt2", {}, "plain", True),
    ("llama", {"feature_map": "hedgehog", "window": 4, "decay": True}, "plain", False),
    ("llama", {}, "ort", False),
])
def test_exported_graphs_one_set_where_the_rule_allows(tmp_path, tiny_tokenizer, arch, t2r, target, expect):
    from t2r_export.export.bundle import export_bundle
    from t2r_export.models import T2RConfig, swap_attention

    model = swap_attention(make_tiny_model(arch), T2RConfig(**t2r))
    kwargs = {} if target == "plain" else {"target": target}
    out = export_bundle(model, tmp_path / "b", tokenizer=tiny_tokenizer, verify=False, **kwargs).out
    bundle = load_bundle(out)
    assert bundle.config.target == target
    _assert_same(bundle, expect_in_place=expect)


def test_rows_past_a_partial_step_keep_their_state_with_one_set(tmp_path):
    bundle = load_bundle(build_toy_bundle(tmp_path / "toy"))
    rng = np.random.default_rng(2)
    with OrtDecoder(bundle, threads=1) as dec:
        assert dec.in_place
        dec.reset(4)
        dec.prefill_rows(0, rng.integers(3, bundle.config.vocab_size, (4, 5)), np.tile(np.arange(5), (4, 1)))
        before = {row: dec.read_row(row) for row in (0, 2, 3)}
        dec.step_rows(2, rng.integers(3, bundle.config.vocab_size, (2, 1)), np.full((2, 1), 5))
        for row in (2, 3):
            for name, value in before[row].items():
                np.testing.assert_array_equal(dec.read_row(row)[name], value, err_msg=f"row {row} {name}")
        # the stepped rows did move
        after = dec.read_row(0)
        assert any(not np.array_equal(after[name], value) for name, value in before[0].items())


def test_one_set_without_the_onnx_package(tmp_path):
    """A runtime-only install (no onnx, no torch) decides from the loader's own scan."""
    import subprocess
    import sys

    out = build_toy_bundle(tmp_path / "toy")
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('onnx', 'torch'):\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from t2r_export.runtime import OrtDecoder, load_bundle\n"
            f"dec = OrtDecoder(load_bundle({str(out)!r}))\n"
            "print(dec.in_place, 'onnx' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]


def test_step_bindings_for_every_row_count_are_made_at_once(tmp_path):
    """A server makes the step binding of each row count up front; with one state set both parities
    share it (the same buffers), with two each parity has its own, and stepping adds none."""
    bundle = load_bundle(build_toy_bundle(tmp_path / "toy"))
    for in_place, made in ((True, 4), (False, 8)):
        with OrtDecoder(bundle, threads=1, in_place=in_place) as dec:
            dec.reset(4)
            assert dec.in_place is in_place
            assert dec.prepare_steps() == made
            before = dict(dec._io._steps)
            ids = np.full((4, 1), 5)
            for rows in (1, 3, 4, 2):
                dec.step_rows(rows, ids[:rows], ids[:rows])
            assert dec._io._steps == before
