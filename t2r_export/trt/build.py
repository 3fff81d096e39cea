"""Build TensorRT engines for a bundle's step and prefill graphs, with a manifest checked on load.

    bundle/engines/step.fp16.plan, prefill.fp16.plan, manifest.json

How each precision is built (docs/design.md#precision-plan, #tensorrt):
- TensorRT 10 (weak typing allowed): fp16 from the fp32 graphs by ``BuilderFlag.FP16`` with
  ``OBEY_PRECISION_CONSTRAINTS``; the layers named in the graph's ``t2r.fp32_island`` metadata (state,
  phi(q)·z, division, norms, RoPE tables, logits) are pinned to fp32 with ``layer.precision`` and
  ``set_output_type``. An fp16 bundle (``t2r-export onnx --precision fp16``) is built strongly typed.
- TensorRT 11 (strongly typed only, FP16/INT8 flags removed): no precision builder flag is ever
  set; fp16 comes from the fp16 bundle's already-typed graphs; an fp32 bundle with ``--fp16`` is
  refused with the command that makes one.
- TensorRT < 10 is refused (one line: TensorRT >= 10, JetPack >= 6.1).
- int8 always comes from an int8 bundle's Q/DQ graphs (explicit quantization; TensorRT removed
  implicit calibration in 11).
Engines are not portable across TensorRT versions or GPUs: the manifest names both, and
:func:`check_manifest` refuses a mismatch with a message saying how to rebuild.

The decisions (flags per version, profiles, island layers, manifest) are plain functions, tested
without TensorRT; only :func:`build_engines` imports it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .. import contract
from ..atomic import atomic_dir, atomic_write_text
from . import TensorRTUnavailable
from .cuda import check_tensorrt_version, gpu_info, import_tensorrt, tensorrt_major
from .manifest import (ENGINE_DIR, MANIFEST, EngineManifestError, check_manifest, engine_file, engine_paths,
                       file_sha256, new_manifest, read_manifest)

# re-exported: callers that build also check and locate what they built
__all__ = ["EngineBuildError", "EngineManifestError", "BuildPlan", "BuildResult", "build_engines", "check_manifest",
           "engine_paths", "plan_build", "profile_shapes", "read_manifest"]

logger = logging.getLogger(__name__)

# bundles TensorRT builds engines from (fp16-all exists to show the overflow, not to ship)
ENGINE_PRECISIONS = tuple(p for p in contract.PRECISIONS if p != "fp16-all" and p not in contract.WEIGHT_ONLY_PRECISIONS)
# a layer the ONNX parser adds for a node is named after it, later ones get "_<n>" appended
_AUX_SUFFIX = re.compile(r"_\d+$")


class EngineBuildError(RuntimeError):
    """TensorRT rejected a graph or failed to build an engine."""


@dataclass(frozen=True)
class BuildPlan:
    precision: str                       # fp32 | fp16 | int8: the engine file suffix
    strongly_typed: bool                 # types come from the ONNX graph (TensorRT 11, fp16 bundles)
    network_flags: tuple[str, ...]       # NetworkDefinitionCreationFlag names
    builder_flags: tuple[str, ...]       # BuilderFlag names to set
    cleared_flags: tuple[str, ...]       # BuilderFlag names to clear (if this TensorRT has them)
    constrain_island: bool               # pin the fp32 island layers (weakly typed fp16)
    notes: tuple[str, ...] = field(default=())


def plan_build(tensorrt_version: str, fp16: bool, int8: bool, bundle_precision: str) -> BuildPlan:
    """Flags and typing mode for one TensorRT version (>= 10), requested precision and bundle precision.

    TensorRT 11 builds strongly typed networks only: no FP16/INT8/precision-constraint builder
    flags (they are gone), no per-layer precision; the precision is the ONNX graph's own. Its
    STRONGLY_TYPED creation flag is ignored, so none is set.
    """
    check_tensorrt_version(tensorrt_version)
    major = tensorrt_major(tensorrt_version)
    if bundle_precision not in ENGINE_PRECISIONS:
        raise ValueError(f"bundle precision {bundle_precision!r} cannot be built; expected one of {ENGINE_PRECISIONS}")
    if int8 and bundle_precision != "int8":
        raise ValueError("--int8 builds from the Q/DQ graphs of an int8 bundle; make one with "
                         "`t2r-export onnx --precision int8` and pass that bundle")
    if fp16 and bundle_precision == "fp32" and major >= 11:
        raise ValueError(f"TensorRT {tensorrt_version} builds strongly typed networks only (BuilderFlag.FP16 is gone): "
                         "export an fp16 bundle with `t2r-export onnx --precision fp16` and build from it")
    typed = () if major >= 11 else ("STRONGLY_TYPED",)
    notes: tuple[str, ...] = ()
    if bundle_precision in contract.QDQ_WEIGHT_PRECISIONS:
        # the graph holds the precision (INT4 blocks dequantized to fp32): strongly typed, no precision
        # flags; fp32 matmuls stay fp32 (no TF32), as in an fp32 engine
        if fp16:
            raise ValueError(f"a {bundle_precision} bundle builds in the precision its graphs hold (strongly typed); "
                             "drop --fp16")
        return BuildPlan(bundle_precision, True, typed, (), ("TF32",), False)
    if bundle_precision == "int8":
        if major >= 11:
            if fp16:
                notes = ("TensorRT 11 is strongly typed: layers outside the Q/DQ pairs keep the graph's float32",)
            return BuildPlan("int8", True, typed, (), (), False, notes)
        flags = ("INT8",) + (("FP16", "OBEY_PRECISION_CONSTRAINTS") if fp16 else ())
        return BuildPlan("int8", False, (), flags, (), fp16, notes)
    if bundle_precision == "fp16":
        return BuildPlan("fp16", True, typed, (), (), False)
    if fp16:
        return BuildPlan("fp16", False, (), ("FP16", "OBEY_PRECISION_CONSTRAINTS"), (), True)
    # fp32 engines stay fp32: TF32 matmuls would keep only 10 mantissa bits
    if major >= 11:
        return BuildPlan("fp32", True, typed, (), ("TF32",), False)
    return BuildPlan("fp32", False, (), (), ("TF32",), False)


def profile_shapes(state_shape: contract.StateShape, kind: str, max_batch: int,
                   max_sequence: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) per input: batch 1..max_batch (opt mid), sequence 1..max_sequence for prefill."""
    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
    if max_sequence < 1:
        raise ValueError(f"--max-sequence must be >= 1, got {max_sequence}")
    ranges = {contract.BATCH: (1, (max_batch + 1) // 2, max_batch),
              contract.SEQUENCE: (1, (max_sequence + 1) // 2, max_sequence)}
    shapes = {}
    for spec in contract.graph_inputs(state_shape, kind):
        dims = [ranges[d] if isinstance(d, str) else (d, d, d) for d in spec.shape]
        shapes[spec.name] = tuple(tuple(d[i] for d in dims) for i in range(3))
    return shapes


def island_from_metadata(metadata: dict[str, str]) -> set[str]:
    """The fp32-island node names the emitter recorded in the model's metadata."""
    value = metadata.get(contract.ISLAND_KEY, "")
    return {name for name in value.split(",") if name}


def read_island(onnx_path: Path) -> set[str]:
    try:
        import onnx
    except ImportError:
        raise TensorRTUnavailable("reading the fp32 island needs the onnx package: `pip install onnx`") from None
    model = onnx.load(str(onnx_path), load_external_data=False)
    return island_from_metadata({p.key: p.value for p in model.metadata_props})


def island_layers(layer_names: Iterable[str], island: set[str]) -> list[str]:
    """TensorRT layer names that belong to island nodes: the node's name, or it plus an ``_<n>`` suffix."""
    return [name for name in layer_names if name in island or _AUX_SUFFIX.sub("", name) in island]


# ---- manifest --------------------------------------------------------------------------------------

def engine_entry(plan: BuildPlan, profiles: dict, sources: dict[str, tuple[str, str]], island_count: int = 0,
                 created: str | None = None) -> dict:
    """The manifest entry of one precision. ``sources``: kind -> (onnx file name, its sha256)."""
    return {
        "precision": plan.precision,
        "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "strongly_typed": plan.strongly_typed,
        "network_flags": list(plan.network_flags),
        "builder_flags": list(plan.builder_flags),
        "fp32_island_layers": island_count,
        "graphs": {
            kind: {"file": engine_file(kind, plan.precision), "onnx": sources[kind][0], "onnx_sha256": sources[kind][1],
                   "profile": {name: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])}
                               for name, s in profiles[kind].items()}}
            for kind in sources
        },
    }


