"""Hostile bundles: a bundle is a closed folder, and its runtime.json must agree with its graphs.

Every case builds a bundle that names a file outside its folder (``..``, absolute paths, symlinks,
ONNX external-data locations, engine manifests) and runs it through every loader: the loader
must refuse it in one line, and no file outside the bundle may be opened, by Python or by ONNX
Runtime. The outside files are real graphs and a real ``secret``, so a loader that followed a name
would succeed instead of failing.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from t2r_export import contract
from t2r_export.cli import app
from t2r_export.runtime import BundleError, OrtDecoder, inspect_bundle, load_bundle
from toy_bundle import build_toy_bundle

runner = CliRunner()
OPENED: list[str] = []


def _audit(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, Path)):
        OPENED.append(str(args[0]))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy_bundle(tmp_path_factory.mktemp("toy") / "bundle")


@pytest.fixture
def world(toy, tmp_path):
    """tmp/a/b/bundle (the copy under test) and, outside it, tmp/other (a valid bundle) and tmp/secret."""
    bundle = shutil.copytree(toy, tmp_path / "a" / "b" / "bundle")
    shutil.copytree(toy, tmp_path / "other")
    (tmp_path / "secret").write_text("secret\n")
    return bundle


@pytest.fixture
def guarded(monkeypatch):
    """Records every path ONNX Runtime is asked to open; Python opens are recorded by the audit hook."""
    import onnxruntime

    sessions: list[str] = []
    real = onnxruntime.InferenceSession

    def session(path, *args, **kwargs):
        sessions.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    OPENED.clear()
    return sessions


def _edit_runtime(bundle: Path, **changes) -> None:
    raw = json.loads((bundle / "runtime.json").read_text())
    for key, value in changes.items():
        node, *path = key.split("__")
        target = raw
        for part in [node, *path][:-1]:
            target = target[part]
        target[[node, *path][-1]] = value
    (bundle / "runtime.json").write_text(json.dumps(raw))


def _externalize(bundle: Path, location: str, kind: str = "step", write_to: Path | None = None) -> None:
    """Move the biggest initializer of kind.onnx into external data at ``location`` (bytes at ``write_to``)."""
    path = bundle / f"{kind}.onnx"
    model = onnx.load(str(path))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = tensor.raw_data
    target = write_to or (path.parent / location)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())


# ---- the hostile bundles ----------------------------------------------------------------------------

def _name(field: str, value):
    return lambda b: _edit_runtime(b, **{field: value(b) if callable(value) else value})


def _symlink(name: str, target):
    def make(b: Path):
        (b / name).unlink(missing_ok=True)
        (b / name).symlink_to(target(b) if callable(target) else target)
    return make


def _symlinked_dir(b: Path):
    (b / "sub").symlink_to(b.parents[2] / "other", target_is_directory=True)
    _edit_runtime(b, graphs__step__file="sub/step.onnx")


def _chain(b: Path):
    (b / "hop").symlink_to(b.parents[2] / "other" / "step.onnx")
    (b / "step.onnx").unlink()
    (b / "step.onnx").symlink_to("hop")


def _nested_external(b: Path):
    model = onnx.load(str(b / "step.onnx"))
    value = onnx.helper.make_tensor("c", onnx.TensorProto.FLOAT, [1], [0.0])
    value.ClearField("float_data")
    value.data_location = onnx.TensorProto.EXTERNAL
    for key, text in (("location", "../../../secret"), ("offset", "0"), ("length", "4")):
        entry = value.external_data.add()
        entry.key, entry.value = key, text
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["unused_c"], value=value))
    (b / "step.onnx").write_bytes(model.SerializeToString())


HOSTILE = {
    # runtime.json names a file outside the folder
    "step-dotdot-other": _name("graphs__step__file", "../../../other/step.onnx"),
    "prefill-dotdot-other": _name("graphs__prefill__file", "../../../other/prefill.onnx"),
    "step-etc-passwd": _name("graphs__step__file", "../../../../../../../../etc/passwd"),
    "step-absolute-passwd": _name("graphs__step__file", "/etc/passwd"),
    "step-absolute-other": _name("graphs__step__file", lambda b: str(b.parents[2] / "other" / "step.onnx")),
    "step-inner-dotdot": _name("graphs__step__file", "sub/../../bundle/step.onnx"),
    "step-backslash": _name("graphs__step__file", "..\\..\\..\\other\\step.onnx"),
    "step-nul": _name("graphs__step__file", "step.onnx\u0000.txt"),
    "step-not-a-string": _name("graphs__step__file", ["step.onnx"]),
    "step-empty": _name("graphs__step__file", ""),
    # symlinks leaving the folder
    "step-symlink-out": _symlink("step.onnx", lambda b: b.parents[2] / "other" / "step.onnx"),
    "step-symlink-relative-out": _symlink("step.onnx", "../../../other/step.onnx"),
    "prefill-symlink-passwd": _symlink("prefill.onnx", "/etc/passwd"),
    "tokenizer-symlink-out": _symlink("tokenizer.json", lambda b: b.parents[2] / "other" / "tokenizer.json"),
    "tokenizer-config-symlink-secret": _symlink("tokenizer_config.json", lambda b: b.parents[2] / "secret"),
    "special-tokens-symlink-secret": _symlink("special_tokens_map.json", lambda b: b.parents[2] / "secret"),
    "runtime-json-symlink-out": _symlink("runtime.json", lambda b: b.parents[2] / "other" / "runtime.json"),
    "dangling-symlink-out": _symlink("step.onnx", lambda b: b.parents[2] / "nowhere.onnx"),
    "symlinked-directory": _symlinked_dir,
    "symlink-chain-out": _chain,
    # ONNX external data outside the folder
    "external-dotdot": lambda b: _externalize(b, "../outside.bin", write_to=b.parent / "outside.bin"),
    "external-etc-passwd": lambda b: _externalize(b, "../../../../../../../../etc/passwd",
                                                  write_to=b.parent / "unused.bin"),
    "external-absolute": lambda b: _externalize(b, str(b.parents[2] / "secret"), write_to=b.parent / "unused.bin"),
    "external-prefill-dotdot": lambda b: _externalize(b, "w/../../outside.bin", kind="prefill",
                                                      write_to=b.parent / "outside.bin"),
    "external-symlink-out": lambda b: (_externalize(b, "weights.bin", write_to=b.parent / "real.bin"),
                                       (b / "weights.bin").symlink_to(b.parent / "real.bin")),
    "external-in-node-attribute": _nested_external,
}


def _load(path):
    load_bundle(path)


def _inspect(path):
    inspect_bundle(path)


def _ort(path):
    OrtDecoder(path, threads=1)


def _quantize(path):
    from t2r_export.export.quantize import export_int8_bundle

    export_int8_bundle(path, path.parents[2] / "int8", prompts=["def f(x):\n    return x\n"],
                       cache_dir=path.parents[2] / "cache")


def _trt_build(path):
    from t2r_export.trt.build import build_engines

    build_engines(path)


def _cli(*args):
    def run(path):
        result = runner.invoke(app, [args[0], str(path), *args[1:]])
        assert result.exit_code in (1, 2), result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
        raise BundleError(result.output.strip())
    return run


LOADERS = {"load_bundle": _load, "inspect_bundle": _inspect, "OrtDecoder": _ort, "quantize": _quantize,
           "trt-build": _trt_build, "check": _cli("check"), "check-trt": _cli("check", "--trt"),
           "generate": _cli("generate", "--prompt", "def", "--max-new-tokens", "2")}


def _outside(bundle: Path, paths) -> list[str]:
    """The paths in ``paths`` that lie in the test's world (or /etc/passwd) but outside the bundle."""
    root, world = bundle.resolve(), bundle.parents[2].resolve()
    bad = []
    for p in paths:
        real = Path(p).resolve()
        if real == Path("/etc/passwd") or (world in real.parents and real != root and root not in real.parents):
            bad.append(str(real))
    return bad


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_bundle_is_refused_and_nothing_outside_is_opened(world, guarded, case, loader):
    HOSTILE[case](world)
    OPENED.clear()
    guarded.clear()
    with pytest.raises((BundleError, ValueError)) as err:
        LOADERS[loader](world)
    message = str(err.value)
    assert "\n" not in message.strip() and "Traceback" not in message
    assert any(word in message for word in ("outside the bundle", "file name inside the bundle")), message
    # refused before ONNX Runtime saw any graph, and Python opened nothing outside the bundle
    assert guarded == [] and _outside(world, OPENED) == []


