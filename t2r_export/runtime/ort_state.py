"""The IO-binding side of the ONNX Runtime backend: state sets allocated once, and the bindings over them.

Two full state sets per batch size (set A read as ``past_state.*`` while set B is written as
``present_state.*``, then the reverse), or one where the graphs may write their new state over the
old (runtime/in_place.py), plus a set of zeros that prefills read as their initial
state. Bindings point ONNX Runtime at slices of those buffers (a row, the first n rows, rows
``[first, first + n)``), so a step or a prefill allocates no state and copies none
(docs/design.md#runtime). Torch-free.
"""

from __future__ import annotations

import numpy as np

from .. import contract


class StateSet:
    """One full set of state tensors for one batch size, as OrtValues on ``device``."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: str, dtype=np.float32):
        import onnxruntime as ort

        self.device = device
        self.dtype = np.dtype(dtype)
        self.shapes = shapes
        self.values = {}
        # on the CPU the OrtValues wrap these arrays (no copy), so zeroing is a numpy fill; np.zeros
        # maps untouched pages, so a row costs resident memory only once it is written
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

    def bind(self, binding, name: str, bound_as: str, as_input: bool, first: int = 0, rows: int | None = None) -> None:
        """Bind rows ``[first, first + rows)`` of tensor ``name`` (in place; all rows by default) as ``bound_as``."""
        shape = self.shapes[name]
        ptr = self.values[name].data_ptr() + first * int(np.prod(shape[1:])) * self.dtype.itemsize
        shape = (shape[0] - first if rows is None else rows, *shape[1:])
        bind = binding.bind_input if as_input else binding.bind_output
        bind(bound_as, self.device, 0, self.dtype, list(shape), ptr)

    def read(self, name: str) -> np.ndarray:
        return self.host[name].copy() if self.device == "cpu" else self.values[name].numpy()


class Bindings:
    """Every buffer and IO binding of one decoder at one batch size.

    ``sets[parity]`` is the current state; a step or a whole-batch prefill writes ``sets[parity ^ 1]``
    and the caller flips the parity. With ``in_place`` (graphs that may write their new state over
    the old one, runtime/in_place.py) both entries are the same set, so a row costs one state. Step
    bindings are made once per (active rows, parity) and kept; in place the two parities bind the
    same buffers and share one binding. A binding holds an OrtValue per input and output (about
    12 KB on the bundled model), so a server makes them all at start-up (:meth:`make_step_bindings`).
    ``logits`` is a host buffer the graphs write into; ``logits_view`` is its read-only view.
    """

    def __init__(self, sessions: dict, pairs, shapes: dict[str, tuple[int, ...]], device: str, dtype, vocab: int,
                 in_place: bool = False):
        import onnxruntime as ort

        self.sessions = sessions
        self.pairs = pairs
        self.batch = next(iter(shapes.values()))[0]
        first = StateSet(shapes, device, dtype)
        self.sets = (first, first) if in_place else (first, StateSet(shapes, device, dtype))
        # prefills start from these zeros; ONNX Runtime only reads them, so their pages stay unbacked
        self.zeros = StateSet(shapes, device, dtype)
        self.ids = np.zeros((self.batch, 1), np.int64)
        self.pos = np.zeros((self.batch, 1), np.int64)
        self.logits = np.zeros((self.batch, vocab), np.float32)
        self.logits_view = self.logits.view()
        self.logits_view.flags.writeable = False
        self._vocab = vocab
        self._ort_logits = ort.OrtValue.ortvalue_from_numpy(self.logits)
        self._ort_ids = ort.OrtValue.ortvalue_from_numpy(self.ids)
        self._ort_pos = ort.OrtValue.ortvalue_from_numpy(self.pos)
        self._steps: dict[tuple[int, int], object] = {}

    def step(self, rows: int, parity: int):
        """The step binding over the first ``rows`` rows, reading ``sets[parity]``."""
        if self.sets[0] is self.sets[1]:
            parity = 0
        binding = self._steps.get((rows, parity))
        if binding is not None:
            return binding
        binding = self.sessions[contract.STEP].io_binding()
        current, other = self.sets[parity], self.sets[parity ^ 1]
        if rows == self.batch:
            binding.bind_ortvalue_input("input_ids", self._ort_ids)
            binding.bind_ortvalue_input("position_ids", self._ort_pos)
            binding.bind_ortvalue_output("logits", self._ort_logits)
            for past, present in self.pairs:
                binding.bind_ortvalue_input(past, current.values[past])
                binding.bind_ortvalue_output(present, other.values[past])
        else:
            for name, array in (("input_ids", self.ids), ("position_ids", self.pos)):
                binding.bind_input(name, "cpu", 0, np.int64, [rows, 1], array.ctypes.data)
            self._bind_logits(binding, 0, rows)
            for past, present in self.pairs:
                current.bind(binding, past, past, as_input=True, rows=rows)
                other.bind(binding, past, present, as_input=False, rows=rows)
        self._steps[(rows, parity)] = binding
        return binding

    def make_step_bindings(self) -> int:
        """Make the step binding of every row count and parity now → how many bindings exist. A server
        steps every count from 1 to the batch as streams join and leave; made on first use, their
        memory would arrive with the first busy minutes and look like memory per stream."""
        for rows in range(1, self.batch + 1):
            for parity in (0, 1):
                self.step(rows, parity)
        return len(self._steps)

    def prefill_fresh(self, parity: int, first: int, input_ids: np.ndarray, position_ids: np.ndarray):
        """Rows ``[first, first + B)`` of ``sets[parity]`` start afresh from ``[B, T]`` tokens (in place)."""
        rows = input_ids.shape[0]
        binding = self._prefill_inputs(input_ids, position_ids)
        current = self.sets[parity]
        for past, present in self.pairs:
            self.zeros.bind(binding, past, past, as_input=True, rows=rows)
            current.bind(binding, past, present, as_input=False, first=first, rows=rows)
        self._bind_logits(binding, first, rows)
        return binding

    def prefill_all(self, parity: int, input_ids: np.ndarray, position_ids: np.ndarray):
        """Every row continues from ``sets[parity]`` over ``[batch, T]`` tokens into the other set."""
        binding = self._prefill_inputs(input_ids, position_ids)
        current, other = self.sets[parity], self.sets[parity ^ 1]
        for past, present in self.pairs:
            current.bind(binding, past, past, as_input=True)
            other.bind(binding, past, present, as_input=False)
        self._bind_logits(binding, 0, self.batch)
        return binding

    def _prefill_inputs(self, input_ids: np.ndarray, position_ids: np.ndarray):
        binding = self.sessions[contract.PREFILL].io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("position_ids", position_ids)
        return binding

    def _bind_logits(self, binding, first: int, rows: int) -> None:
        binding.bind_output("logits", "cpu", 0, np.float32, [rows, self._vocab],
                            self.logits.ctypes.data + first * self._vocab * 4)
