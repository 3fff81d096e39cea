"""Run one heavy job (an export) in a fresh child process, so its peak memory is the child's.

An export holds the torch model, the graphs being written and the verification's sessions at
once: at 0.5B parameters ~5.4 GB, and glibc keeps much of it mapped after the export returns. Run
in the bench's own process, that peak became the bench's and stayed. ``run_in_child`` starts a
"spawn" child (a new interpreter: nothing of the parent's heap is shared or inherited), runs
``job(*args)`` there and hands back its return value, or re-raises its exception here (and
records the child's peak RSS in ``CHILD_PEAKS``):

    run_in_child(export_job, model_dir, out, what="int4 export")

The job must be a module-level function (the child imports it by name) and its arguments and
result picklable. A child that dies without an answer (killed by the kernel when memory runs out,
a crash in native code) is a ``ChildProcessFailed`` naming its exit code.
"""

from __future__ import annotations

import multiprocessing
import pickle
import resource
import signal
import sys

# what -> the largest peak RSS (bytes) a child doing it reported, over this process's life
CHILD_PEAKS: dict[str, int] = {}


class ChildProcessFailed(RuntimeError):
    """The child ended without an answer, or raised something that could not be sent back as it was."""


def _portable(err: BaseException) -> BaseException:
    """``err`` itself when it survives pickling (ValueError, ToleranceError, ...), else a one-line stand-in."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        return ChildProcessFailed(f"{type(err).__name__}: {first}")


def own_peak_rss() -> int:
    """This process's peak RSS in bytes (ru_maxrss: KiB on Linux, bytes on macOS). Linux carries
    the peak across exec, so a child's is at least its parent's when the child was started."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _child_main(conn, job, args, kwargs) -> None:
    try:
        answer = ("ok", job(*args, **kwargs))
    except BaseException as err:  # everything goes back to the parent, which decides what it means
        answer = ("error", _portable(err))
    conn.send((*answer, own_peak_rss()))
    conn.close()


def exit_reason(code: int | None) -> str:
    """A child's exit code in words: negative codes are the signal that ended it."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the kernel's out-of-memory killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return f"exit code {code}, killed by {name}{hint}"
    return f"exit code {code}"


def run_in_child(job, *args, what: str = "child", **kwargs):
    """``job(*args, **kwargs)`` in a spawned process; its result, or its exception raised here."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(sender, job, args, kwargs), name=f"t2r-export {what}")
    process.start()
    # only the child holds the sending end now: its exit without an answer reads as EOF here
    sender.close()
    try:
        try:
            answer = receiver.recv()
        except EOFError:
            answer = None
        process.join()
    finally:
        # Ctrl-C or any error while waiting: the child does not outlive the run that started it
        if process.is_alive():
            process.terminate()
            process.join()
        receiver.close()
    if answer is None:
        raise ChildProcessFailed(f"the {what} process ended without an answer ({exit_reason(process.exitcode)})")
    status, value, peak = answer
    CHILD_PEAKS[what] = max(peak, CHILD_PEAKS.get(what, 0))
    if status == "error":
        raise value
    return value
