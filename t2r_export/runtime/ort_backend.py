"""ONNX Runtime backend: runs a bundle's prefill and step graphs with a state that never moves.

With IO binding (the default) two full state sets are allocated once per batch size on the
session's device. Step t reads set A as ``past_state.*`` and writes set B as ``present_state.*``;
step t+1 the reverse. Both parities get their own ``IOBinding``, bound once, so a decode step binds
nothing, allocates nothing and copies no state (docs/design.md#runtime). ``input_ids``/``position_ids`` are
small preallocated host buffers and ``logits`` lands in a preallocated host buffer.

``io_binding=False`` runs the plain ``session.run`` path (numpy state fed and returned each step):
slower, kept as the reference the fast path is tested and benchmarked against.

    with OrtDecoder(load_bundle("bundle/"), provider="cpu") as dec:
        dec.reset(batch=1)
        logits = dec.prefill_row(0, ids[None], np.arange(len(ids))[None])
        logits = dec.step(next_ids[:, None], positions[:, None])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import contract
from ..export.weight_file import map_weights, read_index
from .bundle import Bundle, BundleError, load_bundle, session_io
from .decoder import DecoderBase

PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    # ONNX Runtime's own TensorRT execution provider; `tensorrt` alone means our TrtDecoder (engines)
    "ort-tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
# where the state tensors live for each provider
_DEVICES = {"cpu": "cpu", "cuda": "cuda", "ort-tensorrt": "cuda"}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class ProviderError(ValueError):
    """The requested execution provider is unknown or missing from this onnxruntime build."""


def resolve_providers(provider: str) -> list[str]:
    """ORT execution-provider names for ``cpu`` | ``cuda`` | ``ort-tensorrt``, fallbacks after the first."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    wanted = PROVIDERS[provider]
    if wanted[0] not in available:
        raise ProviderError(f"provider {provider!r} needs onnxruntime's {wanted[0]}, which this onnxruntime "
                            f"build lacks (it has {', '.join(available)}); install onnxruntime-gpu or "
                            "the Jetson onnxruntime wheel")
    return [name for name in wanted if name in available]


