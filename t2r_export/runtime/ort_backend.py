"""ONNX Runtime backend: runs a bundle's prefill and step graphs with a state that never moves.

With IO binding (the default) two full state sets are allocated once per batch size on the
session's device (runtime/ort_state.py). Step t reads set A as ``past_state.*`` and writes set B as
``present_state.*``; step t+1 the reverse. On the CPU, graphs whose every state update may run in
place (runtime/in_place.py: the plain T2R graphs) get one set that each step reads and overwrites,
so a row costs one state, not two. Bindings are made once and kept, so a decode step binds
nothing, allocates nothing and copies no state (docs/design.md#runtime). ``input_ids``/``position_ids``
are small preallocated host buffers and ``logits`` lands in a preallocated host buffer. Prefills write
their rows' state straight into the current set; :meth:`OrtDecoder.prefill_rows` prefills several
equal-length prompts into consecutive rows in one call.

``io_binding=False`` runs the plain ``session.run`` path (numpy state fed and returned each step):
slower, kept as the reference the fast path is tested and benchmarked against.

    with OrtDecoder(load_bundle("bundle/"), provider="cpu") as dec:
        dec.reset(batch=1)
        logits = dec.prefill_row(0, ids[None], np.arange(len(ids))[None])
        logits = dec.step(next_ids[:, None], positions[:, None])
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from .. import contract
from .bundle import Bundle, load_bundle, session_io
from .decoder import DecoderBase
from .in_place import resident_row_nbytes
from .ort_session import (DEVICES, OPTIMIZATION_LEVELS, PROVIDERS, ProviderError, open_sessions, resolve_providers,
                          session_options, shared_weights)
from .ort_state import Bindings

# the names other modules import from here
__all__ = ["OPTIMIZATION_LEVELS", "PROVIDERS", "OrtDecoder", "ProviderError", "open_sessions", "resolve_providers",
           "session_options", "shared_weights"]


class OrtDecoder(DecoderBase):
    """A bundle's prefill and step graphs on ONNX Runtime, with the recurrent state kept inside.

    Call :meth:`reset` with the batch size first. Logits returned by the IO-binding path are a
    read-only view of a buffer the next call overwrites; copy them to keep them.

    ``prefill_arena``: where a prefill's working memory comes from. Prefill shapes vary with every
    prompt length and row count, and ONNX Runtime's CPU arena keeps the largest blocks it has seen:
    ``"keep"`` (the default) is that arena, ``"shrink"`` hands the arena's free blocks back at the
    end of each prefill run, ``"off"`` gives the prefill session no arena (plain malloc/free).

    ``in_place``: one state set that each run overwrites, wherever the bundle's graphs allow it
    (``Bundle.updates_in_place``, runtime/in_place.py), on the CPU (``False``: always two sets, the
    reference it is tested against).

    ``memory_pattern``: ONNX Runtime plans one memory block for each input shape it sees and keeps
    them all. That suits a fixed batch (a step 5% faster at one row on the bundled model); a server
    stepping every row count from 1 to its capacity turns it off, so its working memory stays what
    the largest step needs (docs/design.md#serving-memory).
    """

    def __init__(self, bundle: Bundle | str | Path, provider: str = "cpu", threads: int = 0,
                 optimization: str = "all", io_binding: bool = True, prefill_arena: str = "keep",
                 in_place: bool = True, memory_pattern: bool = True):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.config = self.bundle.config
        self.provider = provider
        self.io_binding = io_binding
        providers = resolve_providers(provider)
        # bad threads / optimization values fail here, before any file is opened
        session_options(threads, optimization)
        if prefill_arena not in PREFILL_ARENA:
            raise ValueError(f"unknown prefill_arena {prefill_arena!r}; expected one of {', '.join(PREFILL_ARENA)}")
        self._device = DEVICES[provider]
        self._pairs = contract.state_pairs(self.config.num_layers, self.config.state_shape.parts)
        files = {kind: self.config.graphs[kind].file for kind in contract.GRAPH_KINDS}
        # MatMulNBits runs its block kernels only on prepacked weights (the teacher's int4 step: 61 ms
        # without, 2.5 ms with); its packed copy is about as small as the blocks themselves. ONNX Runtime
        # fuses int4-qdq's DequantizeLinear + MatMul pairs into the same kernel
        prepack = self.config.precision in (*contract.WEIGHT_ONLY_PRECISIONS, *contract.QDQ_WEIGHT_PRECISIONS)
        no_arena = (contract.PREFILL,) if prefill_arena == "off" else ()
        sessions = open_sessions(self.bundle.path, files, threads, optimization, providers, prepack, no_arena,
                                 memory_pattern)
        self._weights = sessions.pop("weights")
        for kind, session in sessions.items():
            self.bundle.check_graph_io(kind, *session_io(session), session.get_modelmeta().custom_metadata_map)
        self._sessions = sessions
        self.in_place = in_place and io_binding and self._device == "cpu" and self.bundle.updates_in_place
        self._prefill_run = _prefill_run_options(prefill_arena, self._device)
        self._io: Bindings | None = None
        self._batch = 0
        self._parity = 0

    # ---- lifecycle (context manager and close() come from DecoderBase) ------------------------

    def _release(self) -> None:
        self._sessions = {}
        self._weights = {}
        self._io = None
        self._batch = 0
        self.__dict__.pop("_state", None)

    def state_nbytes(self) -> int:
        """Bytes of one decode state at the current batch size (IO binding keeps two sets resident
        unless the decoder runs ``in_place``)."""
        return contract.state_nbytes(self.config.state_shape, self._batch, self.config.state_dtype)

    def row_nbytes(self) -> int:
        """Bytes one row holds here: its state once per state set and its logits row."""
        return resident_row_nbytes(self.config, self.in_place)

    def reset(self, batch: int) -> None:
        """Zero the state for ``batch`` rows; buffers are reallocated only when the batch size changes."""
        batch = self._check_batch(batch)
        if batch != self._batch:
            self._allocate(batch)
        elif self.io_binding:
            self._io.sets[0].zero()
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
        return self._step_io(self._batch, input_ids, position_ids)

    def prefill(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """All rows continue from their current state over ``[B, T]`` tokens → logits ``[B, V]``.

        Rows share T, so use it for equal-length rows; :meth:`prefill_rows` starts rows afresh.
        """
        input_ids, position_ids = self._check_ids(input_ids, position_ids, step=False)
        if not self.io_binding:
            return self._run_plain(contract.PREFILL, input_ids, position_ids)
        self._run_prefill(self._io.prefill_all(self._parity, input_ids, position_ids))
        self._parity ^= 1
        return self._io.logits_view

    def prefill_row(self, row: int, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Start row ``row`` afresh (zero state) with one prompt ``[1, T]`` → that row's logits ``[1, V]``."""
        return self.prefill_rows(row, input_ids, position_ids)

    def prefill_rows(self, first: int, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Start rows ``first .. first + B - 1`` afresh (zero state) with ``B`` prompts of equal
        length ``[B, T]`` in one graph call → their logits ``[B, V]``.

        The prefill graph writes its state straight into those rows of the current state set, so
        rows prefilled in groups (different lengths in different calls, no padding in the state)
        are already the batch state the step graph continues from: nothing is gathered or copied.
        Rows are independent in the graph, so a row prefilled among others equals it prefilled
        alone up to the batched-vs-single-row tolerance.
        """
        self._require_open()
        rows = int(np.shape(input_ids)[0]) if np.ndim(input_ids) == 2 else 0
        if isinstance(first, bool) or not isinstance(first, (int, np.integer)) or not 0 <= first < self._batch \
                or not 1 <= first + rows <= self._batch:
            raise ValueError(f"rows {first!r} to {first!r} + {rows} - 1 are outside the batch of {self._batch}")
        input_ids, position_ids = self._check_ids(input_ids, position_ids, step=False, rows=rows)
        first = int(first)
        if not self.io_binding:
            zero = {past: np.zeros((rows, *a.shape[1:]), a.dtype) for past, a in self._state.items()}
            return self._run_plain(contract.PREFILL, input_ids, position_ids, state=zero, into_rows=first)
        self._run_prefill(self._io.prefill_fresh(self._parity, first, input_ids, position_ids))
        return self._io.logits_view[first:first + rows]

    def step_rows(self, rows: int, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """One step of the first ``rows`` rows only (``[rows, 1]`` ids) → their logits ``[rows, V]``.

        Rows are contiguous in the state buffers, so the first n rows of a set are a valid ``[n, ...]``
        tensor: a server keeps its active rows packed at the front (copy_row when one leaves) and
        steps exactly those, paying for n rows, not the capacity. Rows past ``rows`` keep their state with
        one state set (``in_place``) and are left stale with two: write them before using them again.
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
        return self._step_io(rows, input_ids, position_ids)

    def prepare_steps(self) -> int:
        """Get ready to step any count of rows (a server's start-up), so stepping later takes no new
        memory: make the IO bindings ``step_rows`` uses for every row count now, not as the active
        rows first reach each count, and run one step over the whole batch of a throwaway state
        (this decoder's rows stay unwritten), so ONNX Runtime's arena holds the largest step's
        working memory → how many step bindings exist (0 without IO binding)."""
        self._require_open()
        made = self._io.make_step_bindings() if self.io_binding else 0
        side = self.side_decoder(self._batch)
        try:
            ids = np.zeros((self._batch, 1), np.int64)
            side.step(ids, ids)
        finally:
            side.close()
        return made

    def side_decoder(self, batch: int) -> OrtDecoder:
        """A decoder over these same sessions with state buffers of its own, ``batch`` rows.

        ONNX Runtime runs one session from several threads at once, so a server can prefill new
        prompts into a side decoder on one thread while this one steps on another, then move the
        finished rows over with :meth:`take_row`. The weights stay in memory once; closing the
        side decoder leaves this one open.
        """
        self._require_open()
        side = copy.copy(self)
        side._io, side._batch, side._parity = None, 0, 0
        side.__dict__.pop("_state", None)
        side.reset(batch)
        return side

    def take_row(self, source: OrtDecoder, src: int, dst: int) -> None:
        """Row ``dst`` gets row ``src`` of ``source`` (a side decoder's prefilled row).

        On the CPU with IO binding the row goes from buffer to buffer, tensor by tensor: no copy of
        the whole row is made in between (a server takes a round of rows at a time, and those
        copies raised its heap's high-water mark by a round's states)."""
        same = (source.config.state_shape, source.config.state_dtype) == (self.config.state_shape,
                                                                           self.config.state_dtype)
        if same and self.io_binding and source.io_binding and self._device == "cpu" and source._device == "cpu":
            self._check_row(dst)
            source._check_row(src)
            mine, theirs = self._io.sets[self._parity], source._io.sets[source._parity]
            for past, _ in self._pairs:
                mine.host[past][dst] = theirs.host[past][src]
            return
        self.write_row(dst, source.read_row(src))

    # ---- rows as values: read, write, copy ---------------------------------------------------

    def read_row(self, row: int) -> dict[str, np.ndarray]:
        """Copies of row ``row``'s state, ``past_state.*`` name -> ``[1, ...]`` (see runtime/state.py)."""
        self._check_row(row)
        if not self.io_binding:
            return {name: array[row:row + 1].copy() for name, array in self._state.items()}
        current = self._io.sets[self._parity]
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
        current = self._io.sets[self._parity]
        for name in shapes:
            if self._device == "cpu":
                current.host[name][row] = state[name][0]
            else:
                full = current.read(name)
                full[row] = state[name][0]
                current.values[name].update_inplace(full)

    def copy_row(self, src: int, dst: int) -> None:
        """Row ``dst`` gets row ``src``'s state (a fork, or compacting the active rows)."""
        if src == dst:
            return
        if self.io_binding and self._device == "cpu":
            self._check_row(src)
            self._check_row(dst)
            current = self._io.sets[self._parity]
            for past, _ in self._pairs:
                current.host[past][dst] = current.host[past][src]
            return
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
        feed = {"input_ids": input_ids, "position_ids": position_ids, **state}
        results = dict(zip(names, session.run(None, feed, self._prefill_run)))
        self.write_row(row, {past: results[present] for past, present in self._pairs})
        return results["logits"]

    def read_state(self) -> dict[str, np.ndarray]:
        """Copies of the current state on the host, keyed by ``past_state.*`` name (for checks and debugging)."""
        if self.io_binding:
            current = self._io.sets[self._parity]
            return {past: current.read(past) for past, _ in self._pairs}
        return {name: array.copy() for name, array in self._state.items()}

    # ---- internals -------------------------------------------------------------------------

    def _check_row(self, row) -> None:
        self._require_open()
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < self._batch:
            raise ValueError(f"row {row!r} is outside the batch of {self._batch}")

    def _step_io(self, rows: int, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        np.copyto(self._io.ids[:rows], input_ids)
        np.copyto(self._io.pos[:rows], position_ids)
        self._sessions[contract.STEP].run_with_iobinding(self._io.step(rows, self._parity))
        self._parity ^= 1
        return self._io.logits_view[:rows]

    def _run_prefill(self, binding) -> None:
        self._sessions[contract.PREFILL].run_with_iobinding(binding, self._prefill_run)

    def _state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        specs = contract.graph_inputs(self.config.state_shape, contract.STEP)
        return {s.name: (batch, *s.shape[1:]) for s in specs if contract.is_state(s.name)}

    def _allocate(self, batch: int) -> None:
        self._batch = batch
        shapes = self._state_shapes(batch)
        if not self.io_binding:
            self._state = {name: np.zeros(shape, self.config.state_dtype) for name, shape in shapes.items()}
            return
        self._io = Bindings(self._sessions, self._pairs, shapes, self._device, self.config.state_dtype,
                            self.config.vocab_size, in_place=self.in_place)

    def _run_plain(self, kind: str, input_ids, position_ids, state=None, into_rows: int | None = None):
        session = self._sessions[kind]
        feed = {"input_ids": input_ids, "position_ids": position_ids, **(state or self._state)}
        names = [o.name for o in session.get_outputs()]
        options = self._prefill_run if kind == contract.PREFILL else None
        results = dict(zip(names, session.run(None, feed, options)))
        for past, present in self._pairs:
            if into_rows is None:
                self._state[past] = results[present]
            else:
                self._state[past][into_rows:into_rows + len(results[present])] = results[present]
        return results["logits"]


PREFILL_ARENA = ("keep", "shrink", "off")


def _prefill_run_options(mode: str, device: str):
    """RunOptions for prefill runs: with ``shrink`` the arena frees the memory the run used when it ends."""
    import onnxruntime as ort

    options = ort.RunOptions()
    if mode == "shrink":
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0" if device == "cpu" else
                                     "cpu:0;gpu:0")
    return options