@pytest.mark.parametrize("case", ["inside-subfolder", "symlink-inside", "external-inside"])
def test_files_inside_the_bundle_are_fine(world, case):
    if case == "inside-subfolder":
        (world / "graphs").mkdir()
        shutil.move(world / "step.onnx", world / "graphs" / "step.onnx")
        _edit_runtime(world, graphs__step__file="graphs/step.onnx")
    elif case == "symlink-inside":
        shutil.move(world / "prefill.onnx", world / "prefill.real.onnx")
        (world / "prefill.onnx").symlink_to("prefill.real.onnx")
    else:
        _externalize(world, "weights/step.bin")
    reference = OrtDecoder(world.parents[2] / "other", threads=1)
    with OrtDecoder(inspect_bundle(world), threads=1) as decoder, reference:
        for dec in (decoder, reference):
            dec.reset(1)
        ids, pos = np.array([[5]], np.int64), np.array([[0]], np.int64)
        np.testing.assert_array_equal(decoder.step(ids, pos).copy(), reference.step(ids, pos).copy())


# ---- runtime.json against the graphs' real dtypes ---------------------------------------------------

@pytest.mark.parametrize("precision,state_dtype,why", [
    ("fp16", "float32", "holds fp32 weights"), ("int8", "float32", "holds fp32 weights"),
    ("fp16-all", "float16", "holds fp32 weights")])
