"""The serve engine's thread priorities: the prefill thread runs a few nice steps below the rest of
the server (Linux, where each thread has its own nice value). Standard library only, so the CLI can
name the default in its help without importing the engine."""

from __future__ import annotations

import os
import sys
import threading

# how much lower the prefill thread's scheduling priority is than the server's (nice steps, Linux). On
# a machine whose cores are all busy (the streams' steps, the prefill, the event loop, clients on the
# same box) the scheduler then hands a contested core to the decode thread first, so the running
# streams keep their pace and new prompts are prefilled in the time the decode thread leaves; with
# idle cores the prefill runs as fast as before. Unprivileged processes may always lower a thread's
# priority, never raise it back.
PREFILL_NICE = 10
# the lowest priority a nice value reaches
NICE_MAX = 19


def thread_nice_supported() -> bool:
    """Whether this platform can set one thread's scheduling priority (Linux: a thread is a task with its
    own nice value, addressed by its native id)."""
    return sys.platform.startswith("linux") and hasattr(os, "setpriority")


def resolve_prefill_nice(steps: int | None) -> int:
    """``--prefill-nice``: None → the default where this platform has per-thread priorities (else 0);
    ValueError (one line) for a value outside [0, NICE_MAX] or one this platform cannot apply."""
    if steps is None:
        return PREFILL_NICE if thread_nice_supported() else 0
    if not 0 <= steps <= NICE_MAX:
        raise ValueError(f"--prefill-nice must be in [0, {NICE_MAX}], got {steps}")
    if steps and not thread_nice_supported():
        raise ValueError("--prefill-nice needs per-thread priorities (Linux); pass --prefill-nice 0 here")
    return steps


def lower_this_thread(steps: int) -> int:
    """Lower the calling thread's priority by ``steps`` nice steps (capped at NICE_MAX) → its nice value now."""
    tid = threading.get_native_id()
    nice = min(NICE_MAX, os.getpriority(os.PRIO_PROCESS, tid) + steps)
    os.setpriority(os.PRIO_PROCESS, tid, nice)
    return nice
