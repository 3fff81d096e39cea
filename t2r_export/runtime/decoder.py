"""What every decoder backend shares: the lifecycle and the checks at the API boundary.

``OrtDecoder`` (ONNX Runtime) and ``TrtDecoder`` (TensorRT engines) both subclass
:class:`DecoderBase`, so a bad id is refused the same way on every backend, before any graph
runs: ids must be integers with ``0 <= id < vocab_size`` (a Gather would silently wrap -1 to the
last row, a float 3.7 would be truncated to 3, an id past the vocabulary would be an opaque
backend error), positions integers with ``0 <= position < max_position`` where the model has a
learned position table. Torch-free: numpy only.

    with OrtDecoder("bundle/") as dec:   # close() on exit, also on an exception
        dec.reset(batch=1)
"""

from __future__ import annotations

import numpy as np


class DecoderClosedError(RuntimeError):
    """A method was called on a decoder after ``close()``."""


class DecoderBase:
    """Lifecycle (context manager, idempotent ``close``) and id validation for decoder backends.

    Subclasses set ``config`` (the bundle's RuntimeConfig) and ``_batch``, implement
    ``_release()`` (free sessions / engines / buffers) and call :meth:`_check_ids` first thing in
    ``step``, ``prefill`` and ``prefill_row``.
    """

    config = None
    _batch = 0
    _closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free everything the decoder holds; later calls raise DecoderClosedError. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._release()
        self._batch = 0

    def _release(self) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def batch(self) -> int:
        return self._batch

    def _require_open(self) -> None:
        if self._closed:
            raise DecoderClosedError(f"this {type(self).__name__} is closed")

    def _check_batch(self, batch) -> int:
        self._require_open()
        if isinstance(batch, (bool, np.bool_)) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        return int(batch)

    def _check_ids(self, input_ids, position_ids, step: bool, rows: int | None = None):
        """``input_ids`` / ``position_ids`` as contiguous int64 ``[rows, T]``; ValueError naming what is wrong."""
        self._require_open()
        if self._batch == 0:
            raise RuntimeError("call reset(batch) before running the decoder")
        rows = self._batch if rows is None else rows
        input_ids = _integer_array("input_ids", input_ids)
        position_ids = _integer_array("position_ids", position_ids)
        if input_ids.ndim != 2 or input_ids.shape[0] != rows or input_ids.shape[1] < 1 \
                or (step and input_ids.shape[1] != 1):
            want = f"[{rows}, 1]" if step else f"[{rows}, T>=1]"
            raise ValueError(f"input_ids must have shape {want}, got {list(input_ids.shape)}")
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids shape {list(position_ids.shape)} differs from input_ids "
                             f"{list(input_ids.shape)}")
        _check_range("input_ids", input_ids, self.config.vocab_size, "the vocabulary size")
        _check_range("position_ids", position_ids, self.config.max_position, "the model's max_position")
        return input_ids, position_ids


def _integer_array(name: str, values) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {array.dtype} (token ids and positions are "
                         "whole numbers; convert with .astype(np.int64) only if the values are exact)")
    if array.dtype.kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds {int(array.max())}, past the int64 range")
    return np.ascontiguousarray(array, dtype=np.int64)


def _check_range(name: str, array: np.ndarray, limit: int | None, limit_name: str) -> None:
    if array.size == 0:
        return
    low = int(array.min())
    if low < 0:
        where = tuple(int(i) for i in np.argwhere(array == low)[0])
        bound = f" < {limit} ({limit_name})" if limit else ""
        raise ValueError(f"{name} holds {low} at {list(where)}; expected 0 <= value{bound}")
    if limit is not None:
        high = int(array.max())
        if high >= limit:
            where = tuple(int(i) for i in np.argwhere(array == high)[0])
            raise ValueError(f"{name} holds {high} at {list(where)}; expected values below {limit} "
                             f"({limit_name})")
