"""Static compatibility of an ONNX graph with TensorRT 10's ONNX parser, without TensorRT.

What a parse would reject (or a build could not resolve) is found by reading the graph:

- opset: the default domain must be in ``OPSET_RANGE`` (TensorRT 10.0, the oldest 10.x and close to
  JetPack 6.1's 10.3, parses opsets 9-20); a graph with INT4 weight blocks (the int4-qdq plan) needs
  opset 21 and passes with a warning (docs/design.md#precision-plan);
- domains: only the default ONNX domain; a ``com.microsoft`` node is an ONNX Runtime contrib op and
  the parser would look for a plugin of that name;
- operators: the support matrix of onnx-tensorrt's ``docs/operators.md`` (TensorRT 10.x), restricted to
  operators every 10.x release supports;
- per-operator constraints: parameters the parser needs at build time (Reshape's shape, Slice's
  starts/ends/axes/steps, Split's sizes, Unsqueeze/Squeeze/Reduce axes, CumSum's axis, TopK's K)
  must be constants; Q/DQ zero points must be zero and int8 (int4 for INT4 weights), scales
  positive; INT4 weights need per-block scales of 64 or 128 rows along one axis and an even last
  dimension; LayerNormalization returns ``Y`` only;
  MatMul runs on floating-point tensors only;
- dtypes: no float64, strings, complex or unsigned types inside the network, no bool graph outputs;
- dynamic dimensions: the step graph may vary only the batch axis, the prefill graph the batch axis
  and the sequence axis of ``input_ids``/``position_ids`` (one optimization profile covers them).

Each problem is a :class:`Finding` that names the node (name and op type) or the graph tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

from .. import contract

# TensorRT 10.0's parser: opsets 9-20 (later 10.x releases accept more; this is the portable range)
OPSET_RANGE = (9, 20)
# onnx-tensorrt is built against a fixed ONNX release; newer IR versions parse with a warning
MAX_IR_VERSION = 10
DEFAULT_DOMAINS = ("", "ai.onnx")

# onnx-tensorrt docs/operators.md, TensorRT 10.x: operators marked supported in every 10.x release
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GroupNormalization GRU
HardSigmoid HardSwish Hardmax Identity If InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression Not OneHot Or Pad ParametricSoftplus Pow
PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal
ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze
Upsample Where Xor
""".split())

