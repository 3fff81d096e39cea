"""One external-data weight file per bundle, shared by step.onnx and prefill.onnx.

    bundle/weights.bin    every weight of 1 KiB or more, once, 64-byte aligned, in write order
    bundle/weights.json   its index: name -> dtype, shape, offset, length (what the runtime maps)

Both graphs name their initializers with ONNX external data (``location`` = the plain file name,
``offset``, ``length``), so any ONNX tool loads them, and no graph proto ever holds the weights:
a model above protobuf's 2 GB limit exports like a small one. Weights are written one tensor at a
time as the graph builder asks for them (a second request for the same name reuses the first
entry), so an export never holds more than one converted tensor beside the torch model. The
index lets the torch-free runtime memory-map the file once and hand the same buffers to both ONNX
Runtime sessions (docs/sizes.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

WEIGHTS_FILE = "weights.bin"
WEIGHTS_INDEX = "weights.json"
INDEX_FORMAT = "t2r-export-weights"
ALIGNMENT = 64
# smaller tensors (norm scales, shape constants) stay inside the graph protos
MIN_EXTERNAL_BYTES = 1024
# 4-bit tensors (onnx TensorProto INT4 / UINT4): stored packed, two values a byte, as ONNX lays them
# out; numpy has no such dtype, so the runtime leaves them to ONNX Runtime to read (map_weights)
PACKED_DTYPES = {"int4": 22, "uint4": 21}


def external_tensor(name: str, dtype, shape, location: str, offset: int, length: int):
    """A TensorProto whose data lives at ``offset`` of ``location`` (beside the graph)."""
    from onnx import TensorProto, helper

    tensor = TensorProto()
    tensor.name = name
    packed = PACKED_DTYPES.get(dtype) if isinstance(dtype, str) else None
    tensor.data_type = packed or helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    tensor.dims.extend(int(n) for n in shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


class WeightFileError(ValueError):
    """The weight file could not be written (a full disk, a vanished folder): one line, the OS's reason."""


