"""Rich progress displays shared by the training-side commands (finetune, eval, experiment).

The library reports progress through a callback of plain dicts (a ``phase`` key and numbers);
these classes turn those events into bars on stderr, so stdout stays free for results.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from .common import err_console


@contextmanager
def log_to_status(status, logger_name: str = "t2r_export"):
    """Show every INFO message the library logs under ``logger_name`` on a rich status line.

    The library reports its stages (graph building per layer, writing, each verification stage,
    calibration) through ``logging``; this keeps the CLI's display out of the library.
    """
    class _StatusHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            status.update(record.getMessage())

    logger = logging.getLogger(logger_name)
    handler = _StatusHandler(logging.INFO)
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def quiet_transformers() -> None:
    """Silence transformers' own bars, advisory messages and deprecation warnings (peft calls APIs
    transformers has deprecated): they would interleave with ours and say nothing the user can act on."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")


class TrainProgress:
    """A rich progress bar per stage (transfer, finetune) with loss, lr and tokens/s; a spinner for set-up."""

    def __init__(self, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.enabled = enabled
        self.tasks: dict[str, int] = {}
        self.bar = Progress(TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err_console,
                            disable=not enabled)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        # a set-up line left behind would sit above the one-line error of a failed set-up
        self._end_status()
        return self.bar.__exit__(*exc)

    def _status(self, text: str) -> None:
        # one indeterminate line for the phases without a step count (set-up, saving)
        if "status" not in self.tasks:
            self.tasks["status"] = self.bar.add_task(text, total=None, info="")
        else:
            self.bar.update(self.tasks["status"], description=text)

    def _end_status(self) -> None:
        if "status" in self.tasks:
            self.bar.remove_task(self.tasks.pop("status"))

    def update(self, event: dict) -> None:
        phase = event.get("phase")
        if phase in ("setup", "save"):
            self._status({"setup": "set-up", "save": "saving"}[phase] + (f": {event['what']}" if "what" in event
                                                                          else ""))
        elif phase in ("transfer", "finetune"):
            self._end_status()
            if phase not in self.tasks:
                self.tasks[phase] = self.bar.add_task(phase, total=event["steps"], info="")
            info = f"loss {event['loss']:.4g}  lr {event['lr']:.2e}  {event['tokens_per_s']:,.0f} tok/s"
            self.bar.update(self.tasks[phase], completed=event["step"], info=info)
        elif phase == "eval":
            self._end_status()
            if "eval" not in self.tasks:
                self.tasks["eval"] = self.bar.add_task("valid", total=event["total"], info="")
            self.bar.update(self.tasks["eval"], completed=event["tokens"], total=event["total"])
            if event["tokens"] >= event["total"]:
                self.bar.remove_task(self.tasks.pop("eval"))


class EvalProgress:
    """One bar per model being scored; a spinner while a model loads."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            console=err_console, transient=True)
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def update(self, event: dict) -> None:
        phase = event.get("phase")
        if phase in ("load", "tokenize"):
            if self.task is not None:
                self.bar.remove_task(self.task)
            what = f"loading {event['model']}" if phase == "load" else "tokenizing the evaluation text"
            self.task = self.bar.add_task(what, total=None)
        elif phase == "eval":
            self.bar.update(self.task, description=event.get("model", "eval"), completed=event["tokens"],
                            total=event["total"])
