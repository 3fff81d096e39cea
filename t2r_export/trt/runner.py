"""TensorRT backend for the decode runtime: the ``OrtDecoder`` interface over a bundle's engines.

    with TrtDecoder("bundle/", precision="fp16", cuda_graphs=True) as dec:
        result = generate(dec, bundle.load_tokenizer(), ["def main("], max_new_tokens=64)

Design (docs/design.md#tensorrt), kept straightforward on purpose:
- two full state sets live on the device; step t reads set A as ``past_state.*`` and writes set B
  as ``present_state.*``, step t+1 the reverse. Each parity has its own execution context with
  every address bound once, so a step binds nothing and copies no state;
- ``input_ids``/``position_ids`` stay int64 (TensorRT 10 takes int64 inputs) in small pinned host
  buffers; a step is: copy ids/positions in, ``execute_async_v3``, copy logits out, synchronize;
- ``cuda_graphs=True`` captures that sequence once per parity (two graphs) and replays it;
- the prefill engine writes its state straight into one row of the current set (``prefill_row``),
  exactly like the ONNX Runtime backend.

Loaders build, runners run: this module never imports the builder. It is given its engine files,
or finds them through the bundle's manifest (``trt/manifest.py``); TensorRT and cuda-python come
lazily from ``trt/cuda.py``. Written against the documented TensorRT 10 Python API (TensorRT >= 10,
JetPack >= 6.1).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .. import contract
from ..runtime.bundle import Bundle, load_bundle
from ..runtime.decoder import DecoderBase
from .cuda import cuda_call, gpu_info, import_cudart, import_tensorrt
from .manifest import engine_paths


class _DeviceBuffer:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.ptr = int(cuda_call(import_cudart().cudaMalloc(max(nbytes, 1))))

    def free(self) -> None:
        if self.ptr:
            cuda_call(import_cudart().cudaFree(self.ptr))
            self.ptr = 0


class _PinnedArray:
    """A numpy array over page-locked host memory (copies from it can be captured in a CUDA graph)."""

    def __init__(self, shape: tuple[int, ...], dtype):
        dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * dtype.itemsize
        self.ptr = int(cuda_call(import_cudart().cudaMallocHost(max(self.nbytes, 1))))
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self.array = None
            cuda_call(import_cudart().cudaFreeHost(self.ptr))
            self.ptr = 0


class _StateSet:
    """One full set of device state tensors for one batch size, keyed by ``past_state.*`` name."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes
        self.buffers = {name: _DeviceBuffer(int(np.prod(shape)) * 4) for name, shape in shapes.items()}

    def ptr(self, name: str, row: int | None = None) -> int:
        offset = 0 if row is None else row * int(np.prod(self.shapes[name][1:])) * 4
        return self.buffers[name].ptr + offset

    def zero(self, stream) -> None:
        cudart = import_cudart()
        for buffer in self.buffers.values():
            cuda_call(cudart.cudaMemsetAsync(buffer.ptr, 0, buffer.nbytes, stream))

    def free(self) -> None:
        for buffer in self.buffers.values():
            buffer.free()


