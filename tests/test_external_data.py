"""The shared weight file: both graphs read one weights.bin, tied embeddings once, bundle ≈ checkpoint."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from t2r_export.cli import app
from t2r_export import contract
from t2r_export.contract import RuntimeConfig
from t2r_export.export.bundle import export_bundle
from t2r_export.export.weight_file import ALIGNMENT, MIN_EXTERNAL_BYTES, WEIGHTS_FILE, read_index
from t2r_export.models import T2RConfig, swap_attention
from t2r_export.runtime.ort_backend import OrtDecoder
from t2r_export.tolerances import SIZE_GOALS, check_close

runner = CliRunner()


def _tied_llama(vocab: int = 16384, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A small tied Llama whose embedding dominates its size, as in real small models."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=0,
                      eos_token_id=0)
    return swap_attention(LlamaForCausalLM(cfg).eval(), T2RConfig(feature_dim=16))


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tied") / "t2r"
    _tied_llama().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fp32_bundle(tied_dir, tmp_path_factory):
    return export_bundle(tied_dir, tmp_path_factory.mktemp("b") / "fp32", chained_steps=8).out


def _external(tensor) -> dict:
    return {e.key: e.value for e in tensor.external_data}


def _graphs(bundle):
    return {kind: onnx.load(str(bundle / f"{kind}.onnx"), load_external_data=False) for kind in contract.GRAPH_KINDS}


def _safetensors_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _bundle_bytes(bundle) -> int:
    return sum(f.stat().st_size for f in bundle.iterdir() if f.suffix in (".onnx", ".bin", ".data"))


def test_both_graphs_read_every_big_weight_from_one_file_at_the_same_offsets(fp32_bundle):
    refs = {}
    for kind, graph in _graphs(fp32_bundle).items():
        for tensor in graph.graph.initializer:
            nbytes = int(np.prod(tensor.dims)) * 4
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                ext = _external(tensor)
                assert ext["location"] == WEIGHTS_FILE, f"{kind}: {tensor.name} points at {ext['location']}"
                refs.setdefault(tensor.name, set()).add((ext["offset"], ext["length"]))
            else:
                assert nbytes < MIN_EXTERNAL_BYTES, f"{kind}: {tensor.name} ({nbytes} bytes) is inside the proto"
    assert refs and all(len(places) == 1 for places in refs.values()), "a weight is stored at two places"
    step = {t.name for t in _graphs(fp32_bundle)["step"].graph.initializer if t.data_location}
    prefill = {t.name for t in _graphs(fp32_bundle)["prefill"].graph.initializer if t.data_location}
    # the step graph's RoPE matrices (step_graph.StepEmitter.rope_tables) are its own
    assert prefill <= step and step - prefill <= {"rope.identity", "rope.rotate_half"}
    # the file holds each weight once: its size is their lengths plus alignment padding at most
    lengths = sum(int(length) for (_, length), in refs.values())
    size = (fp32_bundle / WEIGHTS_FILE).stat().st_size
    assert lengths <= size < lengths + ALIGNMENT * len(refs)
    assert set(read_index(fp32_bundle)["tensors"]) == set(refs)


def test_the_tied_lm_head_reads_the_embedding_and_is_not_stored_again(fp32_bundle):
    # _tied_llama's hidden size and vocabulary
    index = read_index(fp32_bundle)["tensors"]
    for kind, graph in _graphs(fp32_bundle).items():
        names = {t.name for t in graph.graph.initializer}
        assert not any(name.startswith("lm_head") for name in names), kind
        assert not [n for n in graph.graph.node if n.op_type == "Gemm"], kind
        # one [D, V] copy: the lm head's MatMul reads it as it is, the lookup gathers its columns
        head = [n for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] == "embed"]
        gather = [n for n in graph.graph.node if n.op_type == "Gather" and n.input[0] == "embed"]
        assert len(head) == 1 and head[0].name.startswith("lm_head/") and len(gather) == 1, kind
        assert {a.name: a.i for a in gather[0].attribute}.get("axis") == 1, kind
    assert index["embed"]["shape"] == [64, 16384]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_bundle_is_about_the_checkpoint_size_at_the_same_precision(tied_dir, fp32_bundle, tmp_path, precision):
    if precision == "fp32":
        bundle, checkpoint = fp32_bundle, tied_dir
    else:
        bundle = export_bundle(tied_dir, tmp_path / "fp16", precision="fp16", verify=False).out
        checkpoint = tmp_path / "fp16-checkpoint"
        from t2r_export.models import load_t2r_model

        load_t2r_model(tied_dir).half().save_pretrained(checkpoint)
    ratio = _bundle_bytes(bundle) / _safetensors_bytes(checkpoint)
    assert ratio <= SIZE_GOALS["bundle/checkpoint"], f"{precision}: bundle / checkpoint = {ratio:.3f}"


def test_the_runtime_maps_the_file_once_and_matches_ort_reading_the_graphs_itself(fp32_bundle):
    index = read_index(fp32_bundle)
    with OrtDecoder(fp32_bundle, threads=1) as dec:
        mapped = dec._weights
        assert set(mapped) == set(index["tensors"])
        # every weight buffer lies inside one mapping of weights.bin: nothing was copied
        pointers = sorted(value.data_ptr() for value in mapped.values())
        assert pointers[-1] - pointers[0] < (fp32_bundle / WEIGHTS_FILE).stat().st_size
        dec.reset(1)
        ids = np.array([[3, 17, 42, 99, 7]], np.int64)
        got = dec.prefill_row(0, ids, np.arange(5)[None]).copy()
    plain = ort.InferenceSession(str(fp32_bundle / "prefill.onnx"), providers=["CPUExecutionProvider"])
    shape = dec.config.state_shape
    feeds = {"input_ids": ids, "position_ids": np.arange(5)[None]}
    for spec in contract.graph_inputs(shape, contract.PREFILL)[2:]:
        feeds[spec.name] = np.zeros((1, *spec.shape[1:]), np.float32)
    expected = plain.run(["logits"], feeds)[0]
    check_close("prefill logits, shared vs self-loaded weights", got, expected, ("ort", "fp32"))


def test_int8_graphs_are_repacked_into_one_weight_file(fp32_bundle, tmp_path, monkeypatch):
    import functools

    from t2r_export.export import quantize, weight_file
    from t2r_export.export.quantize import CalibrationRecipe, export_int8_bundle

    # a low threshold, so this small model's per-channel zero points are big enough to be moved out
    monkeypatch.setattr(quantize, "repack_graphs", functools.partial(weight_file.repack_graphs, min_bytes=64))

    recipe = CalibrationRecipe(max_step_samples=32, greedy_steps_per_prompt=4, max_prompt_tokens=16)
    out = export_int8_bundle(fp32_bundle, tmp_path / "int8", prompts=["def f(x):\n    return x", "import os"],
                             recipe=recipe, cache_dir=tmp_path / "cache").out
    assert not list(out.glob("*.data")), "per-graph external data files were left behind"
    locations = {_external(t)["location"] for graph in _graphs(out).values() for t in graph.graph.initializer
                 if t.data_location == onnx.TensorProto.EXTERNAL}
    assert locations == {WEIGHTS_FILE}
    quantized = [name for name in read_index(out)["tensors"] if name.endswith("_quantized")]
    assert quantized, "no int8 weight reached the shared file"
    # the TensorRT check reads Q/DQ scales and zero points as constants without the weight file
    from t2r_export.trt.compat import check_bundle

    assert check_bundle(out) == []
    assert (out / WEIGHTS_FILE).stat().st_size < (fp32_bundle / WEIGHTS_FILE).stat().st_size
    with OrtDecoder(out, threads=1) as dec:
        dec.reset(1)
        assert np.isfinite(dec.prefill_row(0, np.array([[3, 4, 5]]), np.arange(3)[None])).all()


def test_a_failing_weight_write_is_one_line_and_leaves_nothing(tied_dir, tmp_path, monkeypatch):
    import errno

    from t2r_export.export import weight_file

    class FullDisk:
        """The weight file's handle on a disk that fills up at the first write."""

        def __init__(self, real):
            self.real, self.closed = real, False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.real, name)

        def close(self):
            self.closed = True
            self.real.close()

    real_init = weight_file.WeightFile.__init__

    def init(self, path):
        real_init(self, path)
        self._file = FullDisk(self._file)

    monkeypatch.setattr(weight_file.WeightFile, "__init__", init)
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["onnx", str(tied_dir), "-o", str(out), "--chained-steps", "4"])
    assert result.exit_code in (1, 2), result.output
    assert "No space left on device" in result.output and "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_model_above_two_gigabytes_exports_and_matches_torch(tmp_path, tiny_tokenizer):
    # 2 layers and a 270k vocabulary: the tied embedding alone is 2.2 GB in fp32, above protobuf's 2 GB
    model = _tied_llama(vocab=270_000, hidden=2048, layers=2)
    assert sum(p.numel() for p in model.parameters()) * 4 > 2**31
    path = tmp_path / "big"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    del model
    result = export_bundle(path, tmp_path / "bundle", chained_steps=16)
    assert result.report is not None and result.report.checks
    bundle = result.out
    assert max(f.stat().st_size for f in bundle.glob("*.onnx")) < 2**20
    ratio = _bundle_bytes(bundle) / _safetensors_bytes(path)
    assert ratio <= SIZE_GOALS["bundle/checkpoint"], f"bundle / checkpoint = {ratio:.3f}"


