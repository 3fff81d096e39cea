"""Jobs the bench-memory tests hand to ``bench.child.run_in_child`` in place of the exporter.

A spawned child imports a job by its module and name, so these live in a module of their own
(cheap to import: no torch), not inside a test function.
"""

from __future__ import annotations

import os
import signal

from t2r_export.tolerances import ToleranceError


def export_failing_its_check(t2r_model, out, precision, verify):
    # the pid says which process raised: the test compares it with its own
    raise ToleranceError(f"{precision} bundle against the fp32 model: top-1 agreement 0.39 < 0.75 (pid {os.getpid()})")


def export_killed(t2r_model, out, precision, verify):
    # what the kernel's out-of-memory killer does to an exporter
    os.kill(os.getpid(), signal.SIGKILL)


def pid_and_double(x):
    return os.getpid(), 2 * x


class Unpicklable(Exception):
    def __init__(self, message, handle):
        super().__init__(message)
        self.handle = handle


def raise_value_error(text):
    raise ValueError(text)


def raise_unpicklable():
    raise Unpicklable("holds a lock\nsecond line", __import__("threading").Lock())