class WeightFile:
    """Appends tensors to ``path`` and returns external-data TensorProtos that point at them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.location = self.path.name
        self.entries: dict[str, dict] = {}
        # graph file -> the names it reads from here (the runtime hands each session exactly those)
        self.graphs: dict[str, list[str]] = {}
        self._graph: list[str] | None = None
        self._digests: dict[str, str] = {}
        try:
            self._file = open(self.path, "wb")
        except OSError as err:
            raise WeightFileError(f"cannot write {self.path}: {err.strerror or err}") from None

    def __enter__(self) -> WeightFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def begin_graph(self, file: str) -> None:
        """Tensors asked for from now on are read by graph ``file``."""
        self._graph = self.graphs.setdefault(file, [])

    @staticmethod
    def wants(shape, dtype) -> bool:
        return int(np.prod(shape)) * np.dtype(dtype).itemsize >= MIN_EXTERNAL_BYTES

    def tensor(self, name: str, load: Callable[[], np.ndarray], dtype, shape):
        """The external TensorProto for ``name``; ``load()`` runs only the first time a name is asked for."""
        dtype, shape = np.dtype(dtype), tuple(int(n) for n in shape)
        entry = self.entries.get(name)
        if entry is None:
            entry = self._append(name, np.asarray(load()).astype(dtype, copy=False), shape)
        elif entry["dtype"] != dtype.name or tuple(entry["shape"]) != shape:
            raise ValueError(f"weight {name!r} asked for as {dtype.name}{list(shape)} after being written as "
                             f"{entry['dtype']}{entry['shape']}")
        if self._graph is not None and name not in self._graph:
            self._graph.append(name)
        return external_tensor(name, dtype, shape, self.location, entry["offset"], entry["length"])

    def add_array(self, name: str, array: np.ndarray):
        """Store an already computed tensor (the int8 repack); the same name must carry the same bytes."""
        array = np.ascontiguousarray(array)
        digest = hashlib.sha256(memoryview(array).cast("B")).hexdigest()
        if name in self.entries and self._digests.get(name) != digest:
            raise ValueError(f"the graphs disagree on the value of weight {name!r}; it cannot be stored once")
        self._digests[name] = digest
        return self.tensor(name, lambda: array, array.dtype, array.shape)

    def add_packed(self, name: str, raw: bytes, dtype: str, shape):
        """Store a 4-bit tensor's packed bytes (``dtype`` in PACKED_DTYPES) under ``name``."""
        shape = tuple(int(n) for n in shape)
        if (int(np.prod(shape)) + 1) // 2 != len(raw):
            raise ValueError(f"weight {name!r}: {len(raw)} packed bytes do not hold {dtype}{list(shape)}")
        digest = hashlib.sha256(raw).hexdigest()
        entry = self.entries.get(name)
        if entry is None:
            self._digests[name] = digest
            entry = self._append(name, np.frombuffer(raw, np.uint8), (len(raw),))
            entry.update(dtype=dtype, shape=list(shape))
        elif self._digests.get(name) != digest or entry["dtype"] != dtype:
            raise ValueError(f"the graphs disagree on the value of weight {name!r}; it cannot be stored once")
        if self._graph is not None and name not in self._graph:
            self._graph.append(name)
        return external_tensor(name, dtype, shape, self.location, entry["offset"], entry["length"])

    def _append(self, name: str, array: np.ndarray, shape: tuple) -> dict:
        if array.shape != shape:
            raise ValueError(f"weight {name!r} has shape {list(array.shape)}, the graph expects {list(shape)}")
        array = np.ascontiguousarray(array)
        try:
            offset = self._file.tell()
            pad = -offset % ALIGNMENT
            if pad:
                self._file.write(b"\0" * pad)
                offset += pad
            self._file.write(memoryview(array).cast("B"))
        except OSError as err:
            raise WeightFileError(f"writing weight {name!r} to {self.path}: {err.strerror or err}") from None
        entry = {"dtype": array.dtype.name, "shape": list(shape), "offset": offset, "length": int(array.nbytes)}
        self.entries[name] = entry
        return entry

    def write_index(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path else self.path.with_name(WEIGHTS_INDEX)
        index = {"format": INDEX_FORMAT, "file": self.location, "alignment": ALIGNMENT, "graphs": self.graphs,
                 "tensors": self.entries}
        try:
            self._file.flush()
            path.write_text(json.dumps(index, indent=1) + "\n")
        except OSError as err:
            raise WeightFileError(f"writing {path}: {err.strerror or err}") from None
        return path


def repack_graphs(folder: Path, files: list[str], min_bytes: int = MIN_EXTERNAL_BYTES) -> None:
    """Move the big initializers of the graphs ``files`` in ``folder`` into one shared weights file.

    For graphs written by other tools (the int8 quantizer): equal names must carry equal values.
    External-data files the graphs referenced before are removed.
    """
    import onnx
    from onnx import numpy_helper

    folder = Path(folder)
    old_data: set[str] = set()
    with WeightFile(folder / WEIGHTS_FILE) as store:
        for file in files:
            store.begin_graph(file)
            header = onnx.load(str(folder / file), load_external_data=False)
            for tensor in header.graph.initializer:
                old_data.update(e.value for e in tensor.external_data if e.key == "location")
            del header
            model = onnx.load(str(folder / file), load_external_data=True)
            # scales and zero points stay in the graph: parsers and checkers read them as constants
            qdq_params = {name for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                          for name in node.input[1:]}
            kept = []
            for tensor in model.graph.initializer:
                packed = {code: dtype for dtype, code in PACKED_DTYPES.items()}.get(tensor.data_type)
                if packed is not None and len(tensor.raw_data) >= min_bytes:
                    kept.append(store.add_packed(tensor.name, tensor.raw_data, packed, tensor.dims))
                    continue
                array = numpy_helper.to_array(tensor)
                # int64 tensors are shapes, pads and indices, which shape inference reads from the proto
                if (array.nbytes >= min_bytes and array.dtype not in (object, np.int64)
                        and tensor.name not in qdq_params):
                    kept.append(store.add_array(tensor.name, array))
                else:
                    kept.append(numpy_helper.from_array(array, tensor.name))
            del model.graph.initializer[:]
            model.graph.initializer.extend(kept)
            onnx.save_model(model, str(folder / file))
            del model
        store.write_index()
    for name in old_data - {WEIGHTS_FILE}:
        if (folder / name).is_file():
            (folder / name).unlink()


def read_index(folder: str | Path) -> dict | None:
    """weights.json of a bundle folder, or None when the bundle keeps its weights inside the graphs."""
    path = Path(folder) / WEIGHTS_INDEX
    if not path.is_file():
        return None
    index = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT or Path(index.get("file", "")).name != index.get("file"):
        raise ValueError(f"{path} is not a weights index written by t2r-export (format {INDEX_FORMAT!r}, "
                         "a plain file name)")
    return index


def map_weights(folder: str | Path, index: dict) -> dict[str, np.ndarray]:
    """name -> read-only numpy view into the memory-mapped weights file (one mapping, no copies)."""
    path = Path(folder) / index["file"]
    size = path.stat().st_size
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    views = {}
    for name, entry in index["tensors"].items():
        if entry["dtype"] in PACKED_DTYPES:
            # ONNX Runtime reads these from the graph's external data itself
            continue
        end = entry["offset"] + entry["length"]
        if end > size:
            raise ValueError(f"{path.name} is {size} bytes; weight {name!r} needs bytes up to {end}")
        views[name] = mapped[entry["offset"]:end].view(np.dtype(entry["dtype"])).reshape(entry["shape"])
    return views
