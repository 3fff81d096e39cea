"""Load a bundle directory and check its runtime.json against the ONNX graphs it ships.

A bundle is what ``t2r-export onnx`` writes: ``step.onnx``, ``prefill.onnx``, ``tokenizer.json``
(+ ``tokenizer_config.json``) and ``runtime.json``, read through :class:`contract.RuntimeConfig`.
A bundle is a closed folder: every file it names (graphs, their external data, the tokenizer,
TensorRT engines) must resolve inside it after symlinks, checked by :func:`resolve_inside` before
anything opens the file (docs/design.md#closed-bundle). Everything here is torch-free; ``onnx`` is
used when importable, otherwise graph I/O is read from an ONNX Runtime session.

Every problem is a :class:`BundleError` whose message is one line naming the file or the
runtime.json field, what was expected and what was found.
"""

from __future__ import annotations

import json
import re
import dataclasses
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from .. import contract
# BundleError, GraphEntry and RuntimeConfig are re-exported: runtime users import them from here
from ..contract import (RUNTIME_JSON, TOKENIZER_CONFIG_JSON, TOKENIZER_FILES, TOKENIZER_JSON, BundleError,
                        GraphEntry, RuntimeConfig, field_error)
from .in_place import graph_updates_in_place
from .onnx_scan import ScanError, scan_onnx

_PAST_RE = re.compile(r"past_state\.(\d+)\.(\w+)")
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bfloat16)": "bfloat16"}
# onnx TensorProto data types that tell a graph's weight precision apart
_INT8_TYPES, _FLOAT16_TYPE, _INT4_TYPES = {2, 3}, 10, {21, 22}
# weight-only plans store their blocks as uint8; int4-qdq as onnx INT4
_WEIGHT_FAMILY = {"fp32": "fp32", "fp16": "fp16", "fp16-all": "fp16", "int8": "int8", "int4": "int8", "int8-wo": "int8",
                  "int4-qdq": "int4"}


__all__ = ["Bundle", "BundleError", "GraphEntry", "RuntimeConfig", "TensorInfo", "check_closed", "inspect_bundle",
           "load_bundle", "read_graph_io", "resolve_inside", "session_io"]


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output as the graph declares it; dynamic axes are str or None."""

    name: str
    dtype: str
    shape: tuple


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its folder, its typed runtime.json and its graph files, all checked inside it."""

    path: Path
    config: RuntimeConfig
    # both graphs may write every new state over the old one (runtime/in_place.py), from the loader's scan
    updates_in_place: bool = False

    def file(self, name: str, what: str | None = None) -> Path:
        """The real path of ``name`` inside the bundle; BundleError if it leads outside (docs/design.md#closed-bundle)."""
        return resolve_inside(self.path, name, what or name)

    def graph_path(self, kind: str) -> Path:
        return self.file(self.config.graphs[kind].file, f"runtime.json field 'graphs.{kind}.file'")

    @property
    def tokenizer_path(self) -> Path:
        return self.file(TOKENIZER_JSON)

    def load_tokenizer(self):
        """The bundle's ``tokenizers.Tokenizer``."""
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as err:  # tokenizers raises its own Exception type
            raise BundleError(f"{self.path / TOKENIZER_JSON} is not a readable tokenizer: {_first_line(err)}") from None

    def tokenizer_config(self) -> dict:
        path = self.file(TOKENIZER_CONFIG_JSON)
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BundleError(f"{self.path / TOKENIZER_CONFIG_JSON} is not valid JSON: {err}") from None

    def check_graph_io(self, kind: str, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo],
                       metadata: dict[str, str] | None = None) -> None:
        """Raise BundleError when runtime.json contradicts the graph's real inputs/outputs (and precision)."""
        _check_graph_io(self.config, kind, list(inputs), list(outputs))
        claimed = (metadata or {}).get(contract.PRECISION_KEY)
        if claimed is not None and claimed != self.config.precision:
            raise field_error("precision", self.config.precision,
                              f"{self.config.graphs[kind].file} was built for {claimed}")


def resolve_inside(root: str | Path, name: Any, what: str) -> Path:
    """``root/name`` with symlinks resolved, or BundleError when it would leave ``root``.

    The one place that keeps a bundle a closed folder: a name must be relative, without ``..``, and
    still inside the folder after symlinks. Nothing is opened here, and nothing outside is ever opened.
    """
    root = Path(root)
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise BundleError(f"{what} = {json.dumps(name, default=str)[:80]} is not a file name inside the bundle")
    pure = PurePosixPath(name)
    if pure.is_absolute() or Path(name).is_absolute() or ".." in pure.parts:
        raise BundleError(f"{what} names {name!r}, outside the bundle folder {root}; a bundle may only name "
                          "files inside its folder")
    real_root = root.resolve()
    target = (real_root / pure).resolve()
    if target != real_root and real_root not in target.parents:
        raise BundleError(f"{what} {name!r} is a symlink leading outside the bundle folder {root}; a bundle may "
                          "only name files inside its folder")
    return target


