"""A decode stream's state as a value: save, restore, fork, snapshot (docs/design.md#runtime).

A T2R stream's whole history is its fixed-size state, so a stream can be written to a file and
continued later, copied into n rows to draw n samples from one prompt without prefilling it n
times, or rolled back to an earlier position. :class:`RowState` holds one row: the
``past_state.*`` tensors ``[1, ...]`` (names and shapes from the contract), ``position`` (tokens
consumed, so the next token's position), ``pending`` (tokens produced but not yet fed: after
``generate`` the last sampled token has not gone through the graph) and, optionally, the row's
sampler state, so a sampled continuation draws exactly what the uninterrupted run would have.

A saved state is a safetensors file (numpy API, no torch) whose metadata names the format, its
version, the bundle's identity and the position; :func:`load_state` refuses a file from another
bundle, with other shapes or dtypes, truncated or not safetensors at all, in one line
(:class:`StateError`). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import contract
from ..contract import RUNTIME_JSON, TOKENIZER_JSON

STATE_FORMAT = "t2r-export-state"
STATE_VERSION = 1
PENDING = "pending_ids"
# graph files up to this size are hashed whole; larger ones (weights inline) by name and size
_HASH_WHOLE = 16 << 20


class StateError(ValueError):
    """A state file that cannot be restored into this bundle; the message is one line."""


@dataclass
class RowState:
    tensors: dict[str, np.ndarray]
    position: int
    bundle_id: str
    pending: list[int] = field(default_factory=list)
    # numpy bit-generator state of the row's sampler (JSON-able), or None
    rng: dict | None = None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values())

    def copy(self) -> RowState:
        return RowState({k: v.copy() for k, v in self.tensors.items()}, self.position, self.bundle_id,
                        list(self.pending), json.loads(json.dumps(self.rng)) if self.rng else None)


def bundle_identity(bundle) -> str:
    """A stable, cheap hash of what makes two bundles compute the same thing.

    runtime.json (it records the source checkpoint's sha256, the precision, the shapes), the
    tokenizer, the weight index and every graph file (whole up to 16 MiB, else name and size), and the
    weight file's size. Reading it costs a few small files, not the weights.
    """
    cached = getattr(bundle, "_t2r_identity", None)
    if cached:
        return cached
    root = Path(bundle.path)
    digest = hashlib.sha256()
    names = [RUNTIME_JSON, TOKENIZER_JSON, "weights.json"] + sorted(g.file for g in bundle.config.graphs.values())
    for name in names:
        path = bundle.file(name)
        if not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        if size <= _HASH_WHOLE:
            digest.update(path.read_bytes())
    weights = root / "weights.bin"
    if weights.is_file():
        digest.update(f"weights.bin\0{weights.stat().st_size}\0".encode())
    value = digest.hexdigest()[:32]
    object.__setattr__(bundle, "_t2r_identity", value)
    return value


def row_shapes(config) -> dict[str, tuple[int, ...]]:
    """``past_state.*`` name -> its one-row shape, from the contract."""
    specs = contract.graph_inputs(config.state_shape, contract.STEP, config.state_dtype)
    return {s.name: (1, *s.shape[1:]) for s in specs if contract.is_state(s.name)}


def capture(decoder, row: int, position: int, bundle_id: str, pending=(), rng=None) -> RowState:
    """The state of ``row`` of ``decoder`` as a value (a copy)."""
    state = RowState(decoder.read_row(row), int(position), bundle_id, [int(t) for t in pending])
    if rng is not None:
        state.rng = rng.bit_generator.state
    return state


def restore(decoder, row: int, state: RowState) -> None:
    """Put ``state`` into ``row`` of ``decoder``."""
    decoder.write_row(row, state.tensors)


def fork(decoder, row: int, targets) -> None:
    """Rows ``targets`` become copies of ``row``: n samples from one prompt without prefilling it again."""
    tensors = decoder.read_row(row)
    for target in targets:
        if target != row:
            decoder.write_row(target, tensors)


class Snapshots:
    """Earlier states of one stream by position, to roll it back exactly (bounded count, oldest dropped)."""

    def __init__(self, limit: int = 16):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._states: dict[int, RowState] = {}

    def take(self, decoder, row: int, position: int, bundle_id: str, pending=(), rng=None) -> None:
        self._states[int(position)] = capture(decoder, row, position, bundle_id, pending, rng)
        while len(self._states) > self.limit:
            del self._states[min(self._states)]

    @property
    def positions(self) -> list[int]:
        return sorted(self._states)

    def rollback(self, decoder, row: int, position: int) -> RowState:
        """Restore the snapshot taken at ``position`` into ``row``; later snapshots are dropped."""
        if position not in self._states:
            raise KeyError(f"no snapshot at position {position}; snapshots exist at {self.positions}")
        state = self._states[position]
        restore(decoder, row, state)
        for later in [p for p in self._states if p > position]:
            del self._states[later]
        return state.copy()


# ---- files ---------------------------------------------------------------------------------------

def save_state(path: str | Path, state: RowState) -> Path:
    """Write ``state`` as safetensors (temp file, then rename: never half-written)."""
    from safetensors.numpy import save

    path = Path(path)
    tensors = {name: np.ascontiguousarray(a) for name, a in state.tensors.items()}
    tensors[PENDING] = np.asarray(state.pending, dtype=np.int64)
    metadata = {"format": STATE_FORMAT, "format_version": str(STATE_VERSION), "bundle": state.bundle_id,
                "position": str(int(state.position))}
    if state.rng is not None:
        metadata["rng"] = json.dumps(state.rng)
    data = save(tensors, metadata=metadata)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StateError(f"cannot write state file {path}: {err.strerror or err}") from None
    return path


def load_state(path: str | Path, config, bundle_id: str) -> RowState:
    """Read a state file and check it against a bundle (its RuntimeConfig and identity)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise StateError(f"state file {path} cannot be read: {err.strerror or err}") from None
    return parse_state(data, config, bundle_id, str(path))


def parse_state(data: bytes, config, bundle_id: str, what: str = "state") -> RowState:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    metadata = _header_metadata(data, what)
    if metadata.get("format") != STATE_FORMAT:
        raise StateError(f"{what} is a safetensors file but not a t2r-export state (format "
                         f"{metadata.get('format')!r}, expected {STATE_FORMAT!r})")
    if metadata.get("format_version") != str(STATE_VERSION):
        raise StateError(f"{what} has state format version {metadata.get('format_version')!r}; this t2r-export "
                         f"reads version {STATE_VERSION}")
    if metadata.get("bundle") != bundle_id:
        raise StateError(f"{what} was saved from another bundle (identity {metadata.get('bundle')!r}, this "
                         f"bundle is {bundle_id!r}); restore it only into the bundle that wrote it")
    try:
        position = int(metadata.get("position", ""))
    except ValueError:
        raise StateError(f"{what}: metadata 'position' = {metadata.get('position')!r} is not an integer") from None
    if position < 0:
        raise StateError(f"{what}: metadata 'position' = {position} is negative")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, OSError) as err:
        raise StateError(f"{what} is truncated or corrupt: {str(err).splitlines()[0][:200]}") from None
    pending = tensors.pop(PENDING, np.zeros(0, np.int64))
    if pending.dtype != np.int64 or pending.ndim != 1:
        raise StateError(f"{what}: {PENDING} is {pending.dtype}{list(pending.shape)}, expected int64[n]")
    expected = row_shapes(config)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise StateError(f"{what} holds tensors this bundle's state lacks: {extra[:3]}")
    for name, shape in expected.items():
        array = tensors.get(name)
        if array is None:
            raise StateError(f"{what} lacks state tensor {name!r}; expected {config.state_dtype}{list(shape)}")
        if array.dtype != np.dtype(config.state_dtype) or array.shape != shape:
            raise StateError(f"{what}: state tensor {name!r} is {array.dtype}{list(array.shape)}, expected "
                             f"{config.state_dtype}{list(shape)}")
        if not np.isfinite(array).all():
            raise StateError(f"{what}: state tensor {name!r} holds NaN or inf")
    bad = [int(t) for t in pending if not 0 <= int(t) < config.vocab_size]
    if bad:
        raise StateError(f"{what}: pending token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
    rng = None
    if "rng" in metadata:
        try:
            rng = json.loads(metadata["rng"])
            np.random.default_rng().bit_generator.state = rng
        except (ValueError, TypeError, KeyError):
            raise StateError(f"{what}: metadata 'rng' is not a numpy generator state") from None
    return RowState(tensors, position, bundle_id, [int(t) for t in pending], rng)


def _header_metadata(data: bytes, what: str) -> dict:
    """The safetensors header's ``__metadata__``, checking the header before numpy reads anything."""
    if len(data) < 8:
        raise StateError(f"{what} is not a safetensors file ({len(data)} bytes; a state file starts with an "
                         "8-byte header length)")
    size = int.from_bytes(data[:8], "little")
    if size <= 0 or size > len(data) - 8:
        raise StateError(f"{what} is not a safetensors file, or is truncated (header of {size} bytes in a "
                         f"{len(data)}-byte file)")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, ValueError):
        raise StateError(f"{what} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise StateError(f"{what} is not a safetensors file (its header is not a JSON object)")
    try:
        end = max((int(v.get("data_offsets", [0, 0])[1]) for k, v in header.items()
                   if k != "__metadata__" and isinstance(v, dict)), default=0)
    except (TypeError, ValueError, IndexError, AttributeError):
        raise StateError(f"{what} is not a valid safetensors file (bad data_offsets in its header)") from None
    if 8 + size + end > len(data):
        raise StateError(f"{what} is truncated: its header describes {8 + size + end} bytes, the file has "
                         f"{len(data)}")
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}
