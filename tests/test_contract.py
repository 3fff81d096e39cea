"""The bundle format's one owner: RuntimeConfig round trips, and every precision exports, loads and runs."""

import json
import subprocess
import sys

import numpy as np
import pytest

from t2r_export import contract
from t2r_export.runtime import OrtDecoder, generate, inspect_bundle, load_bundle


@pytest.fixture(scope="module")
def every_precision(tmp_path_factory, tiny_tokenizer):
    """fp32, fp16, fp16-all and int8 bundles of one tiny T2R llama."""
    from conftest import make_tiny_model
    from t2r_export.export.bundle import export_bundle
    from t2r_export.export.quantize import CalibrationRecipe, export_int8_bundle
    from t2r_export.models import T2RConfig, swap_attention

    root = tmp_path_factory.mktemp("precisions")
    model = swap_attention(make_tiny_model("llama"), T2RConfig(feature_dim=8))
    bundles = {}
    for precision in ("fp32", "fp16", "fp16-all"):
        bundles[precision] = export_bundle(model, root / precision, precision=precision, tokenizer=tiny_tokenizer,
                                           chained_steps=8).out
    recipe = CalibrationRecipe(max_prompt_tokens=16, greedy_steps_per_prompt=4, max_step_samples=64)
    prompts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\nprint(os.getcwd())\n"]
    bundles["int8"] = export_int8_bundle(bundles["fp32"], root / "int8", prompts=prompts, recipe=recipe,
                                         cache_dir=root / "cache").out
    from t2r_export.export.weight_only import export_weight_only_bundle

    for precision in contract.WEIGHT_ONLY_PRECISIONS:
        export_weight_only_bundle(bundles["fp32"], root / precision, precision)
        bundles[precision] = root / precision
    from t2r_export.export.int4_qdq import export_qdq_bundle

    # blocks of 64: here only the MLP's down projection (64 input rows) is wide enough
    export_qdq_bundle(bundles["fp32"], root / "int4-qdq")
    bundles["int4-qdq"] = root / "int4-qdq"
    return bundles


@pytest.mark.parametrize("precision", contract.PRECISIONS)
def test_every_precision_exports_loads_and_runs(every_precision, precision, one_thread):
    path = every_precision[precision]
    raw = json.loads((path / contract.RUNTIME_JSON).read_text())
    assert raw["precision"] == precision and raw["state_dtype"] == contract.STATE_DTYPES[precision]
    assert raw["format_version"] == contract.FORMAT_VERSION
    bundle = inspect_bundle(path)
    assert bundle.config == load_bundle(path).config
    with OrtDecoder(bundle, threads=1) as decoder:
        result = generate(decoder, bundle.load_tokenizer(), "def f(", max_new_tokens=6)
        decoder.reset(1)
        logits = decoder.step(np.array([[3]], np.int64), np.array([[0]], np.int64))
    assert len(result.rows[0].token_ids) == 6
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


def test_fp16_all_state_really_is_float16(every_precision):
    bundle = load_bundle(every_precision["fp16-all"])
    assert bundle.config.state_dtype == "float16"
    specs, _ = bundle.config.graph_specs(contract.STEP)
    assert {s.dtype for s in specs if contract.is_state(s.name)} == {"float16"}
    with OrtDecoder(bundle, threads=1) as decoder:
        decoder.reset(2)
        assert decoder.state_nbytes() == contract.state_nbytes(bundle.config.state_shape, 2, "float16")
        assert decoder.state_nbytes() * 2 == contract.state_nbytes(bundle.config.state_shape, 2, "float32")


def test_runtime_config_round_trips(every_precision):
    for path in every_precision.values():
        config = contract.RuntimeConfig.read(path / contract.RUNTIME_JSON)
        assert contract.RuntimeConfig.from_json(config.to_json()) == config
        assert json.loads(config.to_json()) == json.loads((path / contract.RUNTIME_JSON).read_text())