def test_the_calibration_cache_key_sees_the_weights_not_only_the_graph(fp32_bundle, tmp_path):
    import shutil

    from t2r_export.export.quantize import CalibrationRecipe, calibration_cache_key

    copy = tmp_path / "copy"
    shutil.copytree(fp32_bundle, copy)
    before = calibration_cache_key(copy, ["x"], CalibrationRecipe())
    # other weights, same graphs (as two checkpoints of one real shape are): the key must change
    with open(copy / WEIGHTS_FILE, "r+b") as fh:
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 0xFF]))
    assert calibration_cache_key(copy, ["x"], CalibrationRecipe()) != before


def test_int8_keeps_a_tied_embedding_fp32_and_shared_by_the_lookup_and_the_lm_head(fp32_bundle, tmp_path):
    from t2r_export.export.quantize import CalibrationRecipe, quantize_graph

    shape = RuntimeConfig.read(fp32_bundle / contract.RUNTIME_JSON).state_shape
    rng = np.random.default_rng(0)
    feeds = []
    for token in (1, 7, 11):
        feed = {"input_ids": np.array([[token]], np.int64), "position_ids": np.array([[token]], np.int64)}
        for spec in contract.graph_inputs(shape, contract.STEP)[2:]:
            feed[spec.name] = rng.random((1, *spec.shape[1:]), dtype=np.float32)
        feeds.append(feed)
    quantized = quantize_graph(fp32_bundle / "step.onnx", tmp_path / "step.onnx", feeds, CalibrationRecipe())
    graph = onnx.load(str(tmp_path / "step.onnx"), load_external_data=False).graph
    assert quantized and not [name for name in quantized if name.startswith("lm_head/")]
    assert [n for n in graph.node if n.op_type == "DequantizeLinear"]
    # no DequantizeLinear of the whole embedding in front of the lookup, run on every step
    reads = {n.op_type for n in graph.node if "embed" in n.input}
    assert reads == {"Gather", "MatMul"}
