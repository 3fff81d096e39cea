"""The protobuf scan the bundle loader uses agrees with the onnx package, and refuses garbage."""

from collections import Counter

import onnx
import pytest
from onnx import external_data_helper

from t2r_export import contract
from t2r_export.runtime.onnx_scan import ScanError, scan_onnx
from toy_bundle import build_toy_bundle


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy_bundle(tmp_path_factory.mktemp("toy") / "bundle")


@pytest.mark.parametrize("kind", contract.GRAPH_KINDS)
def test_scan_matches_onnx(toy, tmp_path, kind):
    model = onnx.load(str(toy / f"{kind}.onnx"))
    onnx.helper.set_model_props(model, {contract.PRECISION_KEY: "fp32", "x": "é"})
    onnx.save_model(model, str(tmp_path / "g.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)
    plain = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    scan = scan_onnx(tmp_path / "g.onnx")
    expected = [(t.name, {e.key: e.value for e in t.external_data}["location"])
                for t in plain.graph.initializer if external_data_helper.uses_external_data(t)]
    assert expected and sorted(scan.external) == sorted(expected)
    assert scan.initializer_types == Counter(t.data_type for t in plain.graph.initializer)
    assert scan.metadata == {p.key: p.value for p in plain.metadata_props}


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "bad-wire-type"])
def test_scan_refuses_what_is_not_a_model(toy, tmp_path, damage):
    data = (toy / "step.onnx").read_bytes()
    path = tmp_path / "g.onnx"
    path.write_bytes({"empty": b"", "garbage": b"\xff" * 64, "truncated": data[: len(data) // 2],
                      "bad-wire-type": b"\x3b" + data}[damage])
    with pytest.raises(ScanError):
        scan_onnx(path)