@pytest.mark.parametrize("version", [1, 3])
def test_other_format_versions_are_one_line(every_precision, tmp_path, version):
    import shutil

    path = shutil.copytree(every_precision["fp32"], tmp_path / "b")
    raw = json.loads((path / contract.RUNTIME_JSON).read_text())
    raw["format_version"] = version
    (path / contract.RUNTIME_JSON).write_text(json.dumps(raw))
    with pytest.raises(contract.BundleError, match=f"'format_version' = {version} is an? (older|newer) bundle "
                                                   "format .* re-export the bundle") as err:
        load_bundle(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("precision,state_dtype", [("fp32", "float16"), ("fp16-all", "float32"),
                                                   ("int8", "float16")])
def test_state_dtype_must_match_the_precision(every_precision, precision, state_dtype):
    raw = json.loads((every_precision["fp32"] / contract.RUNTIME_JSON).read_text())
    raw.update(precision=precision, state_dtype=state_dtype)
    with pytest.raises(contract.BundleError, match="'state_dtype'.*keeps its state in"):
        contract.RuntimeConfig.from_dict(raw)


def test_contract_is_a_leaf_without_torch():
    import ast

    tree = ast.parse(open(contract.__file__).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] if node.level == 0 else "." for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module != "__future__"}
    assert imported and imported <= set(sys.stdlib_module_names), imported


def test_contract_page_generator_writes_where_told(tmp_path):
    target = tmp_path / "contract.md"
    done = subprocess.run([sys.executable, "-m", "t2r_export.contract", str(target)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert target.read_text() == contract.render_markdown() + "\n"

def test_contract_page_generator_needs_a_target(capsys):
    assert contract.main([]) == 2 and "usage" in capsys.readouterr().err


def test_state_parts_drive_names_and_sizes():
    shape = contract.StateShape(2, 3, 4, 5, 7)
    names = [s.name for s in contract.graph_inputs(shape)[2:]]
    assert names == [past for past, _ in contract.state_pairs(2)]
    assert contract.state_nbytes(shape) == 4 * 2 * (3 * 4 * 5 + 3 * 4)
    extra = contract.StatePart("w", ("num_kv_heads", "head_dim"), "a window")
    wider = contract.StateShape(2, 3, 4, 5, 7, parts=(*contract.STATE_PARTS, extra))
    assert contract.state_nbytes(wider) == contract.state_nbytes(shape) + 4 * 2 * 3 * 5
    assert [s.name for s in contract.graph_outputs(wider)][-1] == "present_state.1.w"


def test_a_window_adds_its_parts_to_every_layer():
    shape = contract.StateShape(2, 3, 4, 5, 7, window=6)
    specs = {s.name: s.shape for s in contract.graph_inputs(shape)[2:]}
    assert list(specs)[:5] == [f"past_state.0.{p}" for p in ("s", "z", "wk", "wv", "wm")]
    assert specs["past_state.1.wk"] == (contract.BATCH, 3, 6, 5) and specs["past_state.1.wm"] == (contract.BATCH, 6)
    assert contract.state_nbytes(shape) == 4 * 2 * (3 * 4 * 5 + 3 * 4 + 2 * 3 * 6 * 5 + 6)
    assert contract.state_pairs(2, shape.parts)[-1] == ("past_state.1.wm", "present_state.1.wm")
    assert contract.StateShape(2, 3, 4, 5, 7).parts == contract.STATE_PARTS


@pytest.mark.parametrize("key,value,why", [("window", -1, "integer >= 0"), ("window", "4", "integer >= 0"),
                                           ("window", 10**6, "at most max_position"),
                                           ("feature_map", "softmax", "one of t2r, hedgehog")])
def test_window_and_feature_map_fields_are_typed(every_precision, key, value, why):
    raw = json.loads((every_precision["fp32"] / contract.RUNTIME_JSON).read_text())
    raw.update({key: value, "max_position": 128})
    with pytest.raises(contract.BundleError, match=f"field '{key}' = .* is wrong: expected .*{why}") as err:
        contract.RuntimeConfig.from_dict(raw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("source,claim", [("fp16", "fp16-all"), ("fp16-all", "fp16")])
def test_state_dtype_is_checked_against_the_graphs(every_precision, tmp_path, source, claim):
    import shutil

    import onnx

    path = shutil.copytree(every_precision[source], tmp_path / "b")
    for kind in contract.GRAPH_KINDS:
        # without the metadata only the graphs' real state dtype can tell the plans apart
        model = onnx.load(str(path / f"{kind}.onnx"))
        del model.metadata_props[:]
        onnx.save(model, str(path / f"{kind}.onnx"))
    raw = json.loads((path / contract.RUNTIME_JSON).read_text())
    raw.update(precision=claim, state_dtype=contract.STATE_DTYPES[claim])
    (path / contract.RUNTIME_JSON).write_text(json.dumps(raw))
    with pytest.raises(contract.BundleError, match=f"'state_dtype' = \"{contract.STATE_DTYPES[claim]}\" is wrong"):
        inspect_bundle(path)
    with pytest.raises(contract.BundleError, match="'state_dtype'"):
        OrtDecoder(path, threads=1)