def load_bundle(path: str | Path) -> Bundle:
    """Read and type-check ``runtime.json``; check every file it names exists inside the bundle folder.

    Every loader (runtime, ``check``, ``trt``, the quantizer, ``info``) comes through here. The graphs'
    I/O is checked by the backend against the session it creates (or by :func:`inspect_bundle`), so a
    large graph is not parsed twice; their external-data locations and weight dtypes are checked here.
    """
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle directory {path} does not exist")
    if not path.is_dir():
        raise BundleError(f"bundle {path} is not a directory (expected the directory `t2r-export onnx` wrote)")
    runtime_json = resolve_inside(path, RUNTIME_JSON, RUNTIME_JSON)
    if not runtime_json.is_file():
        raise BundleError(f"{path / RUNTIME_JSON} is missing; is {path} a bundle written by `t2r-export onnx`?")
    try:
        config = RuntimeConfig.read(runtime_json)
    except BundleError as err:
        raise BundleError(f"{path}: {err}") from None
    bundle = Bundle(path=path, config=config)
    scans = check_closed(bundle)
    pairs = contract.state_pairs(config.num_layers, config.state_shape.parts)
    return dataclasses.replace(bundle, updates_in_place=all(graph_updates_in_place(scan, pairs)
                                                            for scan in scans.values()))


def check_closed(bundle: Bundle) -> dict:
    """Every file the bundle names exists inside its folder: graphs, their external data, the tokenizer.
    Returns each graph's scan (runtime/onnx_scan.py) by kind."""
    scans = {}
    for name in TOKENIZER_FILES:
        bundle.file(name)
    if not bundle.tokenizer_path.is_file():
        raise BundleError(f"{bundle.path / TOKENIZER_JSON} is missing; the bundle needs its tokenizer")
    for kind, entry in bundle.config.graphs.items():
        graph = bundle.graph_path(kind)
        if not graph.is_file():
            raise BundleError(f"runtime.json field 'graphs.{kind}.file' names {entry.file}, "
                              f"which is missing from {bundle.path}")
        try:
            scan = scan_onnx(graph)
        except (ScanError, OSError) as err:
            raise BundleError(f"{entry.file} is not a readable ONNX model: {err}") from None
        for tensor, location in scan.external:
            data = resolve_inside(graph.parent, location, f"{entry.file}: external data of '{tensor}'")
            if data != bundle.path.resolve() and bundle.path.resolve() not in data.parents:
                raise BundleError(f"{entry.file}: external data of '{tensor}' ({location!r}) lies outside the "
                                  "bundle folder")
            if not data.is_file():
                raise BundleError(f"{entry.file}: external data file {location!r} of '{tensor}' is missing "
                                  f"from {bundle.path}")
        _check_weight_precision(bundle.config, entry.file, scan.initializer_types, scan.metadata)
        scans[kind] = scan
    return scans


def _check_weight_precision(config: RuntimeConfig, file: str, types, metadata: dict[str, str]) -> None:
    """runtime.json's precision against the dtypes the graph's weights really have."""
    claimed = metadata.get(contract.PRECISION_KEY)
    if claimed is not None and claimed != config.precision:
        raise field_error("precision", config.precision, f"{file} was built for {claimed}")
    found = ("int8" if _INT8_TYPES & set(types) else "int4" if _INT4_TYPES & set(types)
             else "fp16" if _FLOAT16_TYPE in types else "fp32")
    if _WEIGHT_FAMILY[config.precision] != found:
        raise field_error("precision", config.precision, f"{file} holds {found} weights")


def inspect_bundle(path: str | Path) -> Bundle:
    """:func:`load_bundle`, then check runtime.json against both graphs (with ``onnx`` when importable)."""
    bundle = load_bundle(path)
    for kind in contract.GRAPH_KINDS:
        inputs, outputs, opset = read_graph_io(bundle.graph_path(kind))
        bundle.check_graph_io(kind, inputs, outputs)
        if opset is not None and opset != bundle.config.opset:
            raise field_error("opset", bundle.config.opset, f"{bundle.config.graphs[kind].file} imports opset {opset}")
    return bundle


