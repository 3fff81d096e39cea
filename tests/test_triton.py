"""`t2r-export triton`: the written configs parse with Triton's own schema and match the graphs' I/O."""

from __future__ import annotations

import subprocess
import sys

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from t2r_export import contract
from t2r_export.deploy import triton
from t2r_export.runtime.bundle import read_graph_io

from hostile_helpers import assert_one_line_failure, invoke, snapshot, user_folder
from toy_bundle import build_toy_bundle

TYPES = {"TYPE_FP32": "float32", "TYPE_INT64": "int64", "TYPE_FP16": "float16"}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_toy_bundle(tmp_path_factory.mktemp("triton") / "bundle", num_layers=3, max_position=128)


@pytest.fixture(scope="module")
def repo(bundle_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("repos") / "repo"
    result = invoke(["triton", bundle_dir, "-o", out, "--max-batch", "16"])
    assert result.exit_code == 0, result.output
    return out


def _parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _io(graph):
    inputs, outputs, _ = read_graph_io(graph)
    return {t.name: t for t in inputs}, {t.name: t for t in outputs}


def test_step_config_parses_and_matches_the_step_graph(repo, bundle_dir):
    config = _parse(repo / "t2r_step" / "config.pbtxt")
    inputs, outputs = _io(repo / "t2r_step" / "1" / "model.onnx")
    assert config.name == "t2r_step" and config.backend == "onnxruntime" and config.max_batch_size == 16
    assert config.HasField("sequence_batching")
    states = config.sequence_batching.state
    pairs = contract.state_pairs(3)
    assert [(s.input_name, s.output_name) for s in states] == pairs
    for state in states:
        graph_in, graph_out = inputs.pop(state.input_name), outputs.pop(state.output_name)
        assert list(state.dims) == list(graph_in.shape[1:]) == list(graph_out.shape[1:])
        assert TYPES[model_config_pb2.DataType.Name(state.data_type)] == graph_in.dtype
        assert state.initial_state[0].zero_data and list(state.initial_state[0].dims) == list(state.dims)
    # what is left are the plain tensors, declared without the batch axis
    assert {t.name for t in config.input} == set(inputs) == {"input_ids", "position_ids"}
    assert {t.name for t in config.output} == set(outputs) == {"logits"}
    for declared in [*config.input, *config.output]:
        graph = inputs.get(declared.name) or outputs[declared.name]
        assert TYPES[model_config_pb2.DataType.Name(declared.data_type)] == graph.dtype
        assert list(declared.dims) == [d if isinstance(d, int) else -1 for d in graph.shape[1:]]


def test_prefill_config_parses_and_matches_the_prefill_graph(repo):
    config = _parse(repo / "t2r_prefill" / "config.pbtxt")
    inputs, outputs = _io(repo / "t2r_prefill" / "1" / "model.onnx")
    assert not config.HasField("sequence_batching")
    declared = {t.name: list(t.dims) for t in [*config.input, *config.output]}
    graph = {name: [d if isinstance(d, int) else -1 for d in t.shape[1:]] for name, t in {**inputs, **outputs}.items()}
    assert declared == graph
    assert declared["input_ids"] == [-1]


def test_the_repository_holds_graphs_client_and_readme(repo, bundle_dir):
    assert (repo / "t2r_step" / "1" / "model.onnx").read_bytes() == (bundle_dir / "step.onnx").read_bytes()
    assert "not run" in (repo / "README.md").read_text()
    help_text = subprocess.run([sys.executable, str(repo / "client_example.py"), "--help"], capture_output=True,
                               text=True, timeout=60)
    assert help_text.returncode == 0 and "--sequence-id" in help_text.stdout, help_text.stderr


def test_state_names_extending_one_another_are_refused():
    triton.check_state_names(name for pair in contract.state_pairs(12) for name in pair)
    with pytest.raises(triton.TritonError, match="'state' is a prefix of 'state_1'"):
        triton.check_state_names(["state_1", "state", "other"])


def test_the_cli_refuses_a_bundle_whose_state_names_extend_one_another(bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(contract, "state_pairs", lambda *a, **k: [("past_state.0.s", "present_state.0.s"),
                                                                  ("past_state.0.s_extra", "present_state.0.s_extra")])
    result = invoke(["triton", bundle_dir, "-o", tmp_path / "repo"])
    assert_one_line_failure(result, 2, "is a prefix of")
    assert not (tmp_path / "repo").exists()


def test_tensorrt_backend_config_and_the_missing_engine_note(bundle_dir, tmp_path):
    result = invoke(["triton", bundle_dir, "-o", tmp_path / "trt", "--backend", "tensorrt"])
    assert result.exit_code == 0, result.output
    assert "model.plan is missing" in result.output
    config = _parse(tmp_path / "trt" / "t2r_step" / "config.pbtxt")
    assert config.backend == "tensorrt" and len(config.sequence_batching.state) == 2 * 3
    assert "trtexec" in (tmp_path / "trt" / "README.md").read_text()


def test_output_folder_rules(bundle_dir, repo, tmp_path):
    assert_one_line_failure(invoke(["triton", bundle_dir, "-o", repo]), 2, "--force")
    assert invoke(["triton", bundle_dir, "-o", repo, "--force", "--max-batch", "4"]).exit_code == 0
    assert _parse(repo / "t2r_step" / "config.pbtxt").max_batch_size == 4
    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    assert_one_line_failure(invoke(["triton", bundle_dir, "-o", mine, "--force"]), 2)
    assert snapshot(mine) == before


@pytest.mark.parametrize("args, needle", [(["--backend", "vllm"], "--backend"), (["--max-batch", "0"], "--max-batch"),
                                          (["--backend", "tensorrt", "--device", "cpu"], "--device")])
def test_bad_options_fail_in_one_line(bundle_dir, tmp_path, args, needle):
    assert_one_line_failure(invoke(["triton", bundle_dir, "-o", tmp_path / "r", *args]), 2, needle)
    assert not (tmp_path / "r").exists()


def test_a_missing_bundle_fails_in_one_line(tmp_path):
    assert_one_line_failure(invoke(["triton", tmp_path / "none", "-o", tmp_path / "r"]), 2, "does not exist")