def test_precision_is_checked_against_the_graphs(world, precision, state_dtype, why):
    _edit_runtime(world, precision=precision, state_dtype=state_dtype)
    with pytest.raises(BundleError, match=why):
        inspect_bundle(world)
    with pytest.raises(BundleError, match=why):
        OrtDecoder(world, threads=1)


@pytest.mark.parametrize("claimed", ["fp16", "int8", "fp16-all"])
def test_graph_metadata_precision_must_match(world, claimed):
    model = onnx.load(str(world / "step.onnx"))
    onnx.helper.set_model_props(model, {contract.PRECISION_KEY: claimed})
    onnx.save(model, str(world / "step.onnx"))
    with pytest.raises(BundleError, match=f"'precision' = \"fp32\" is wrong: step.onnx was built for {claimed}"):
        load_bundle(world)


# ---- TensorRT engine manifests (checked without TensorRT) -------------------------------------------

def _manifest(bundle: Path, file: str, source: str = "step.onnx") -> dict:
    from t2r_export.trt import build

    (bundle / "engines").mkdir(exist_ok=True)
    manifest = build.new_manifest("10.0", "gpu", "8.9")
    manifest["engines"]["fp16"] = {"graphs": {"step": {"file": file, "onnx": source, "onnx_sha256": "0"}}}
    (bundle / "engines" / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.mark.parametrize("file,source", [("../../../../other/step.onnx", "step.onnx"), ("/etc/passwd", "step.onnx"),
                                         ("step.plan", "../../../other/step.onnx"), ("step.plan", "/etc/passwd")])
def test_engine_manifest_names_stay_inside(world, file, source):
    from t2r_export.trt.build import check_manifest, read_manifest

    (world / "engines").mkdir()
    (world / "engines" / "step.plan").write_bytes(b"plan")
    _manifest(world, file, source)
    OPENED.clear()
    with pytest.raises(BundleError, match="outside the bundle folder"):
        check_manifest(read_manifest(world), "fp16", "10.0", "gpu", "8.9", bundle_dir=world)
    assert _outside(world, OPENED) == []


def test_engine_manifest_symlinked_out_is_refused(world, tmp_path):
    from t2r_export.trt.build import read_manifest

    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "manifest.json").write_text("{}")
    (world / "engines").symlink_to(tmp_path / "engines", target_is_directory=True)
    with pytest.raises(BundleError, match="symlink leading outside"):
        read_manifest(world)
