"""`t2r-export finetune [MODEL_DIR]` and `t2r-export eval [MODEL_DIR ...]`.

Both default to the bundled teacher, so they work offline with no arguments. ``finetune`` runs
unchanged under ``torchrun --nproc_per_node N --no-python t2r-export finetune ...``: only rank 0
draws the progress bar and prints.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer

from .common import FORCE_HELP, TRUST_HELP, claimed_output, console, err_console, fail

TEACHER_HELP = "the bundled softmax teacher"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _quiet_transformers() -> None:
    # "Loading weights" / "Writing model shards" bars would interleave with ours
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def finetune(
    model: Optional[Path] = typer.Argument(None, metavar="MODEL_DIR", help=f"Local HF causal LM (softmax or T2R); default: {TEACHER_HELP}."),
    data: Optional[list[Path]] = typer.Option(None, "--data", metavar="PATH", help="Local .txt/.py/.md/.jsonl "
                                              "file or dir, repeatable (last 5% of tokens held out); default: "
                                              "the stdlib corpus."),
    dataset: Optional[str] = typer.Option(None, help="A Hugging Face `datasets` name ('name' or 'name:config', "
                                          "column 'text'); needs the package and the hub."),
    steps: int = typer.Option(500, help="Next-token finetuning steps."),
    attention_transfer_steps: int = typer.Option(0, help="Attention-transfer steps before finetuning (0 = skip)."),
    train: str = typer.Option("all", help="What trains: all | attention | lora."),
    lr: float = typer.Option(5e-4, help="Peak learning rate of finetuning (warmup, then cosine to 10%)."),
    attention_transfer_lr: float = typer.Option(1e-2, help="Learning rate of attention transfer."),
    batch_size: int = typer.Option(8, help="Blocks per process per micro-step."),
    block_size: int = typer.Option(256, help="Tokens per block."),
    grad_accum: int = typer.Option(1, help="Micro-steps per optimizer step."),
    feature_map: str = typer.Option("t2r", help="t2r | elu | rfa (used when MODEL is a softmax model)."),
    feature_dim: int = typer.Option(32, help="Feature size k of phi."),
    init: str = typer.Option("default", help="Feature-map init: default | identity."),
    seed: int = typer.Option(0, help="Seed of the swap, the data order and LoRA."),
    out: Path = typer.Option(Path("runs/t2r"), "-o", "--out", help="Where to write the finetuned T2R model."),
    save_every: int = typer.Option(200, help="Checkpoint to OUT/checkpoint every this many steps (0 = never)."),
    eval_every: int = typer.Option(200, help="Validation perplexity every this many steps (0 = only at the end)."),
    eval_max_tokens: int = typer.Option(32768, help="Validation tokens per evaluation."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Shard the model over processes (FSDP2) instead of DDP; "
                              "for models too big to replicate (not with --train lora)."),
    lora_r: int = typer.Option(8, help="LoRA rank (--train lora)."),
    lora_alpha: int = typer.Option(16, help="LoRA alpha (--train lora)."),
    num_threads: Optional[int] = typer.Option(None, help="CPU threads (default: torch's)."),
    trust_remote_code: bool = typer.Option(False, help=TRUST_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    from ..train.finetune import FinetuneConfig, finetune as run_finetune

    _quiet_transformers()
    main = _rank() == 0
    cfg = FinetuneConfig(
        model=model, out_dir=out, data=list(data) if data else None, dataset=dataset, steps=steps,
        attention_transfer_steps=attention_transfer_steps, train=train, lr=lr,
        attention_transfer_lr=attention_transfer_lr, batch_size=batch_size, block_size=block_size,
        grad_accum=grad_accum, feature_map=feature_map, feature_dim=feature_dim, init=init, seed=seed,
        save_every=save_every, eval_every=eval_every, eval_max_tokens=eval_max_tokens, resume=resume, fsdp=fsdp,
        lora_r=lora_r, lora_alpha=lora_alpha, num_threads=num_threads, trust_remote_code=trust_remote_code,
    )
    import shlex
    import sys

    command = shlex.join(["t2r-export", *sys.argv[1:]])
    # --resume continues the folder this tool wrote: that is a replacement it asked for
    claim = claimed_output(out, force=force or resume, inputs=[model, *(data or [])]) if main else nullcontext()
    with claim:
        try:
            with _TrainProgress(enabled=main) as progress:
                record = run_finetune(cfg, progress=progress.update, command=command)
        except ValueError as err:
            if not main:
                raise typer.Exit(2)
            fail(str(err))
        except RuntimeError as err:
            if not main:
                raise typer.Exit(1)
            fail(str(err).splitlines()[0], code=1)
    if main:
        _print_summary(record, out)


class _TrainProgress:
    """A rich progress bar per stage (transfer, finetune) with loss, lr and tokens/s."""

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
        return self.bar.__exit__(*exc)

    def update(self, event: dict) -> None:
        phase = event.get("phase")
        if phase in ("transfer", "finetune"):
            if phase not in self.tasks:
                self.tasks[phase] = self.bar.add_task(phase, total=event["steps"], info="")
            info = f"loss {event['loss']:.4g}  lr {event['lr']:.2e}  {event['tokens_per_s']:,.0f} tok/s"
            self.bar.update(self.tasks[phase], completed=event["step"], info=info)
        elif phase == "eval":
            if "eval" not in self.tasks:
                self.tasks["eval"] = self.bar.add_task("valid", total=event["total"], info="")
            self.bar.update(self.tasks["eval"], completed=event["tokens"], total=event["total"])
            if event["tokens"] >= event["total"]:
                self.bar.remove_task(self.tasks.pop("eval"))


def _print_summary(record: dict, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"finetuned → {out}", show_header=False)
    for stage in ("transfer", "finetune"):
        losses = record["losses"][stage]
        if losses:
            table.add_row(f"{stage} steps", f"{len(losses):,}")
            table.add_row(f"{stage} tokens", f"{record['tokens_seen'][stage]:,}")
            table.add_row(f"{stage} last loss", f"{losses[-1]:.4g}")
    table.add_row("valid loss", f"{record['final_valid_loss']:.4f}")
    table.add_row("valid perplexity", f"{record['final_valid_perplexity']:.3f}")
    table.add_row("processes", str(record["world_size"]))
    table.add_row("wall time", f"{record['wall_time_s']:.1f} s")
    console.print(table)


def default_eval_models() -> list[Path]:
    """The bundled teacher and, when shipped, the bundled T2R model."""
    from .. import __file__ as package_file

    teacher = Path(package_file).parent / "teacher"
    return [teacher / "softmax"] + ([teacher / "t2r"] if (teacher / "t2r").is_dir() else [])


def evaluate(
    models: Optional[list[Path]] = typer.Argument(None, metavar="MODEL_DIR", help="Model directories to compare; default: "
                                                  f"{TEACHER_HELP} and, if present, the bundled T2R model."),
    data: Optional[list[Path]] = typer.Option(None, "--data", metavar="PATH", help="Local .txt/.py/.md/.jsonl "
                                              "file or dir, repeatable; default: the stdlib test split."),
    block_size: int = typer.Option(256, help="Tokens of context per block."),
    batch_size: int = typer.Option(8, help="Blocks per forward pass."),
    max_tokens: Optional[int] = typer.Option(None, help="Evaluate only the first this many tokens (default: all)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON to stdout instead of a table."),
    trust_remote_code: bool = typer.Option(False, help=TRUST_HELP),
) -> None:
    _quiet_transformers()
    paths = list(models) if models else default_eval_models()
    if not models and not paths[0].is_dir():
        fail(f"the bundled teacher is missing at {paths[0]}; name the model directories to compare")
    try:
        rows = _evaluate_models(paths, data, block_size, batch_size, max_tokens, trust_remote_code)
    except ValueError as err:
        fail(str(err))
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    where = "--data files" if data else "stdlib test split"
    table = Table(title=f"perplexity on the {where} ({rows[0]['tokens']:,} tokens, block {block_size})")
    for column in ("model", "kind", "params", "test loss", "ppl", "ratio"):
        # full paths wrap rather than being cut: two runs often differ only at the end
        table.add_column(column, justify="left" if column in ("model", "kind") else "right",
                         overflow="fold" if column == "model" else "ellipsis")
    for row in rows:
        table.add_row(row["model"], row["kind"], f"{row['params']:,}", f"{row['loss']:.4f}",
                      f"{row['perplexity']:.3f}", f"{row['ratio']:.3f}")
    console.print(table)


def _evaluate_models(paths: list[Path], data: list[Path] | None, block_size: int, batch_size: int,
                     max_tokens: int | None, trust_remote_code: bool = False) -> list[dict]:
    """Perplexity of each model on one token stream made with the first model's tokenizer."""
    from ..data.corpus import read_text_files, stdlib_token_stream, tokenize_documents
    from ..data.tokenizer import load_tokenizer
    from ..models import is_t2r_model, load_causal_lm
    from ..train.evaluate import perplexity

    if block_size <= 0:
        raise ValueError(f"block size must be a positive integer, got {block_size}")
    for path in paths:
        if not path.is_dir():
            raise ValueError(f"model directory not found: {path}")
    tokenizers = [load_tokenizer(path, trust_remote_code) for path in paths]
    vocab = tokenizers[0].get_vocab()
    for path, tokenizer in zip(paths[1:], tokenizers[1:]):
        if tokenizer.get_vocab() != vocab:
            raise ValueError(f"{path} has a different vocabulary from {paths[0]}; eval compares models that "
                             "share one tokenizer")
    if data:
        stream = tokenize_documents(tokenizers[0], read_text_files(data))
    else:
        stream = stdlib_token_stream(tokenizers[0], "test")
    rows = []
    with _EvalProgress() as progress:
        for path in paths:
            model = load_causal_lm(path, trust_remote_code=trust_remote_code)
            progress.start(path.name)
            score = perplexity(model, stream, block_size, batch_size, max_tokens, progress.update)
            rows.append({"model": str(path), "kind": "t2r" if is_t2r_model(model) else "softmax",
                         "params": sum(p.numel() for p in model.parameters()), **score})
    for row in rows:
        row["ratio"] = row["perplexity"] / rows[0]["perplexity"]
    return rows


class _EvalProgress:
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

    def start(self, name: str) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(name, total=None)

    def update(self, event: dict) -> None:
        self.bar.update(self.task, completed=event["tokens"], total=event["total"])
