"""Atomic outputs: write beside the target, then rename, so no half-written result is ever left.

The one temp-then-rename implementation of the package (docs/reliability.md):

- an existing non-empty output is never replaced unless asked (``overwrite``, the CLI's ``--force``),
  and even then only when this tool wrote it (its marker file, or a bundle's runtime.json);
- ``-o .``, the current directory's parents and folders that contain an input are refused;
- writers of one output are serialised by a lock file beside it (a second writer is refused);
- temp folders left by a killed process (its pid in the name, the process gone) are removed by
  the next run, and a previous output caught half-way through its replacement is put back;
- a full, read-only or forbidden disk becomes one ``OutputError`` line with the temp folder removed.

No torch import (the runtime and the CLI use it too).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

# written into every folder the tool creates, so --force can tell it from a user's folder
MARKER = ".t2r-export"
# outputs written before the marker existed are recognised by the records only this tool writes:
# a bundle's runtime.json, finetune's and pretrain's records, an unfinished finetune's checkpoint
OWNED_FILES = (MARKER, "runtime.json", "finetune.json", "training.json", "checkpoint/trainer_state.json")
WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EROFS: "the file system is read-only"}

_held_locks: dict[Path, int] = {}


class OutputError(ValueError):
    """An output folder that cannot or must not be written; the message is one line."""


def is_tool_output(path: Path) -> bool:
    """True when ``path`` is a folder this tool wrote (its marker or one of its records)."""
    path = Path(path)
    if not path.is_dir():
        return False
    return any((path / name).is_file() for name in OWNED_FILES) or _is_engines_manifest(path / "manifest.json")


def _is_engines_manifest(path: Path) -> bool:
    """A TensorRT engines folder written before the marker existed: its manifest names our format."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == "t2r-export-engines"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_path(out: Path, inputs: Iterable[Path] = (), what: str = "output directory") -> None:
    """OutputError when ``out`` is the current folder (or above it), holds an input, or cannot be created."""
    out = Path(out)
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputError(f"{what} {out} is the current directory or one of its parents; name a new folder, "
                          "e.g. -o out/NAME")
    for source in inputs:
        if source is None:
            continue
        source = Path(source).resolve()
        if target == source or target in source.parents:
            raise OutputError(f"{what} {out} is or contains the input {source}; choose a folder outside it")
    check_writable(out, what)


def check_writable(out: Path, what: str = "output directory") -> None:
    """OutputError when ``out`` cannot be created (parent not writable, or a file in the way)."""
    out = Path(out)
    probe = out.resolve().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{what} {out} cannot be created: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK):
        raise OutputError(f"{what} {out} is not writable (no write permission on {probe})")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{what} {out} exists and is not a directory")


def check_replaceable(out: Path, overwrite: bool, what: str = "output directory") -> None:
    """OutputError unless ``out`` is absent, empty, or (with ``overwrite``) a folder this tool wrote."""
    out = Path(out)
    if not out.exists() or _is_empty_dir(out):
        return
    if not overwrite:
        raise OutputError(f"{what} {out} already exists and is not empty; pass --force to replace it, "
                          "or choose another --out")
    if not is_tool_output(out):
        raise OutputError(f"{what} {out} was not written by t2r-export (none of {', '.join(OWNED_FILES)} in it); "
                          "--force replaces only t2r-export's own outputs: choose another --out")


def check_output(out: Path, overwrite: bool = False, inputs: Iterable[Path] = (),
                 what: str = "output directory") -> None:
    """Every check a command makes on ``-o`` before any heavy work."""
    check_output_path(out, inputs, what)
    check_replaceable(out, overwrite, what)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID`` / ``.NAME.old-PID`` folders of dead processes beside ``out``; returns them.

    A ``.old`` folder is the previous output caught between the two renames of a replacement: when
    ``out`` is missing it is renamed back rather than deleted.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")
    removed = []
    for entry in sorted(out.parent.iterdir()):
        match = pattern.match(entry.name)
        if not match or int(match.group(2)) == os.getpid() or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not out.exists():
            os.replace(entry, out)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextmanager
def output_lock(out: Path, what: str = "output directory"):
    """Hold the lock of ``out`` (re-entrant in one process); a second process is refused with one line."""
    out = Path(out).resolve()
    if out in _held_locks:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    path = _lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(f"another t2r-export process (pid {holder}) is writing {what} {out}; wait for it "
                              "to finish or choose another --out") from None
        # the previous holder may have unlinked the file between our open and our lock: retry on a fresh one
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held_locks[out] = fd
    try:
        yield
    finally:
        del _held_locks[out]
        path.unlink(missing_ok=True)
        os.close(fd)


def _normal_modes(root: Path) -> None:
    """Give every file and folder under ``root`` the modes the user's umask gives new files (not 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def write_error(err: OSError, out: Path, what: str = "output directory") -> OutputError | None:
    """The one-line OutputError for a full / read-only / forbidden disk, None for other OS errors."""
    reason = WRITE_ERRNOS.get(err.errno)
    if reason is None:
        return None
    where = f" ({err.filename})" if err.filename else ""
    return OutputError(f"cannot write {what} {out}: {reason}{where}; nothing was written")


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False, inputs: Iterable[Path] = (), what: str = "output directory"):
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` in one rename.

    ``overwrite`` allows replacing an existing folder only when this tool wrote it. On any error the
    temporary directory is removed and ``out`` is left as it was.
    """
    out = Path(out)
    check_output_path(out, inputs, what)
    with output_lock(out, what):
        remove_stale_temps(out)
        check_replaceable(out, overwrite, what)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            yield tmp
            (tmp / MARKER).write_text("written by t2r-export; --force may replace this folder\n")
            _normal_modes(tmp)
            _replace(tmp, out)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            one_line = write_error(err, out, what)
            if one_line is None:
                raise
            raise one_line from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` onto ``out`` (a folder cannot be renamed onto a non-empty one: move the old aside)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        one_line = write_error(err, path, "file")
        if one_line is None:
            raise
        raise one_line from None