class TrtDecoder(DecoderBase):
    """A bundle's TensorRT step and prefill engines with the recurrent state kept on the GPU.

    Same interface as ``OrtDecoder``: ``reset(batch)``, ``prefill``, ``prefill_row``, ``step``,
    ``read_state``, ``state_nbytes``; logits are a read-only view the next call overwrites.
    """

    def __init__(self, bundle: Bundle | str | Path, precision: str | None = None, cuda_graphs: bool = False,
                 device: int = 0, engines: dict[str, Path] | None = None):
        """``engines``: {"step": plan, "prefill": plan} to run (e.g. fresh from the builder); None = the
        bundle's ``engines/`` folder, checked against its manifest for this TensorRT and GPU."""
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.config = self.bundle.config
        trt = import_tensorrt()
        cudart = import_cudart()
        cuda_call(cudart.cudaSetDevice(device))
        if engines is None:
            self.precision, plans = engine_paths(self.bundle.path, precision, trt.__version__, *gpu_info(device))
        else:
            missing = set(contract.GRAPH_KINDS) - set(engines)
            if missing:
                raise ValueError(f"engines must name a plan for each of {', '.join(contract.GRAPH_KINDS)}; "
                                 f"missing {', '.join(sorted(missing))}")
            self.precision, plans = precision or "unknown", {kind: Path(engines[kind]) for kind in contract.GRAPH_KINDS}
        self.cuda_graphs = cuda_graphs
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engines = {kind: self._load(path) for kind, path in plans.items()}
        self._stream = cuda_call(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
        self._pairs = contract.state_pairs(self.config.num_layers, self.config.state_shape.parts)
        self._check_io()
        self._batch = 0
        self._parity = 0
        self._owned: list = []
        self._graphs: list = []

    # ---- lifecycle (context manager and close() come from DecoderBase) ------------------------

    def _release(self) -> None:
        self._free_buffers()
        if getattr(self, "_stream", None) is not None:
            cuda_call(import_cudart().cudaStreamDestroy(self._stream))
            self._stream = None
        self._engines = {}

    def state_nbytes(self) -> int:
        """Bytes of one decode state at the current batch size (two sets are resident for ping-pong)."""
        return contract.state_nbytes(self.config.state_shape, self._batch)

    def reset(self, batch: int) -> None:
        batch = self._check_batch(batch)
        if batch != self._batch:
            self._allocate(batch)
        self._sets[0].zero(self._stream)
        cuda_call(import_cudart().cudaStreamSynchronize(self._stream))
        self._parity = 0

    # ---- running ---------------------------------------------------------------------------

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """One token per row: ``input_ids``/``position_ids`` ``[B, 1]`` → logits ``[B, V]``."""
        input_ids, position_ids = self._check_ids(input_ids, position_ids, step=True)
        cudart = import_cudart()
        np.copyto(self._ids.array, input_ids)
        np.copyto(self._pos.array, position_ids)
        if self.cuda_graphs:
            cuda_call(cudart.cudaGraphLaunch(self._graph_execs[self._parity], self._stream))
        else:
            self._enqueue_step(self._parity)
        cuda_call(cudart.cudaStreamSynchronize(self._stream))
        self._parity ^= 1
        return self._logits_view

    def prefill(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """All rows continue from their current state over ``[B, T]`` tokens → logits ``[B, V]``."""
        input_ids, position_ids = self._check_ids(input_ids, position_ids, step=False)
        current, other = self._sets[self._parity], self._sets[self._parity ^ 1]
        state = {past: current.ptr(past) for past, _ in self._pairs}
        present = {present: other.ptr(past) for past, present in self._pairs}
        self._run_prefill(input_ids, position_ids, state, present, self._batch, logits_row=0)
        self._parity ^= 1
        return self._logits_view

    def prefill_row(self, row: int, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Start row ``row`` afresh (zero state) with one prompt ``[1, T]``; its state lands in that row."""
        input_ids, position_ids = self._check_ids(input_ids, position_ids, step=False, rows=1)
        if not 0 <= row < self._batch:
            raise ValueError(f"row {row} is outside the batch of {self._batch}")
        current = self._sets[self._parity]
        state = {past: self._zero_row.ptr(past) for past, _ in self._pairs}
        present = {present: current.ptr(past, row) for past, present in self._pairs}
        self._run_prefill(input_ids, position_ids, state, present, 1, logits_row=row)
        return self._logits_view[row:row + 1]

    def read_state(self) -> dict[str, np.ndarray]:
        """Host copies of the current state, keyed by ``past_state.*`` name."""
        cudart = import_cudart()
        current = self._sets[self._parity]
        out = {}
        for past, _ in self._pairs:
            array = np.empty(current.shapes[past], np.float32)
            cuda_call(cudart.cudaMemcpy(array.ctypes.data, current.ptr(past), array.nbytes,
                                        cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
            out[past] = array
        return out

    # ---- internals -------------------------------------------------------------------------

    def _load(self, path: Path):
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise RuntimeError(f"TensorRT could not load {path}; rebuild it with `t2r-export trt {self.bundle.path}`")
        return engine

    def _check_io(self) -> None:
        """Every tensor of the contract is an engine I/O tensor of the expected dtype (int64 ids, fp32 state)."""
        trt = self._trt
        want = {"int64": trt.int64, "float32": trt.float32}
        for kind, engine in self._engines.items():
            names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
            specs = [*contract.graph_inputs(self.config.state_shape, kind),
                     *contract.graph_outputs(self.config.state_shape, kind)]
            for spec in specs:
                if spec.name not in names:
                    raise RuntimeError(f"the {kind} engine has no tensor {spec.name!r}; rebuild the engines")
                if engine.get_tensor_dtype(spec.name) != want[spec.dtype]:
                    raise RuntimeError(f"the {kind} engine's {spec.name!r} is {engine.get_tensor_dtype(spec.name)}, "
                                       f"expected {spec.dtype}")

    def _max_batch(self) -> int:
        engine = self._engines[contract.STEP]
        return int(engine.get_tensor_profile_shape("input_ids", 0)[2][0])

    def _allocate(self, batch: int) -> None:
        if batch > self._max_batch():
            raise ValueError(f"batch {batch} exceeds the engines' optimization profile (max {self._max_batch()}); "
                             f"rebuild with `t2r-export trt {self.bundle.path} --max-batch {batch}`")
        self._free_buffers()
        self._batch = batch
        specs = contract.graph_inputs(self.config.state_shape, contract.STEP)
        shapes = {s.name: (batch, *s.shape[1:]) for s in specs if s.name.startswith("past_state.")}
        self._sets = (_StateSet(shapes), _StateSet(shapes))
        self._zero_row = _StateSet({n: (1, *s[1:]) for n, s in shapes.items()})
        self._zero_row.zero(self._stream)
        self._ids = _PinnedArray((batch, 1), np.int64)
        self._pos = _PinnedArray((batch, 1), np.int64)
        self._logits = _PinnedArray((batch, self.config.vocab_size), np.float32)
        self._logits_view = self._logits.array.view()
        self._logits_view.flags.writeable = False
        self._d_ids, self._d_pos = _DeviceBuffer(batch * 8), _DeviceBuffer(batch * 8)
        self._d_logits = _DeviceBuffer(batch * self.config.vocab_size * 4)
        self._owned = [*self._sets, self._zero_row, self._ids, self._pos, self._logits,
                       self._d_ids, self._d_pos, self._d_logits]
        self._step_contexts = [self._bind_step(parity) for parity in (0, 1)]
        self._prefill_context = self._engines[contract.PREFILL].create_execution_context()
        self._graph_execs = []
        if self.cuda_graphs:
            self._graph_execs = [self._capture(parity) for parity in (0, 1)]

    def _bind_step(self, parity: int):
        """An execution context for one parity with every address set once."""
        context = self._engines[contract.STEP].create_execution_context()
        reads, writes = self._sets[parity], self._sets[parity ^ 1]
        context.set_input_shape("input_ids", (self._batch, 1))
        context.set_input_shape("position_ids", (self._batch, 1))
        context.set_tensor_address("input_ids", self._d_ids.ptr)
        context.set_tensor_address("position_ids", self._d_pos.ptr)
        context.set_tensor_address("logits", self._d_logits.ptr)
        for past, present in self._pairs:
            context.set_input_shape(past, reads.shapes[past])
            context.set_tensor_address(past, reads.ptr(past))
            context.set_tensor_address(present, writes.ptr(past))
        return context

    def _enqueue_step(self, parity: int) -> None:
        cudart = import_cudart()
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(cudart.cudaMemcpyAsync(self._d_ids.ptr, self._ids.ptr, self._ids.nbytes, h2d, self._stream))
        cuda_call(cudart.cudaMemcpyAsync(self._d_pos.ptr, self._pos.ptr, self._pos.nbytes, h2d, self._stream))
        if not self._step_contexts[parity].execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT failed to enqueue the step engine")
        cuda_call(cudart.cudaMemcpyAsync(self._logits.ptr, self._d_logits.ptr, self._logits.nbytes, d2h,
                                         self._stream))

    def _capture(self, parity: int):
        """One CUDA graph per parity: copies in, the step, logits out (TensorRT needs one warm-up enqueue)."""
        cudart = import_cudart()
        self._enqueue_step(parity)
        cuda_call(cudart.cudaStreamSynchronize(self._stream))
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda_call(cudart.cudaStreamBeginCapture(self._stream, mode))
        self._enqueue_step(parity)
        graph = cuda_call(cudart.cudaStreamEndCapture(self._stream))
        graph_exec = cuda_call(cudart.cudaGraphInstantiate(graph, 0))
        self._graphs.append((graph, graph_exec))
        return graph_exec

    def _run_prefill(self, input_ids, position_ids, state: dict, present: dict, rows: int, logits_row: int) -> None:
        cudart = import_cudart()
        limit = int(self._engines[contract.PREFILL].get_tensor_profile_shape("input_ids", 0)[2][1])
        if input_ids.shape[1] > limit:
            raise ValueError(f"a prefill of {input_ids.shape[1]} tokens exceeds the engine's profile (max {limit}); "
                             f"rebuild with `t2r-export trt {self.bundle.path} --max-sequence {input_ids.shape[1]}`")
        context = self._prefill_context
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        ids, pos = _DeviceBuffer(input_ids.nbytes), _DeviceBuffer(position_ids.nbytes)
        try:
            cuda_call(cudart.cudaMemcpyAsync(ids.ptr, input_ids.ctypes.data, input_ids.nbytes, h2d, self._stream))
            cuda_call(cudart.cudaMemcpyAsync(pos.ptr, position_ids.ctypes.data, position_ids.nbytes, h2d,
                                             self._stream))
            context.set_input_shape("input_ids", input_ids.shape)
            context.set_input_shape("position_ids", position_ids.shape)
            context.set_tensor_address("input_ids", ids.ptr)
            context.set_tensor_address("position_ids", pos.ptr)
            for name, ptr in state.items():
                context.set_input_shape(name, (rows, *self._sets[0].shapes[name][1:]))
                context.set_tensor_address(name, ptr)
            for name, ptr in present.items():
                context.set_tensor_address(name, ptr)
            vocab = self.config.vocab_size
            logits_ptr = self._d_logits.ptr + logits_row * vocab * 4
            context.set_tensor_address("logits", logits_ptr)
            if not context.execute_async_v3(int(self._stream)):
                raise RuntimeError("TensorRT failed to enqueue the prefill engine")
            cuda_call(cudart.cudaMemcpyAsync(self._logits.ptr + logits_row * vocab * 4, logits_ptr,
                                             rows * vocab * 4, d2h, self._stream))
            cuda_call(cudart.cudaStreamSynchronize(self._stream))
        finally:
            ids.free()
            pos.free()

    def _free_buffers(self) -> None:
        cudart = import_cudart()
        for graph, graph_exec in getattr(self, "_graphs", []):
            cuda_call(cudart.cudaGraphExecDestroy(graph_exec))
            cuda_call(cudart.cudaGraphDestroy(graph))
        self._graphs = []
        self._step_contexts, self._prefill_context = [], None
        for owned in getattr(self, "_owned", []):
            owned.free()
        self._owned = []
        self._batch = 0