# ---- building (needs TensorRT and a GPU) -----------------------------------------------------------

@dataclass
class BuildResult:
    bundle: Path
    precision: str
    files: dict[str, Path]
    manifest: dict
    notes: tuple[str, ...] = ()


def build_engines(bundle: str | Path, fp16: bool = False, int8: bool = False, max_batch: int = 8,
                  max_sequence: int = 2048, workspace_mb: int = 2048, timing_cache: Path | None = None,
                  progress: Callable[[str], None] | None = None) -> BuildResult:
    """Build step + prefill engines into ``bundle/engines`` (atomically) and update the manifest."""
    from ..runtime.bundle import BundleError, load_bundle

    progress = progress or (lambda message: logger.info(message))
    try:
        loaded = load_bundle(bundle)
    except BundleError as err:
        raise ValueError(str(err)) from None
    if loaded.config.target != "plain":
        raise ValueError(f"{bundle} is a --target {loaded.config.target} bundle (ONNX Runtime only); TensorRT builds "
                         "from the plain target: `t2r-export onnx --target plain`")
    if workspace_mb < 1:
        raise ValueError(f"--workspace must be >= 1 MB, got {workspace_mb}")
    trt = import_tensorrt()
    gpu_name, capability = gpu_info()
    plan = plan_build(trt.__version__, fp16, int8, loaded.config.precision)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    trt_logger = trt.Logger(trt.Logger.WARNING)
    built, profiles, sources, island_count = {}, {}, {}, 0
    for kind in contract.GRAPH_KINDS:
        onnx_path = loaded.graph_path(kind)
        profiles[kind] = profile_shapes(loaded.config.state_shape, kind, max_batch, max_sequence)
        island = read_island(onnx_path) if plan.constrain_island else set()
        progress(f"building the {kind} engine ({plan.precision}, TensorRT {trt.__version__}, {gpu_name})")
        built[kind], cache_bytes, pinned = _build_one(trt, trt_logger, onnx_path, plan, profiles[kind],
                                                      workspace_mb, cache_bytes, island)
        island_count += pinned
        sources[kind] = (onnx_path.name, file_sha256(onnx_path))
    manifest = _write_engines(Path(bundle), trt.__version__, gpu_name, capability, plan,
                              engine_entry(plan, profiles, sources, island_count), built)
    if timing_cache:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(timing_cache).with_name(f".{Path(timing_cache).name}.tmp-{os.getpid()}")
        tmp.write_bytes(cache_bytes)
        os.replace(tmp, timing_cache)
    files = {kind: Path(bundle) / ENGINE_DIR / engine_file(kind, plan.precision) for kind in built}
    return BuildResult(Path(bundle), plan.precision, files, manifest, plan.notes)


