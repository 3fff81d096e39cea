"""What a bundle holds, read without torch: contract, precision, file sizes, weight sharing,
verification record and provenance (``t2r-export info BUNDLE``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import contract
from .bundle import Bundle, load_bundle
from .onnx_scan import scan_onnx


@dataclass
class BundleInfo:
    bundle: Bundle
    # file name (relative to the bundle) -> size in bytes, every regular file in the folder
    sizes: dict[str, int] = field(default_factory=dict)
    # external-data file -> the graph files whose tensors live in it
    shared: dict[str, list[str]] = field(default_factory=dict)

    @property
    def config(self) -> contract.RuntimeConfig:
        return self.bundle.config

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def bundle_info(path: str | Path) -> BundleInfo:
    """:func:`load_bundle` (every check of a closed folder), then sizes and external-data sharing."""
    bundle = load_bundle(path)
    root = bundle.path.resolve()
    info = BundleInfo(bundle)
    for file in sorted(root.rglob("*")):
        if file.is_file() and not file.is_symlink():
            info.sizes[str(file.relative_to(root))] = file.stat().st_size
    for kind in contract.GRAPH_KINDS:
        graph = bundle.graph_path(kind)
        for location in dict.fromkeys(location for _, location in scan_onnx(graph).external):
            data = str((graph.parent / location).resolve().relative_to(root))
            info.shared.setdefault(data, []).append(str(graph.relative_to(root)))
    return info
