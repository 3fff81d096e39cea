"""Read what a bundle check needs from an ONNX file without the ``onnx`` package or its weights.

A small protobuf wire-format walker: the model's metadata, the data types of the main graph's
initializers, the main graph's nodes (op type, domain, input and output names) and the shapes of
its inputs and outputs, and the ``location`` of every tensor stored as external data (initializers, sparse
initializers, tensors in node attributes, subgraphs, functions, training graphs). Weight bytes are
skipped, never parsed; the file is memory-mapped, so a large graph costs no copy. The runtime uses
it before handing a graph to ONNX Runtime, which would otherwise open whatever file a location
names (docs/design.md#closed-bundle).
"""

from __future__ import annotations

import mmap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# field numbers of onnx.proto (ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto, ...)
_MODEL_GRAPH, _MODEL_METADATA, _MODEL_TRAINING, _MODEL_FUNCTIONS = 7, 14, 20, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_SPARSE = 1, 5, 11, 12, 15
_NODE_INPUT, _NODE_OUTPUT, _NODE_OP_TYPE, _NODE_ATTRIBUTE, _NODE_DOMAIN = 1, 2, 4, 5, 7
_VALUE_NAME, _VALUE_TYPE, _TYPE_TENSOR, _TENSOR_TYPE_SHAPE, _SHAPE_DIM = 1, 2, 1, 2, 1
_DIM_VALUE, _DIM_PARAM = 1, 2
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_EXTERNAL = 2, 8, 13
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_FUNCTION_NODE = 7
_TRAINING_INIT, _TRAINING_ALGO = 1, 2
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


class ScanError(ValueError):
    """The bytes are not a well-formed ONNX protobuf."""


@dataclass(frozen=True)
class ScanNode:
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class GraphScan:
    metadata: dict[str, str] = field(default_factory=dict)
    # onnx TensorProto data types of the main graph's initializers, counted
    initializer_types: Counter = field(default_factory=Counter)
    # (tensor name, location) of every tensor whose data lives in another file
    external: list[tuple[str, str]] = field(default_factory=list)
    # the main graph's nodes in file order (topological in a valid model)
    nodes: list[ScanNode] = field(default_factory=list)
    # the main graph's inputs and outputs: name -> dims (int, or str for a named dynamic axis),
    # None where the graph declares no shape
    shapes: dict[str, tuple | None] = field(default_factory=dict)
    # the main graph's output names
    outputs: list[str] = field(default_factory=list)


