"""What every CLI command shares: consoles, the one-line failure, atomic output directories."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from ..atomic import atomic_dir, check_writable

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print one clear line to stderr and exit with ``code`` (2 = bad input)."""
    # the message is plain text (paths, pip hints like `t2r-export[tensorrt]`), never rich markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def check_writable_parent(out: Path, what: str = "output directory") -> None:
    """fail() with one line when ``out`` cannot be created."""
    try:
        check_writable(out, what)
    except ValueError as err:
        fail(str(err))


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = True):
    """``atomic_dir`` for commands: bad output paths become one-line failures (exit 2)."""
    check_writable_parent(out)
    if Path(out).exists() and not overwrite:
        fail(f"{out} already exists; pass --overwrite to replace it")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        yield tmp


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