def read_graph_io(graph: Path) -> tuple[list[TensorInfo], list[TensorInfo], int | None]:
    """(inputs, outputs, default-domain opset or None) of an ONNX file, without its external data."""
    try:
        import onnx
    except ImportError:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises several unrelated exception types
            raise BundleError(f"{graph.name} is not a loadable ONNX model: {_first_line(err)}") from None
        inputs, outputs = session_io(session)
        return inputs, outputs, None
    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception as err:  # protobuf DecodeError and friends
        raise BundleError(f"{graph.name} is not a readable ONNX model: {_first_line(err)}") from None
    if not model.graph.output:
        raise BundleError(f"{graph.name} is not a readable ONNX model: it has no graph outputs")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return ([_onnx_value_info(v) for v in model.graph.input if v.name not in _initializer_names(model)],
            [_onnx_value_info(v) for v in model.graph.output], opset)


def session_io(session) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Inputs and outputs of an ``onnxruntime.InferenceSession`` as TensorInfo."""
    def convert(args):
        return [TensorInfo(a.name, _ORT_TYPES.get(a.type, a.type), tuple(a.shape)) for a in args]

    return convert(session.get_inputs()), convert(session.get_outputs())


def _check_graph_io(config: RuntimeConfig, kind: str, inputs: list[TensorInfo], outputs: list[TensorInfo]) -> None:
    entry = config.graphs[kind]
    layers = {int(m.group(1)) for t in inputs if (m := _PAST_RE.fullmatch(t.name))}
    graph_layers = max(layers) + 1 if layers else 0
    if graph_layers != config.num_layers:
        raise field_error("num_layers", config.num_layers,
                           f"{entry.file} has state inputs for {graph_layers} layers")
    for direction, listed, real in (("inputs", entry.inputs, inputs), ("outputs", entry.outputs, outputs)):
        real_names = {t.name for t in real}
        if set(listed) != real_names:
            raise BundleError(f"runtime.json field 'graphs.{kind}.{direction}' does not match {entry.file}: it lists "
                              f"{sorted(set(listed) - real_names)} that the graph lacks and omits "
                              f"{sorted(real_names - set(listed))} that the graph has")
    shape = config.state_shape
    in_specs, out_specs = config.graph_specs(kind)
    for direction, specs, real in (("input", in_specs, inputs), ("output", out_specs, outputs)):
        by_name = {t.name: t for t in real}
        missing = [s.name for s in specs if s.name not in by_name]
        extra = sorted(set(by_name) - {s.name for s in specs})
        if missing or extra:
            raise BundleError(f"{entry.file} does not follow the graph contract: missing {direction}s {missing}, "
                              f"unexpected {direction}s {extra}")
        for spec in specs:
            _check_tensor(config, entry.file, direction, spec, by_name[spec.name])
    expected_bytes = contract.state_nbytes(shape, state_dtype=config.state_dtype)
    if config.state_bytes_per_sequence is not None and config.state_bytes_per_sequence != expected_bytes:
        raise field_error("state_bytes_per_sequence", config.state_bytes_per_sequence,
                           f"{entry.file}'s state tensors hold {expected_bytes} bytes per sequence")


def _check_tensor(config: RuntimeConfig, file: str, direction: str, spec: contract.TensorSpec,
                  found: TensorInfo) -> None:
    part = "logits" if spec.name == "logits" else spec.name.rsplit(".", 1)[-1]
    # which runtime.json field each static axis reflects
    axis_fields = {1: "vocab_size"} if part == "logits" else {
        i + 1: axis for p in config.state_shape.parts if p.name == part for i, axis in enumerate(p.axes)}
    if found.dtype != spec.dtype:
        if "state" in spec.name:
            raise field_error("state_dtype", config.state_dtype, f"{file} {direction} '{spec.name}' is {found.dtype}")
        raise BundleError(f"{file} {direction} '{spec.name}' is {found.dtype}, expected {spec.dtype}")
    if len(found.shape) != len(spec.shape):
        raise BundleError(f"{file} {direction} '{spec.name}' has shape {_fmt(found.shape)}, "
                          f"expected {_fmt(spec.shape)}")
    for axis, (want, got) in enumerate(zip(spec.shape, found.shape)):
        if isinstance(want, int) and isinstance(got, int) and want != got:
            name = axis_fields.get(axis)
            if name is None:
                raise BundleError(f"{file} {direction} '{spec.name}' has shape {_fmt(found.shape)}, "
                                  f"expected {_fmt(spec.shape)}")
            raise field_error(name, getattr(config, name), f"{file} {direction} '{spec.name}' has shape "
                               f"{_fmt(found.shape)}, so {name} is {got}")


def _fmt(shape: Sequence) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def _initializer_names(model) -> set[str]:
    return {init.name for init in model.graph.initializer}


def _onnx_value_info(value) -> TensorInfo:
    from onnx import helper

    tensor = value.type.tensor_type
    try:
        dtype = str(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except (KeyError, ValueError):
        dtype = f"onnx-type-{tensor.elem_type}"
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
    return TensorInfo(value.name, dtype, dims)