def scan_onnx(path: str | Path) -> GraphScan:
    """Scan an ONNX file; raises ScanError when it is empty or not a protobuf ModelProto."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            raise ScanError("the file is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            scan = GraphScan()
            # indexing an mmap gives ints and slicing gives bytes: no buffer export keeps it open
            _model(data, 0, size, scan)
    return scan


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise ScanError("truncated or malformed varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value) where value is an int (varint) or a (start, end) span."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ScanError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + length), pos + length
        else:
            raise ScanError(f"unsupported wire type {wire}")
        if pos > end:
            raise ScanError("a field runs past the end of its message")
        yield number, wire, value


def _spans(buf, start: int, end: int, wanted: int):
    for number, wire, value in _fields(buf, start, end):
        if number == wanted and wire == 2:
            yield value


def _model(buf, start: int, end: int, scan: GraphScan) -> None:
    for number, wire, value in _fields(buf, start, end):
        if wire != 2:
            continue
        if number == _MODEL_GRAPH:
            _graph(buf, *value, scan, main=True)
        elif number == _MODEL_METADATA:
            key, text = _entry(buf, *value)
            scan.metadata[key] = text
        elif number == _MODEL_FUNCTIONS:
            for node in _spans(buf, *value, _FUNCTION_NODE):
                _node(buf, *node, scan)
        elif number == _MODEL_TRAINING:
            for wanted in (_TRAINING_INIT, _TRAINING_ALGO):
                for graph in _spans(buf, *value, wanted):
                    _graph(buf, *graph, scan, main=False)


def _graph(buf, start: int, end: int, scan: GraphScan, main: bool) -> None:
    for number, wire, value in _fields(buf, start, end):
        if wire != 2:
            continue
        if number == _GRAPH_NODE:
            _node(buf, *value, scan)
            if main:
                scan.nodes.append(_node_io(buf, *value))
        elif number in (_GRAPH_INPUT, _GRAPH_OUTPUT) and main:
            name, shape = _value_info(buf, *value)
            scan.shapes[name] = shape
            if number == _GRAPH_OUTPUT:
                scan.outputs.append(name)
        elif number == _GRAPH_INITIALIZER:
            dtype = _tensor(buf, *value, scan)
            if main:
                scan.initializer_types[dtype] += 1
        elif number == _GRAPH_SPARSE:
            _sparse(buf, *value, scan)


def _node(buf, start: int, end: int, scan: GraphScan) -> None:
    for attribute in _spans(buf, start, end, _NODE_ATTRIBUTE):
        for number, wire, value in _fields(buf, *attribute):
            if wire != 2:
                continue
            if number in (_ATTR_T, _ATTR_TENSORS):
                _tensor(buf, *value, scan)
            elif number in (_ATTR_G, _ATTR_GRAPHS):
                _graph(buf, *value, scan, main=False)
            elif number in (_ATTR_SPARSE, _ATTR_SPARSES):
                _sparse(buf, *value, scan)


def _node_io(buf, start: int, end: int) -> ScanNode:
    strings: dict[int, list[str]] = {_NODE_INPUT: [], _NODE_OUTPUT: [], _NODE_OP_TYPE: [], _NODE_DOMAIN: []}
    for number, wire, value in _fields(buf, start, end):
        if wire == 2 and number in strings:
            strings[number].append(_text(buf, *value))
    return ScanNode("".join(strings[_NODE_OP_TYPE]), "".join(strings[_NODE_DOMAIN]),
                    tuple(strings[_NODE_INPUT]), tuple(strings[_NODE_OUTPUT]))


def _value_info(buf, start: int, end: int) -> tuple[str, tuple | None]:
    """(name, dims or None) of a ValueInfoProto holding a tensor type."""
    name, shape = "", None
    for number, wire, value in _fields(buf, start, end):
        if wire == 2 and number == _VALUE_NAME:
            name = _text(buf, *value)
        elif wire == 2 and number == _VALUE_TYPE:
            for tensor in _spans(buf, *value, _TYPE_TENSOR):
                for dims in _spans(buf, *tensor, _TENSOR_TYPE_SHAPE):
                    shape = tuple(_dim(buf, *dim) for dim in _spans(buf, *dims, _SHAPE_DIM))
    return name, shape


def _dim(buf, start: int, end: int) -> int | str | None:
    for number, wire, value in _fields(buf, start, end):
        if number == _DIM_VALUE and wire == 0:
            return value
        if number == _DIM_PARAM and wire == 2:
            return _text(buf, *value)
    return None


def _sparse(buf, start: int, end: int, scan: GraphScan) -> None:
    for number, wire, value in _fields(buf, start, end):
        if wire == 2 and number in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor(buf, *value, scan)


def _tensor(buf, start: int, end: int, scan: GraphScan) -> int:
    name, dtype, locations = "", 0, []
    for number, wire, value in _fields(buf, start, end):
        if number == _TENSOR_DATA_TYPE and wire == 0:
            dtype = value
        elif number == _TENSOR_NAME and wire == 2:
            name = _text(buf, *value)
        elif number == _TENSOR_EXTERNAL and wire == 2:
            key, text = _entry(buf, *value)
            if key == "location":
                locations.append(text)
    scan.external += [(name, location) for location in locations]
    return dtype


def _entry(buf, start: int, end: int) -> tuple[str, str]:
    key = text = ""
    for number, wire, value in _fields(buf, start, end):
        if wire == 2 and number == _ENTRY_KEY:
            key = _text(buf, *value)
        elif wire == 2 and number == _ENTRY_VALUE:
            text = _text(buf, *value)
    return key, text


def _text(buf, start: int, end: int) -> str:
    try:
        return buf[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise ScanError("a string field is not UTF-8") from None
