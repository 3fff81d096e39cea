"""The engines folder of a bundle: ``engines/<kind>.<precision>.plan`` and ``engines/manifest.json``.

The manifest records the TensorRT version and the GPU the engines were built for and the sha256
of each source graph; :func:`check_manifest` refuses engines that cannot run here, saying how to
rebuild. Shared by the builder (which writes it) and the runner (which reads it); imports neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

ENGINE_DIR = "engines"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "t2r-export-engines"
MANIFEST_VERSION = 1


class EngineManifestError(ValueError):
    """The engines in a bundle do not match this TensorRT, this GPU or the bundle's graphs."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def engine_file(kind: str, precision: str) -> str:
    return f"{kind}.{precision}.plan"


def new_manifest(tensorrt_version: str, gpu_name: str, compute_capability: str) -> dict:
    return {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "tensorrt_version": tensorrt_version,
            "gpu": {"name": gpu_name, "compute_capability": compute_capability}, "engines": {}}


def read_manifest(bundle_dir: Path) -> dict:
    from ..runtime.bundle import resolve_inside

    path = Path(bundle_dir) / ENGINE_DIR / MANIFEST
    if not resolve_inside(bundle_dir, f"{ENGINE_DIR}/{MANIFEST}", "the engine manifest").is_file():
        raise EngineManifestError(f"{path} is missing: build engines with `t2r-export trt {bundle_dir} --fp16`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EngineManifestError(f"{path} is not valid JSON ({err}); rebuild with `t2r-export trt {bundle_dir}`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise EngineManifestError(f"{path} is not a t2r-export engine manifest")
    return manifest


def check_manifest(manifest: dict, precision: str | None, tensorrt_version: str, gpu_name: str,
                   compute_capability: str, bundle_dir: Path | None = None) -> dict:
    """The manifest entry for ``precision`` if its engines can run here; else EngineManifestError saying why."""
    where = f"{bundle_dir}/{ENGINE_DIR}" if bundle_dir else ENGINE_DIR
    rebuild = f"rebuild them here with `t2r-export trt {bundle_dir or 'BUNDLE'}" + \
              (f" --{precision}`" if precision in ("fp16", "int8") else "`")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise EngineManifestError(f"{where}/{MANIFEST} has format version {manifest.get('format_version')}, this "
                                  f"t2r-export reads {MANIFEST_VERSION}; {rebuild}")
    built_with = manifest.get("tensorrt_version")
    if built_with != tensorrt_version:
        raise EngineManifestError(f"the engines in {where} were built with TensorRT {built_with}, this is TensorRT "
                                  f"{tensorrt_version}; engines are not portable across TensorRT versions: {rebuild}")
    gpu = manifest.get("gpu", {})
    if gpu.get("compute_capability") != compute_capability:
        raise EngineManifestError(f"the engines in {where} were built for {gpu.get('name')} (compute capability "
                                  f"{gpu.get('compute_capability')}), this GPU is {gpu_name} ({compute_capability}); "
                                  f"engines are not portable across GPUs: {rebuild}")
    if gpu.get("name") != gpu_name:
        logger.warning("engines in %s were built on %s, running on %s (same compute capability %s)",
                       where, gpu.get("name"), gpu_name, compute_capability)
    engines = manifest.get("engines", {})
    if precision not in engines:
        have = ", ".join(engines) or "none"
        raise EngineManifestError(f"{where} has no {precision} engines (it has: {have}); build them with "
                                  f"`t2r-export trt {bundle_dir or 'BUNDLE'}" + (f" --{precision}`" if precision in
                                                                                   ("fp16", "int8") else "`"))
    entry = engines[precision]
    if bundle_dir is not None:
        from ..runtime.bundle import resolve_inside

        for graph in entry["graphs"].values():
            # the manifest is bundle content too: its engine and source names stay inside the bundle
            plan = resolve_inside(Path(bundle_dir) / ENGINE_DIR, graph["file"], f"{MANIFEST} engine file")
            if not plan.is_file():
                raise EngineManifestError(f"{where}/{graph['file']} is listed in the manifest but missing; {rebuild}")
            source = resolve_inside(bundle_dir, graph["onnx"], f"{MANIFEST} source graph")
            if source.is_file() and file_sha256(source) != graph["onnx_sha256"]:
                raise EngineManifestError(f"{graph['file']} was built from a different {graph['onnx']} (sha256 "
                                          f"mismatch): the bundle was re-exported since; {rebuild}")
    return entry


def engine_paths(bundle_dir: Path, precision: str | None, tensorrt_version: str, gpu_name: str,
                 compute_capability: str) -> tuple[str, dict[str, Path]]:
    """(precision, {kind: plan path}) of the bundle's engines, checked against this TensorRT and GPU.

    ``precision`` None takes the first one the manifest lists.
    """
    from ..runtime.bundle import resolve_inside

    manifest = read_manifest(bundle_dir)
    precision = precision or next(iter(manifest.get("engines", {})), None)
    entry = check_manifest(manifest, precision, tensorrt_version, gpu_name, compute_capability, bundle_dir=bundle_dir)
    return precision, {kind: resolve_inside(Path(bundle_dir) / ENGINE_DIR, g["file"], f"{MANIFEST} engine file")
                       for kind, g in entry["graphs"].items()}
