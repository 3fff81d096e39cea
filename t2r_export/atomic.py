"""Atomic outputs: write beside the target, then rename, so no half-written result is ever left.

No torch import (the runtime and the CLI use it too).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def check_writable(out: Path, what: str = "output directory") -> None:
    """ValueError when ``out`` cannot be created (parent not writable, or a file in the way)."""
    out = Path(out)
    probe = out.resolve().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {out} cannot be created: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK):
        raise ValueError(f"{what} {out} is not writable (no write permission on {probe})")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {out} exists and is not a directory")


@contextmanager
def atomic_dir(out: Path, overwrite: bool = True):
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` in one rename.

    On any error the temporary directory is removed and ``out`` is left as it was.
    """
    out = Path(out)
    check_writable(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)
