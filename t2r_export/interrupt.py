"""Ctrl-C as one line and exit code 130, from the first import of the command line on.

Stdlib only: it is installed before anything heavy (torch, transformers) is imported, so an
interrupt during start-up does not print an import traceback. Library users are not affected:
the handler is installed only for the ``t2r-export`` command.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130
MESSAGE = "error: interrupted (Ctrl-C); nothing was written\n"


def _exit_during_startup(signum, frame) -> None:
    # nothing has been written yet: leave at once, without unwinding half-imported modules
    try:
        os.write(2, MESSAGE.encode())
    finally:
        os._exit(EXIT_INTERRUPTED)


def is_command_line() -> bool:
    """True when this process is the ``t2r-export`` console script (or ``python -m t2r_export.cli``)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name.startswith("t2r-export") or sys.argv[0:1] == ["-m"]


def install_startup_handler() -> None:
    """Until :func:`restore_default_handler`, Ctrl-C exits 130 with one line (no traceback)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _exit_during_startup)


def restore_default_handler() -> None:
    """From here Ctrl-C raises KeyboardInterrupt, so temp folders are cleaned up on the way out."""
    if signal.getsignal(signal.SIGINT) is _exit_during_startup:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def report_interrupt() -> int:
    sys.stderr.write(MESSAGE.replace("; nothing was written", ""))
    sys.stderr.flush()
    return EXIT_INTERRUPTED