# inputs the parser must read as constants at build time: op -> {input index: what it is}
CONSTANT_INPUTS = {
    "Reshape": {1: "shape"},
    "Slice": {1: "starts", 2: "ends", 3: "axes", 4: "steps"},
    "Split": {1: "split"},
    "Unsqueeze": {1: "axes"},
    "Squeeze": {1: "axes"},
    "CumSum": {1: "axis"},
    "TopK": {1: "K"},
    "OneHot": {1: "depth"},
    "QuantizeLinear": {1: "y_scale", 2: "y_zero_point"},
    "DequantizeLinear": {1: "x_scale", 2: "x_zero_point"},
    **{op: {1: "axes"} for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                 "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}
# element types TensorRT has no tensors for (float64 is cast down with clamping, which hides overflow)
UNSUPPORTED_DTYPES = {
    TensorProto.DOUBLE: "float64", TensorProto.STRING: "string", TensorProto.COMPLEX64: "complex64",
    TensorProto.COMPLEX128: "complex128", TensorProto.UINT16: "uint16", TensorProto.UINT32: "uint32",
    TensorProto.UINT64: "uint64", TensorProto.INT16: "int16",
}
FLOAT_DTYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
QUANTIZED_DTYPES = (TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4)
# INT4 weight-only blocks: the DequantizeLinear block_size attribute and INT4 need opset 21, above
# TensorRT 10.0's declared range; its parser sets no upper bound (it reads each op by the opset's
# rules) and has read INT4 DequantizeLinear, blocked by the scale's shape, since 10.0
INT4_OPSET = contract.QDQ_WEIGHT_OPSET
INT4_BLOCK_SIZES = contract.QDQ_BLOCK_SIZES


@dataclass(frozen=True)
class Finding:
    """One reason TensorRT's parser (or its build) would fail on a graph."""

    graph: str          # file name or graph name
    node: str           # node name, or the graph tensor / initializer name
    op: str             # op type, or "graph input" / "graph output" / "initializer" / "model"
    message: str
    severity: str = "error"     # "error" fails the check; "warning" is printed only

    def __str__(self) -> str:
        return f"{self.graph}: {self.op} '{self.node}': {self.message}"


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def graph_kind(model: onnx.ModelProto) -> str | None:
    """``step`` / ``prefill`` from the emitter's graph name (``t2r_step``), else None."""
    name = model.graph.name
    for kind in contract.GRAPH_KINDS:
        if name == f"t2r_{kind}":
            return kind
    return None


def check_model(model: onnx.ModelProto, kind: str | None = None, graph_name: str | None = None) -> list[Finding]:
    """Every finding for one graph; ``kind`` (step | prefill) enables the dynamic-dimension rules."""
    kind = kind or graph_kind(model)
    if kind is not None and kind not in contract.GRAPH_KINDS:
        raise ValueError(f"unknown graph kind {kind!r}; expected one of {contract.GRAPH_KINDS}")
    name = graph_name or model.graph.name or "graph"
    checker = _Checker(model, name)
    checker.check_versions()
    checker.check_nodes(model.graph)
    checker.check_dtypes()
    if kind is not None:
        checker.check_dynamic_dims(kind)
    return checker.findings


def check_file(path: str | Path, kind: str | None = None) -> list[Finding]:
    """:func:`check_model` on an ONNX file (external data is not loaded: only shapes and types matter)."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf DecodeError and friends
        raise ValueError(f"{path} is not a readable ONNX model: {str(err).strip().splitlines()[0][:200]}") from None
    return check_model(model, kind, graph_name=path.name)


def check_bundle(path: str | Path) -> list[Finding]:
    """Both graphs of a bundle directory (file names and kinds from its runtime.json)."""
    from ..runtime.bundle import load_bundle

    bundle = load_bundle(path)
    findings = []
    for kind in contract.GRAPH_KINDS:
        findings += check_file(bundle.graph_path(kind), kind)
    return findings


class _Checker:
    def __init__(self, model: onnx.ModelProto, name: str):
        self.model, self.name = model, name
        self.findings: list[Finding] = []
        self.initializers = {t.name: t for t in model.graph.initializer}
        graph_inputs = {v.name for v in model.graph.input}
        # an initializer that is also a graph input can be overridden at run time: not a constant
        self.constants: dict[str, TensorProto | None] = {
            n: t for n, t in self.initializers.items() if n not in graph_inputs}
        self.build_time = set(self.constants)
        self.dtypes = self._infer_dtypes()

    def add(self, node: str, op: str, message: str, severity: str = "error") -> None:
        self.findings.append(Finding(self.name, node, op, message, severity))

    # -- model level ---------------------------------------------------------------------------
    def check_versions(self) -> None:
        opset = next((o.version for o in self.model.opset_import if o.domain in DEFAULT_DOMAINS), None)
        low, high = OPSET_RANGE
        int4 = any(t.data_type == TensorProto.INT4 for t in self.model.graph.initializer)
        if int4 and opset == INT4_OPSET:
            self.add("<model>", "model", f"imports ONNX opset {opset} for its INT4 weight blocks; TensorRT 10.0's "
                                         f"parser declares opsets {low}-{high} but bounds none, and parses INT4 "
                                         "DequantizeLinear since 10.0 (an engine build is the real test)",
                     severity="warning")
        elif opset is None or not low <= opset <= high:
            self.add("<model>", "model", f"imports ONNX opset {opset}; TensorRT 10's parser reads opsets "
                                         f"{low}-{high} (re-export with opset {contract.OPSET})")
        if self.model.ir_version > MAX_IR_VERSION:
            self.add("<model>", "model", f"IR version {self.model.ir_version} is newer than TensorRT 10's parser "
                                         f"was built for ({MAX_IR_VERSION}); set model.ir_version lower",
                     severity="warning")

    def _infer_dtypes(self) -> dict[str, int]:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False)
        except Exception:  # noqa: BLE001 - inference is best effort; declared types still apply
            inferred = self.model
        dtypes = {}
        for value in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info):
            if value.type.HasField("tensor_type"):
                dtypes[value.name] = value.type.tensor_type.elem_type
        for name, tensor in self.initializers.items():
            dtypes[name] = tensor.data_type
        return dtypes

    # -- nodes -----------------------------------------------------------------------------------
    def check_nodes(self, graph: onnx.GraphProto, outer: str = "") -> None:
        for index, node in enumerate(graph.node):
            label = node.name or f"{outer}#{index} -> {node.output[0] if node.output else '?'}"
            self._check_node(node, label)
            self._track_constants(node)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    self.check_nodes(sub, outer=f"{label}/")

    def _check_node(self, node, label: str) -> None:
        op = node.op_type
        if node.domain not in DEFAULT_DOMAINS:
            what = ("an ONNX Runtime contrib op" if node.domain == "com.microsoft"
                    else f"a custom op of domain {node.domain!r}")
            self.add(label, op, f"is {what}; TensorRT's parser would need a plugin named {op!r} "
                                "(export plain ONNX ops only)")
            return
        if op not in SUPPORTED_OPS:
            self.add(label, op, "is not in TensorRT 10's ONNX operator support matrix (onnx-tensorrt operators.md)")
            return
        for index, what in CONSTANT_INPUTS.get(op, {}).items():
            if index < len(node.input) and node.input[index]:
                self._check_constant_input(node, label, index, what)
        if op in ("QuantizeLinear", "DequantizeLinear"):
            self._check_qdq(node, label)
        elif op == "LayerNormalization" and any(node.output[1:]):
            self.add(label, op, "uses the Mean/InvStdDev outputs; TensorRT supports only the first output Y")
        elif op == "MatMul":
            for name in node.input:
                dtype = self.dtypes.get(name)
                if dtype is not None and dtype not in FLOAT_DTYPES + QUANTIZED_DTYPES:
                    self.add(label, op, f"multiplies {_dtype_name(dtype)} input {name!r}; TensorRT's MatMul "
                                        "takes float32/float16/bfloat16 (or Q/DQ int8)")
        elif op == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to in UNSUPPORTED_DTYPES:
                self.add(label, op, f"casts to {UNSUPPORTED_DTYPES[to]}, which TensorRT has no tensors for")
        elif op == "Constant" and any(a.name in ("sparse_value", "value_string", "value_strings")
                                      for a in node.attribute):
            self.add(label, op, "holds a sparse or string value; TensorRT supports dense numeric constants only")

    def _check_constant_input(self, node, label: str, index: int, what: str) -> None:
        name = node.input[index]
        if node.op_type == "Reshape":
            # shapes computed from Shape ops are resolved by TensorRT's shape-tensor machinery at build time
            if name not in self.build_time:
                self.add(label, node.op_type, f"takes its {what} from runtime tensor {name!r}; it must be an "
                                              "initializer (or computed from Shape ops) so TensorRT resolves it")
        elif name not in self.constants:
            self.add(label, node.op_type, f"takes its {what} from runtime tensor {name!r}; TensorRT 10's parser "
                                          "needs it as an initializer (constant)")

    def _check_qdq(self, node, label: str) -> None:
        zero_point = self.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero_point is not None:
            if zero_point.data_type not in QUANTIZED_DTYPES:
                self.add(label, node.op_type, f"quantizes to {_dtype_name(zero_point.data_type)}; TensorRT's "
                                              "explicit quantization is signed int8 (or fp8, int4) only")
            elif zero_point.data_type != TensorProto.FLOAT8E4M3FN and numpy_helper.to_array(zero_point).any():
                self.add(label, node.op_type, "has a non-zero zero point; TensorRT quantization is symmetric "
                                              "(zero point must be 0)")
        scale = self.constants.get(node.input[1]) if len(node.input) > 1 else None
        if scale is not None and scale.data_type not in FLOAT_DTYPES:
            self.add(label, node.op_type, f"has a {_dtype_name(scale.data_type)} scale; expected float32/float16")
        elif scale is not None and scale.data_type == TensorProto.FLOAT:
            if not (numpy_helper.to_array(scale, base_dir="") > 0).all():
                self.add(label, node.op_type, "has a scale that is not positive; TensorRT's parser requires every "
                                              "scale coefficient to be > 0")
        data = self.initializers.get(node.input[0])
        if node.op_type == "DequantizeLinear" and data is not None and data.data_type == TensorProto.INT4:
            self._check_int4_blocks(node, label, list(data.dims), list(scale.dims) if scale is not None else None)

    def _check_int4_blocks(self, node, label: str, dims: list[int], scale_dims: list[int] | None) -> None:
        """INT4 weights: per-block scales, one blocked axis among the last two, blocks of 64 or 128."""
        if scale_dims is None or len(scale_dims) != len(dims):
            self.add(label, node.op_type, "dequantizes INT4 without per-block scales (the scale's rank must equal "
                                          "the weight's); TensorRT takes INT4 only in blocks")
            return
        blocked = [axis for axis, (d, s) in enumerate(zip(dims, scale_dims)) if d != s]
        if len(blocked) != 1 or dims[blocked[0]] % scale_dims[blocked[0]]:
            self.add(label, node.op_type, f"has INT4 weight {dims} with scales {scale_dims}; TensorRT needs exactly "
                                          "one blocked axis, split into whole blocks")
            return
        axis, block = blocked[0], dims[blocked[0]] // scale_dims[blocked[0]]
        if block not in INT4_BLOCK_SIZES or axis < len(dims) - 2:
            self.add(label, node.op_type, f"has INT4 blocks of {block} along axis {axis}; TensorRT takes blocks of "
                                          f"{' or '.join(map(str, INT4_BLOCK_SIZES))} along one of the last two axes")
        if dims[-1] % 2:
            self.add(label, node.op_type, f"has INT4 weight {dims} with an odd last dimension; TensorRT packs INT4 "
                                          "two to a byte along it")

    def _track_constants(self, node) -> None:
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            for out in node.output:
                self.constants[out] = value
                self.build_time.add(out)
        elif node.op_type in ("Identity", "Cast") and inputs and inputs[0] in self.constants:
            self.constants[node.output[0]] = None
            self.build_time.add(node.output[0])
        elif node.op_type in ("Shape", "Size") or (inputs and all(i in self.build_time for i in inputs)):
            self.build_time.update(o for o in node.output if o)

    # -- dtypes ------------------------------------------------------------------------------------
    def check_dtypes(self) -> None:
        producers = {out: node for node in self.model.graph.node for out in node.output}
        graph_io = {v.name for v in (*self.model.graph.input, *self.model.graph.output)}
        for name, dtype in self.dtypes.items():
            bad = UNSUPPORTED_DTYPES.get(dtype)
            if bad is None and dtype == TensorProto.UINT8 and name not in graph_io and name not in self.initializers:
                bad = "uint8 (TensorRT allows uint8 only as a network input or output)"
            if bad is None:
                continue
            if name in self.initializers:
                self.add(name, "initializer", f"is {bad}; TensorRT has no such tensors (store it as float32)")
            elif name in producers:
                node = producers[name]
                self.add(node.name or name, node.op_type, f"produces {bad} tensor {name!r}; TensorRT has no such tensors")
            else:
                self.add(name, "graph input", f"is {bad}; TensorRT has no such tensors")
        for value in self.model.graph.output:
            if value.type.tensor_type.elem_type == TensorProto.BOOL:
                self.add(value.name, "graph output", "is bool; return a numeric tensor (bool bindings are a "
                                                     "common source of binding-size mistakes)")

    # -- dynamic dimensions ----------------------------------------------------------------------------
    def check_dynamic_dims(self, kind: str) -> None:
        ids = {"input_ids", "position_ids"}
        for role, values in (("graph input", self.model.graph.input), ("graph output", self.model.graph.output)):
            for value in values:
                if value.name in self.initializers:
                    continue
                tensor = value.type.tensor_type
                if not tensor.HasField("shape"):
                    self.add(value.name, role, "has no shape (unknown rank); TensorRT needs the rank of every I/O tensor")
                    continue
                allowed = {0: contract.BATCH}
                if kind == contract.PREFILL and role == "graph input" and value.name in ids:
                    allowed[1] = contract.SEQUENCE
                for axis, dim in enumerate(tensor.shape.dim):
                    if dim.HasField("dim_value") and dim.dim_value > 0:
                        continue
                    label = repr(dim.dim_param) if dim.dim_param else "unnamed"
                    if axis not in allowed:
                        self.add(value.name, role, f"axis {axis} is dynamic ({label}); the {kind} graph may vary only "
                                                   f"{' and '.join(allowed.values())} (one optimization profile)")
                    elif not dim.dim_param:
                        self.add(value.name, role, f"axis {axis} is dynamic but unnamed; name it {allowed[axis]!r} so "
                                                   "equal dimensions are tied together", severity="warning")


def _dtype_name(dtype: int) -> str:
    try:
        return TensorProto.DataType.Name(dtype).lower()
    except ValueError:
        return f"type {dtype}"
