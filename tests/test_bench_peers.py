"""The bench's decode paths all implement the DecodePath protocol; the cached bundle's key covers the
whole exporter."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest

from t2r_export.bench import peers
from t2r_export.bench.run import exporter_fingerprint
from toy_bundle import build_toy_bundle

PEERS = [peers.T2ROrtPath, peers.FloorPath, peers.SoftmaxOrtPath, peers.GenaiPath, peers.TransformersPath,
         peers.T2RTorchPath]
PROTOCOL_METHODS = [name for name, value in vars(peers.DecodePath).items()
                    if callable(value) and not name.startswith("_")]


def test_the_protocol_declares_the_methods_the_bench_calls():
    assert sorted(PROTOCOL_METHODS) == ["close", "mark", "prefill", "reset", "rewind", "step", "sync"]


@pytest.mark.parametrize("cls", PEERS, ids=lambda c: c.__name__)
def test_every_peer_implements_every_protocol_method(cls):
    for name in PROTOCOL_METHODS:
        method = getattr(cls, name, None)
        assert callable(method), f"{cls.__name__} has no {name}()"
        declared = list(inspect.signature(getattr(peers.DecodePath, name)).parameters)
        params = list(inspect.signature(method).parameters)
        # the protocol's parameters come first; a peer may add optional ones (e.g. a chunk size)
        assert params[:len(declared)] == declared, (cls.__name__, name, params)


def test_an_opened_path_is_a_decode_path(tmp_path):
    bundle = build_toy_bundle(tmp_path / "b")
    path = peers.T2ROrtPath(bundle, threads=1)
    try:
        assert isinstance(path, peers.DecodePath)
        path.prefill([3, 4, 5])
        path.sync()
        assert path.step(6).shape[-1] > 0 and path.position == 4
    finally:
        path.close()


def _fake_package(root: Path) -> Path:
    (root / "export").mkdir(parents=True)
    for name in ("graph.py", "weights.py", "bundle.py"):
        (root / "export" / name).write_text(f"# {name}\n")
    (root / "contract.py").write_text("# the contract\n")
    return root


@pytest.mark.parametrize("change", ["edit bundle.py", "new file in export/", "rename a file", "contract.py"])
def test_the_fingerprint_covers_every_exporter_file(tmp_path, change):
    package = _fake_package(tmp_path / "pkg")
    before = exporter_fingerprint(package)
    assert exporter_fingerprint(package) == before
    if change == "edit bundle.py":
        (package / "export" / "bundle.py").write_text("# changed\n")
    elif change == "new file in export/":
        (package / "export" / "quantize.py").write_text("# new\n")
    elif change == "rename a file":
        shutil.move(package / "export" / "weights.py", package / "export" / "weights2.py")
    else:
        (package / "contract.py").write_text("# the contract, edited\n")
    assert exporter_fingerprint(package) != before


def test_the_default_fingerprint_reads_this_package():
    package = Path(peers.__file__).resolve().parents[1]
    assert exporter_fingerprint() == exporter_fingerprint(package)