def _build_one(trt, trt_logger, onnx_path: Path, plan: BuildPlan, shapes: dict, workspace_mb: int,
               cache_bytes: bytes, island: set[str]) -> tuple[bytes, bytes, int]:
    builder = trt.Builder(trt_logger)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    # parse_from_file resolves external weight files next to the graph
    if not parser.parse_from_file(str(onnx_path)):
        error = parser.get_error(0) if parser.num_errors else None
        first = (error.desc() if hasattr(error, "desc") else str(error)) if error is not None else "no error reported"
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {first.splitlines()[0]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    for name in plan.builder_flags:
        if not hasattr(trt.BuilderFlag, name):
            raise EngineBuildError(f"this TensorRT ({trt.__version__}) has no BuilderFlag.{name}; "
                                   "its networks are strongly typed: build from a bundle of that precision")
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.cleared_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    pinned = _pin_island(trt, network, island) if plan.constrain_island else 0
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize()), pinned


def _pin_island(trt, network, island: set[str]) -> int:
    """Run the island layers in fp32 under OBEY_PRECISION_CONSTRAINTS; returns how many were pinned."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    names = set(island_layers((layer.name for layer in layers), island))
    floats = (trt.float32, trt.float16)
    pinned = 0
    for layer in layers:
        if layer.name not in names:
            continue
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        # shape and index layers (int64 outputs) have no float precision to pin
        if not any(out.dtype in floats for out in outputs):
            continue
        layer.precision = trt.float32
        for i, out in enumerate(outputs):
            if out.dtype in floats:
                layer.set_output_type(i, trt.float32)
        pinned += 1
    if island and not pinned:
        raise EngineBuildError("none of the graph's fp32-island nodes matched a TensorRT layer name; the fp16 "
                               "engine would run the state in fp16")
    return pinned


def _write_engines(bundle: Path, tensorrt_version: str, gpu_name: str, capability: str, plan: BuildPlan,
                   entry: dict, built: dict[str, bytes]) -> dict:
    """Replace ``bundle/engines`` in one rename: new plans, still-valid plans of other precisions, the manifest."""
    engines_dir = bundle / ENGINE_DIR
    manifest = new_manifest(tensorrt_version, gpu_name, capability)
    try:
        old = read_manifest(bundle)
    except EngineManifestError:
        old = None
    keep = old is not None and old.get("tensorrt_version") == tensorrt_version and old.get("gpu") == manifest["gpu"]
    # the engines folder belongs to the bundle's builds: each build replaces it, keeping valid plans
    with atomic_dir(engines_dir, overwrite=True, what="engines folder") as tmp:
        if keep:
            for precision, old_entry in old.get("engines", {}).items():
                files = [g["file"] for g in old_entry["graphs"].values()]
                if precision == plan.precision or not all((engines_dir / f).is_file() for f in files):
                    continue
                for f in files:
                    shutil.copy2(engines_dir / f, tmp / f)
                manifest["engines"][precision] = old_entry
        elif old is not None:
            logger.info("dropping engines built for TensorRT %s on %s", old.get("tensorrt_version"), old.get("gpu"))
        for kind, data in built.items():
            (tmp / engine_file(kind, plan.precision)).write_bytes(data)
        manifest["engines"][plan.precision] = entry
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest
