"""``t2r-export experiment paper``: the paper's comparison table on the bundled teacher, and
``t2r-export experiment seeds``: the seed-to-seed spread of several of its output folders.

Thin: parse, build an ``ExperimentConfig``, call ``run_paper_experiment``, show progress and
the table with rich. Torch is imported only when the command runs.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import check_writable_parent, console, fail
from .progress import TrainProgress, quiet_transformers

EXPERIMENTS = ("paper",)
# what the experiment writes into --out (experiments/paper.py's file names; kept here so --help needs no torch)
EXPERIMENT_FILES = ("partial.json", "results.json", "results.md")
BUDGET_NAMES = ("quick", "medium", "full")


def paper(
    quick: bool = typer.Option(False, "--quick", help="The quick budget (minutes): a smoke run of the table."),
    budget: Optional[str] = typer.Option(None, help="quick | medium | full (default: full, or quick with --quick)."),
    out: Path = typer.Option(Path("runs/experiment-paper"), "-o", "--out", help="Where results.md / results.json "
                             "(and partial.json, for resuming) go."),
    teacher: Optional[Path] = typer.Option(None, help="Softmax teacher directory; default: the bundled teacher."),
    steps: Optional[int] = typer.Option(None, help="Override: optimizer steps per training run."),
    transfer_steps: Optional[int] = typer.Option(None, help="Override: of those, attention-transfer steps in "
                                                 "the t2r-transfer run."),
    batch_size: Optional[int] = typer.Option(None, help="Override: blocks per step."),
    block_size: Optional[int] = typer.Option(None, help="Override: tokens per block (training and test)."),
    test_tokens: Optional[int] = typer.Option(None, help="Override: test tokens (a prefix of the stdlib test split)."),
    runs: Optional[str] = typer.Option(None, help="Comma-separated subset of runs (the teacher always runs)."),
    keep_models: bool = typer.Option(False, "--keep-models", help="Keep each run's model in OUT/models."),
    num_threads: Optional[int] = typer.Option(None, help="CPU threads (1 is faster on a busy 2-core machine)."),
    seed: int = typer.Option(0, help="Seed of every run (swap init, batch order); another seed needs another --out."),
    window: int = typer.Option(64, help="W of the sliding-window rows (t2r-window, hedgehog-window, ...)."),
    max_files: Optional[int] = typer.Option(None, hidden=True, help="Only the first N files of each stdlib split."),
) -> None:
    import dataclasses

    from ..experiments.paper import BUDGETS, ExperimentConfig, run_paper_experiment

    if quick and budget not in (None, "quick"):
        fail(f"--quick and --budget {budget} disagree; pass one of them")
    budget_name = budget or ("quick" if quick else "full")
    if budget_name not in BUDGET_NAMES:
        fail(f"unknown budget {budget_name!r}; expected one of {', '.join(BUDGET_NAMES)}")
    overrides = {k: v for k, v in dict(steps=steps, transfer_steps=transfer_steps, batch_size=batch_size,
                                       block_size=block_size, test_tokens=test_tokens).items() if v is not None}
    chosen = dataclasses.replace(BUDGETS[budget_name], **overrides)
    if seed < 0:
        fail(f"--seed must be a non-negative integer, got {seed}")
    _check_experiment_out(out, teacher)
    subset = tuple(r.strip() for r in runs.split(",") if r.strip()) if runs else None
    cfg = ExperimentConfig(out_dir=out, budget_name=budget_name + (" (custom)" if overrides else ""), budget=chosen,
                           teacher=teacher, runs=subset, keep_models=keep_models, num_threads=num_threads,
                           seed=seed, window=window, max_files=max_files)
    quiet_transformers()
    command = shlex.join(["t2r-export", *sys.argv[1:]])
    try:
        with _RunProgress() as progress:
            results = run_paper_experiment(cfg, progress=progress.update, command=command)
    except ValueError as err:
        fail(str(err))
    except RuntimeError as err:
        fail(str(err).splitlines()[0], code=1)
    _print_table(results, out)


class _RunProgress:
    """One line per run, and the trainer's per-stage bars (a fresh set for each run)."""

    def __init__(self):
        self.bars = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._close()
        return False

    def _close(self) -> None:
        if self.bars is not None:
            self.bars.__exit__(None, None, None)
            self.bars = None

    def update(self, event: dict) -> None:
        phase = event.get("phase")
        if phase in ("run", "skip", "done"):
            self._close()
            where = f"[{event['index'] + 1}/{event['total']}] {event['run']}"
            if phase == "skip":
                console.print(f"{where}: done before (partial.json), skipped")
            elif phase == "run":
                console.print(f"{where} ...")
                self.bars = TrainProgress(enabled=True).__enter__()
            else:
                record = event["record"]
                console.print(f"{where}: test perplexity {record['test_perplexity']:.2f}, "
                              f"{record['wall_time_s']:.0f} s")
        elif self.bars is not None:
            self.bars.update(event)


def _print_table(results: dict, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"paper experiment ({results['plan']['budget_name']} budget) → {out}/results.md")
    for column in ("run", "map", "k", "init", "transfer tok", "finetune tok", "test ppl", "ratio", "wall s",
                   "state bytes"):
        # wrap rather than cut: a "…" would hide the numbers on a narrow terminal
        table.add_column(column, justify="left" if column in ("run", "map", "init") else "right", overflow="fold")
    for row in results["rows"]:
        ratio = row["ratio_to_teacher"]
        table.add_row(row["run"], row["feature_map"], str(row["feature_dim"] or "-"), row["init"],
                      f"{row['transfer_tokens']:,}", f"{row['finetune_tokens']:,}", f"{row['test_perplexity']:.2f}",
                      "-" if ratio is None else f"{ratio:.3f}", f"{row['wall_time_s']:.0f}",
                      f"{row['state_bytes_per_sequence']:,}")
    console.print(table)
    for check in results["expectations"]:
        console.print(f"{check['claim']}: {'holds' if check['holds'] else 'does NOT hold'}")


def seeds(
    folders: list[Path] = typer.Argument(..., help="--out folders of `t2r-export experiment paper --seed N`."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write the Markdown here (a .md file) and the "
                                       "JSON beside it."),
) -> None:
    """Seed-to-seed spread and paired ratios from several paper-experiment folders (Markdown on stdout)."""
    from ..experiments.seeds import load_results, render_markdown, seed_summary, write_summary

    if out is not None:
        if out.suffix != ".md":
            fail(f"--out must name a .md file, got {out}")
        if out.is_dir():
            fail(f"--out {out} is a directory; expected a .md file path")
        check_writable_parent(out.parent, "--out's directory")
    try:
        summary = seed_summary(load_results(folders))
        markdown = write_summary(summary, out) if out is not None else render_markdown(summary)
    except ValueError as err:
        fail(str(err))
    sys.stdout.write(markdown)


def _check_experiment_out(out: Path, teacher: Path | None) -> None:
    """The experiment adds to its own folder (resuming from partial.json); any other non-empty folder is refused."""
    from ..atomic import OutputError, check_output_path

    try:
        check_output_path(out, [teacher] if teacher is not None else [])
    except OutputError as err:
        fail(str(err))
    if out.is_dir() and any(out.iterdir()) and not any((out / name).is_file() for name in EXPERIMENT_FILES):
        fail(f"output directory {out} already holds files not written by `t2r-export experiment` (none of "
             f"{', '.join(EXPERIMENT_FILES)}); choose another --out")