def session_options(threads: int = 0, optimization: str = "all"):
    import onnxruntime as ort

    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = onnxruntime's default), got {threads}")
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise ValueError(f"unknown graph optimization level {optimization!r}; expected one of "
                         f"{', '.join(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = levels[optimization]
    return options


def shared_weights(folder: str | Path) -> tuple[dict, dict[str, list[str]]]:
    """(name -> OrtValue over the memory-mapped weights file, graph file -> names it reads), or two
    empty dicts for a bundle whose weights sit inside its graphs. Both sessions get the same OrtValues:
    the weights are in memory once, as file-backed pages the kernel can share and drop."""
    import onnxruntime as ort

    try:
        index = read_index(folder)
        if index is None:
            return {}, {}
        views = map_weights(folder, index)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BundleError(f"{Path(folder) / 'weights.json'}: {err}") from None
    return {name: ort.OrtValue.ortvalue_from_numpy(view) for name, view in views.items()}, index.get("graphs", {})


def open_sessions(folder: str | Path, files: dict[str, str], threads: int = 0, optimization: str = "all",
                  providers=("CPUExecutionProvider",), prepack: bool = False) -> dict:
    """One ONNX Runtime session per ``kind -> graph file`` of a bundle folder, sharing one copy of the weights.

    The returned dict also keeps the weight OrtValues alive (key ``"weights"``) as long as the sessions.
    ``prepack``: keep ONNX Runtime's weight prepacking (the weight-only plans need it, see below).
    """
    import onnxruntime as ort

    values, graphs = shared_weights(folder)
    sessions: dict = {"weights": values}
    for kind, file in files.items():
        options = session_options(threads, optimization)
        names = [name for name in graphs.get(file, []) if name in values]
        # add_initializer uses the OrtValue's buffer as it is (add_external_initializers would copy it)
        for name in names:
            options.add_initializer(name, values[name])
        if names and not prepack:
            # prepacking would keep a second, re-laid-out copy of every matmul weight per session
            options.add_session_config_entry("session.disable_prepacking", "1")
        path = Path(folder) / file
        try:
            sessions[kind] = ort.InferenceSession(str(path), options, providers=list(providers))
            # the session reads these buffers in place: it keeps them alive however the caller holds it
            sessions[kind].t2r_shared_weights = values
        except Exception as err:  # onnxruntime raises InvalidProtobuf, Fail, NoSuchFile, ...
            text = (str(err).strip() or type(err).__name__).splitlines()[0][:300]
            raise BundleError(f"{path.name} is not a loadable ONNX model: {text}") from None
    return sessions


class _StateSet:
    """One full set of state tensors for one batch size, as OrtValues on ``device``."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: str, dtype=np.float32):
        import onnxruntime as ort

        self.device = device
        self.dtype = np.dtype(dtype)
        self.shapes = shapes
        self.values = {}
        # on the CPU the OrtValues wrap these arrays (no copy), so zeroing is a numpy fill
        self.host: dict[str, np.ndarray] = {}
        for name, shape in shapes.items():
            array = np.zeros(shape, dtype=self.dtype)
            if device == "cpu":
                self.host[name] = array
                self.values[name] = ort.OrtValue.ortvalue_from_numpy(array)
            else:
                self.values[name] = ort.OrtValue.ortvalue_from_numpy(array, device, 0)

    def zero(self) -> None:
        for name, value in self.values.items():
            if self.device == "cpu":
                self.host[name].fill(0)
            else:
                value.update_inplace(np.zeros(self.shapes[name], dtype=self.dtype))

    def bind(self, binding, name: str, bound_as: str, as_input: bool, row: int | None = None,
             rows: int | None = None) -> None:
        """Bind tensor ``name`` (one batch row of it, or its first ``rows`` rows, in place) as ``bound_as``."""
        shape = self.shapes[name]
        ptr = self.values[name].data_ptr()
        if row is not None:
            ptr += row * int(np.prod(shape[1:])) * self.dtype.itemsize
            shape = (1, *shape[1:])
        elif rows is not None:
            shape = (rows, *shape[1:])
        bind = binding.bind_input if as_input else binding.bind_output
        bind(bound_as, self.device, 0, self.dtype, list(shape), ptr)

    def read(self, name: str) -> np.ndarray:
        return self.host[name].copy() if self.device == "cpu" else self.values[name].numpy()


class OrtDecoder(DecoderBase):
    """A bundle's prefill and step graphs on ONNX Runtime, with the recurrent state kept inside.

    Call :meth:`reset` with the batch size first. Logits returned by the IO-binding path are a
    read-only view of a buffer the next call overwrites; copy them to keep them.
    """

    def __init__(self, bundle: Bundle | str | Path, provider: str = "cpu", threads: int = 0,
                 optimization: str = "all", io_binding: bool = True):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.config = self.bundle.config
        self.provider = provider
        self.io_binding = io_binding
        providers = resolve_providers(provider)
        # bad threads / optimization values fail here, before any file is opened
        session_options(threads, optimization)
        self._device = _DEVICES[provider]
        self._pairs = contract.state_pairs(self.config.num_layers, self.config.state_shape.parts)
        files = {kind: self.config.graphs[kind].file for kind in contract.GRAPH_KINDS}
        # MatMulNBits runs its block kernels only on prepacked weights (the teacher's int4 step: 61 ms
        # without, 2.5 ms with); its packed copy is about as small as the blocks themselves. ONNX Runtime
        # fuses int4-qdq's DequantizeLinear + MatMul pairs into the same kernel
        prepack = self.config.precision in (*contract.WEIGHT_ONLY_PRECISIONS, *contract.QDQ_WEIGHT_PRECISIONS)
        sessions = open_sessions(self.bundle.path, files, threads, optimization, providers, prepack)
        self._weights = sessions.pop("weights")
        for kind, session in sessions.items():
            self.bundle.check_graph_io(kind, *session_io(session), session.get_modelmeta().custom_metadata_map)
        self._sessions = sessions
        self._batch = 0
        self._parity = 0

    # ---- lifecycle (context manager and close() come from DecoderBase) ------------------------

    def _release(self) -> None:
        self._sessions = {}
        self._weights = {}
        self._batch = 0
        for attr in ("_sets", "_zero_row", "_step_bindings", "_row_bindings", "_state", "_logits", "_logits_view",
                     "_ids", "_pos"):
            self.__dict__.pop(attr, None)

    def state_nbytes(self) -> int:
        """Bytes of one decode state at the current batch size (IO binding keeps two sets resident)."""
        return contract.state_nbytes(self.config.state_shape, self._batch, self.config.state_dtype)

    def reset(self, batch: int) -> None:
        """Zero the state for ``batch`` rows; buffers are reallocated only when the batch size changes."""
        batch = self._check_batch(batch)
        if batch != self._batch:
            self._allocate(batch)
        elif self.io_binding:
            self._sets[0].zero()
        else:
            for array in self._state.values():
                array.fill(0)
        self._parity = 0

    # ---- running ---------------------------------------------------------------------------

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """One token per row: ``input_ids``/``position_ids`` ``[B, 1]`` → logits ``[B, V]``."""
        input_ids, position_ids = self._check_ids(input_ids, position_ids, step=True)
        if not self.io_binding:
            return self._run_plain(contract.STEP, input_ids, position_ids)
        np.copyto(self._ids, input_ids)
        np.copyto(self._pos, position_ids)
        self._sessions[contract.STEP].run_with_iobinding(self._step_bindings[self._parity])
        self._parity ^= 1
        return self._logits_view

    def prefill(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """All rows continue from their current state over ``[B, T]`` tokens → logits ``[B, V]``.

        Rows share T, so use it for equal-length rows; :meth:`prefill_row` starts one row afresh.
        """
        input_ids, position_ids = self._check_ids(input_ids, position_ids, step=False)
        if not self.io_binding:
            return self._run_plain(contract.PREFILL, input_ids, position_ids)
        binding = self._prefill_binding(input_ids, position_ids)
        current, other = self._sets[self._parity], self._sets[self._parity ^ 1]
        for past, present in self._pairs:
            current.bind(binding, past, past, as_input=True)
            other.bind(binding, past, present, as_input=False)
        binding.bind_output("logits", "cpu", 0, np.float32, list(self._logits.shape), self._logits.ctypes.data)
        self._sessions[contract.PREFILL].run_with_iobinding(binding)
        self._parity ^= 1
        return self._logits_view

    def prefill_row(self, row: int, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Start row ``row`` afresh (zero state) with one prompt ``[1, T]`` → that row's logits ``[1, V]``.

        The prefill graph writes its state straight into that row of the current state set, so
        rows prefilled one by one (different lengths, no padding in the state) are already the
        batch state the step graph continues from: nothing is gathered or copied.
        """
        input_ids, position_ids = self._check_ids(input_ids, position_ids, step=False, rows=1)
        if not 0 <= row < self._batch:
            raise ValueError(f"row {row} is outside the batch of {self._batch}")
        if not self.io_binding:
            zero = {past: np.zeros((1, *a.shape[1:]), a.dtype) for past, a in self._state.items()}
            logits = self._run_plain(contract.PREFILL, input_ids, position_ids, state=zero, into_row=row)
            return logits
        binding = self._prefill_binding(input_ids, position_ids)
        current = self._sets[self._parity]
        for past, present in self._pairs:
            self._zero_row.bind(binding, past, past, as_input=True)
            current.bind(binding, past, present, as_input=False, row=row)
        vocab = self._logits.shape[1]
        binding.bind_output("logits", "cpu", 0, np.float32, [1, vocab], self._logits.ctypes.data + row * vocab * 4)
        self._sessions[contract.PREFILL].run_with_iobinding(binding)
        return self._logits_view[row:row + 1]

    # ---- rows as values: read, write, copy, and stepping only the first n rows ---------------------

    def read_row(self, row: int) -> dict[str, np.ndarray]:
        """Copies of row ``row``'s state, ``past_state.*`` name -> ``[1, ...]`` (see runtime/state.py)."""
        self._check_row(row)
        if not self.io_binding:
            return {name: array[row:row + 1].copy() for name, array in self._state.items()}
        current = self._sets[self._parity]
        if self._device == "cpu":
            return {past: current.host[past][row:row + 1].copy() for past, _ in self._pairs}
        return {past: current.read(past)[row:row + 1].copy() for past, _ in self._pairs}

    def write_row(self, row: int, state: dict[str, np.ndarray]) -> None:
        """Set row ``row``'s state from ``past_state.*`` arrays ``[1, ...]`` (dtype and shape checked)."""
        self._check_row(row)
        shapes = self._state_shapes(1)
        for name, shape in shapes.items():
            array = state.get(name)
            if array is None or array.shape != shape or array.dtype != np.dtype(self.config.state_dtype):
                found = "missing" if array is None else f"{array.dtype}{list(array.shape)}"
                raise ValueError(f"state tensor {name!r} is {found}, expected {self.config.state_dtype}{list(shape)}")
        if not self.io_binding:
            for name in shapes:
                self._state[name][row] = state[name][0]
            return
        current = self._sets[self._parity]
        for name in shapes:
            if self._device == "cpu":
                current.host[name][row] = state[name][0]
            else:
                full = current.read(name)
                full[row] = state[name][0]
                current.values[name].update_inplace(full)

    def copy_row(self, src: int, dst: int) -> None:
        """Row ``dst`` gets row ``src``'s state (a fork, or compacting the active rows)."""
        if src != dst:
            self.write_row(dst, self.read_row(src))

    def extend_row(self, row: int, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Row ``row`` continues from its current state over ``[1, T]`` tokens → its logits ``[1, V]``.

        What a restored state or a prefix-cache hit needs: only the tokens after the saved position
        are prefilled. The graph writes into a one-row scratch state, then the row takes it.
        """
        input_ids, position_ids = self._check_ids(input_ids, position_ids, step=False, rows=1)
        self._check_row(row)
        state = self.read_row(row)
        session = self._sessions[contract.PREFILL]
        names = [o.name for o in session.get_outputs()]
        results = dict(zip(names, session.run(None, {"input_ids": input_ids, "position_ids": position_ids, **state})))
        self.write_row(row, {past: results[present] for past, present in self._pairs})
        return results["logits"]

    def step_rows(self, rows: int, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """One step of the first ``rows`` rows only (``[rows, 1]`` ids) → their logits ``[rows, V]``.

        Rows are contiguous in the state buffers, so the first n rows of a set are a valid ``[n, ...]``
        tensor: a server keeps its active rows packed at the front (copy_row when one leaves) and
        steps exactly those, paying for n rows, not the capacity. Rows past ``rows`` are left stale.
        """
        self._require_open()
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or not 1 <= rows <= self._batch:
            raise ValueError(f"rows must be an integer in [1, {self._batch}] (the batch), got {rows!r}")
        rows = int(rows)
        if rows == self._batch:
            return self.step(input_ids, position_ids)
        input_ids, position_ids = self._check_ids(input_ids, position_ids, step=True, rows=rows)
        if not self.io_binding:
            session = self._sessions[contract.STEP]
            feed = {"input_ids": input_ids, "position_ids": position_ids,
                    **{name: array[:rows] for name, array in self._state.items()}}
            names = [o.name for o in session.get_outputs()]
            results = dict(zip(names, session.run(None, feed)))
            for past, present in self._pairs:
                self._state[past][:rows] = results[present]
            return results["logits"]
        binding = self._rows_binding(rows, self._parity)
        np.copyto(self._ids[:rows], input_ids)
        np.copyto(self._pos[:rows], position_ids)
        self._sessions[contract.STEP].run_with_iobinding(binding)
        self._parity ^= 1
        return self._logits_view[:rows]

    def read_state(self) -> dict[str, np.ndarray]:
        """Copies of the current state on the host, keyed by ``past_state.*`` name (for checks and debugging)."""
        if self.io_binding:
            current = self._sets[self._parity]
            return {past: current.read(past) for past, _ in self._pairs}
        return {name: array.copy() for name, array in self._state.items()}

    # ---- internals -------------------------------------------------------------------------

    def _check_row(self, row) -> None:
        self._require_open()
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < self._batch:
            raise ValueError(f"row {row!r} is outside the batch of {self._batch}")

    def _rows_binding(self, rows: int, parity: int):
        """The step binding over the first ``rows`` rows for one parity, made once and kept."""
        key = (rows, parity)
        binding = self._row_bindings.get(key)
        if binding is not None:
            return binding
        binding = self._sessions[contract.STEP].io_binding()
        vocab = self._logits.shape[1]
        for name, array in (("input_ids", self._ids), ("position_ids", self._pos)):
            binding.bind_input(name, "cpu", 0, np.int64, [rows, 1], array.ctypes.data)
        binding.bind_output("logits", "cpu", 0, np.float32, [rows, vocab], self._logits.ctypes.data)
        current, other = self._sets[parity], self._sets[parity ^ 1]
        for past, present in self._pairs:
            current.bind(binding, past, past, as_input=True, rows=rows)
            other.bind(binding, past, present, as_input=False, rows=rows)
        self._row_bindings[key] = binding
        return binding

    def _state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        specs = contract.graph_inputs(self.config.state_shape, contract.STEP)
        return {s.name: (batch, *s.shape[1:]) for s in specs if contract.is_state(s.name)}

    def _allocate(self, batch: int) -> None:
        import onnxruntime as ort

        self._batch = batch
        shapes = self._state_shapes(batch)
        if not self.io_binding:
            self._state = {name: np.zeros(shape, self.config.state_dtype) for name, shape in shapes.items()}
            return
        dtype = self.config.state_dtype
        self._sets = (_StateSet(shapes, self._device, dtype), _StateSet(shapes, self._device, dtype))
        self._zero_row = _StateSet(self._state_shapes(1), self._device, dtype)
        self._ids = np.zeros((batch, 1), np.int64)
        self._pos = np.zeros((batch, 1), np.int64)
        self._logits = np.zeros((batch, self.config.vocab_size), np.float32)
        self._logits_view = self._logits.view()
        self._logits_view.flags.writeable = False
        ids, pos, logits = (ort.OrtValue.ortvalue_from_numpy(a) for a in (self._ids, self._pos, self._logits))
        self._step_bindings = []
        for parity in (0, 1):
            binding = self._sessions[contract.STEP].io_binding()
            binding.bind_ortvalue_input("input_ids", ids)
            binding.bind_ortvalue_input("position_ids", pos)
            binding.bind_ortvalue_output("logits", logits)
            for past, present in self._pairs:
                binding.bind_ortvalue_input(past, self._sets[parity].values[past])
                binding.bind_ortvalue_output(present, self._sets[parity ^ 1].values[past])
            self._step_bindings.append(binding)
        self._row_bindings: dict[tuple[int, int], object] = {}

    def _prefill_binding(self, input_ids: np.ndarray, position_ids: np.ndarray):
        binding = self._sessions[contract.PREFILL].io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("position_ids", position_ids)
        return binding

    def _run_plain(self, kind: str, input_ids, position_ids, state=None, into_row: int | None = None):
        session = self._sessions[kind]
        feed = {"input_ids": input_ids, "position_ids": position_ids, **(state or self._state)}
        names = [o.name for o in session.get_outputs()]
        results = dict(zip(names, session.run(None, feed)))
        for past, present in self._pairs:
            if into_row is None:
                self._state[past] = results[present]
            else:
                self._state[past][into_row] = results[present][0]
        return results["logits"]
