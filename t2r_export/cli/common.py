"""What every CLI command shares: consoles, the one-line failure, guarded atomic output directories."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import typer
from rich.console import Console
from rich.markup import escape

from ..atomic import OutputError, atomic_dir, check_output, check_writable, output_lock, remove_stale_temps

console = Console()
err_console = Console(stderr=True)

FORCE_HELP = "Replace an existing output folder that t2r-export wrote earlier (never any other folder)."
TRUST_HELP = "Allow Python code shipped in the model folder (auto_map) to run; off by default."


class _Settings:
    # set by the global --debug option: failures re-raise the original exception instead of one line
    debug = False


settings = _Settings()


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print one clear line to stderr and exit with ``code`` (2 = bad input).

    With ``--debug``, the exception being handled (if any) is re-raised instead, with its traceback.
    """
    if settings.debug and sys.exc_info()[1] is not None:
        raise
    # the message is plain text (paths, pip hints like `t2r-export[tensorrt]`), never rich markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def check_writable_parent(out: Path, what: str = "output directory") -> None:
    """fail() with one line when ``out`` cannot be created."""
    try:
        check_writable(out, what)
    except ValueError as err:
        fail(str(err))


def check_output_early(out: Path, force: bool = False, inputs: Iterable[Path | None] = (),
                       what: str = "output directory") -> None:
    """fail() with one line, before any heavy work, when ``-o`` must not be written (see claimed_output)."""
    try:
        check_output(out, force, [Path(p) for p in inputs if p is not None], what)
    except OutputError as err:
        fail(str(err))


@contextmanager
def claimed_output(out: Path, force: bool = False, inputs: Iterable[Path | None] = (),
                   what: str = "output directory"):
    """Check ``-o`` before any heavy work and hold its lock for the whole command.

    Refused with one line: ``-o .`` or a parent of the current folder, a folder holding an input, an
    unwritable place, an existing non-empty folder without ``--force``, a folder t2r-export did not
    write even with ``--force``, and an output another t2r-export process is writing.
    """
    inputs = [Path(p) for p in inputs if p is not None]
    try:
        check_output(out, force, inputs, what)
        lock = output_lock(out, what)
        lock.__enter__()
    except OutputError as err:
        fail(str(err))
    try:
        remove_stale_temps(out)
        yield
    finally:
        lock.__exit__(None, None, None)


@contextmanager
def atomic_output_dir(out: Path, force: bool = False, inputs: Iterable[Path | None] = (),
                      what: str = "output directory"):
    """``atomic_dir`` for commands: bad output paths and full or read-only disks become one line (exit 2)."""
    inputs = [Path(p) for p in inputs if p is not None]
    try:
        with atomic_dir(out, overwrite=force, inputs=inputs, what=what) as tmp:
            yield tmp
    except OutputError as err:
        fail(str(err))


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
