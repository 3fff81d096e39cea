"""``t2r-export pretrain``: train the softmax teacher on the CPython standard library.

Thin: parse options, build a ``PretrainConfig``, call ``pretrain_teacher``, show progress with rich.
Torch is imported only when the command runs, so ``t2r-export --help`` works without it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .common import FORCE_HELP, check_output_early, claimed_output, fail

# kept equal to PretrainConfig's defaults (a test checks), so --help needs no torch import
DEFAULT_OUT = Path("runs/teacher")
DEFAULT_STEPS = 550
DEFAULT_BATCH_SIZE = 16
DEFAULT_LR = 2e-3
DEFAULT_WARMUP_STEPS = 50
DEFAULT_SEED = 1337
DEFAULT_EVAL_MAX_TOKENS = 200_000

PHASE_MESSAGES = {
    "tokenizer": "training the BPE tokenizer on the train split",
    "tokenize": "tokenizing train / valid / test (cached after the first run)",
    "save": "saving model, tokenizer and training.json",
}


def _fail(message: str) -> None:
    fail(message)


def _progress_handler(bar: Progress, steps: int):
    train_task = bar.add_task("training", total=steps)
    eval_tasks: dict[str, int] = {}

    def handle(event: dict) -> None:
        phase = event["phase"]
        if phase == "train":
            description = f"training  loss {event['loss']:.3f}  lr {event['lr']:.1e}  {event['tokens_per_s']:.0f} tok/s"
            bar.update(train_task, completed=event["step"], description=description)
        elif phase == "eval":
            split = event["split"]
            if split not in eval_tasks:
                eval_tasks[split] = bar.add_task(f"eval {split}", total=event["total"])
            bar.update(eval_tasks[split], completed=event["tokens"])
        else:
            bar.console.print(f"[dim]{PHASE_MESSAGES.get(phase, phase)}[/dim]")

    return handle


def _summary(record: dict, out: Path) -> Table:
    table = Table(title=f"teacher saved to {out}")
    table.add_column("split")
    table.add_column("loss", justify="right")
    table.add_column("perplexity", justify="right")
    table.add_column("tokens", justify="right")
    for split in ("valid", "test"):
        score = record[split]
        table.add_row(split, f"{score['loss']:.4f}", f"{score['perplexity']:.3f}", f"{score['tokens']:,}")
    table.caption = (
        f"{record['steps']} steps, {record['tokens_seen']:,} tokens seen, {record['parameters']:,} parameters, "
        f"{record['wall_time_s']:.0f} s wall"
    )
    return table


def pretrain(
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Output directory (model, tokenizer, training.json)."),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", help="Blocks of 256 tokens per step."),
    lr: float = typer.Option(DEFAULT_LR, "--lr", help="Peak learning rate (cosine decay to lr/10)."),
    warmup_steps: int = typer.Option(DEFAULT_WARMUP_STEPS, "--warmup-steps", help="Linear warmup steps."),
    seed: int = typer.Option(DEFAULT_SEED, "--seed", help="Seed for init and data order."),
    num_threads: Optional[int] = typer.Option(None, "--num-threads", help="Torch CPU threads (default: all cores)."),
    eval_max_tokens: Optional[int] = typer.Option(
        DEFAULT_EVAL_MAX_TOKENS, "--eval-max-tokens", help="Evaluate only the first N tokens of valid/test."
    ),
    max_files: Optional[int] = typer.Option(None, "--max-files", help="Use only the first N files of each split (quick runs)."),
    block_size: int = typer.Option(256, help="Tokens per block."),
    min_lr: Optional[float] = typer.Option(None, help="Where the cosine decay ends (default: lr / 10)."),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay on matrices."),
    beta1: float = typer.Option(0.9, help="AdamW beta1."),
    beta2: float = typer.Option(0.95, help="AdamW beta2."),
    grad_clip: float = typer.Option(1.0, help="Gradient-norm clip."),
    vocab_size: int = typer.Option(4096, help="BPE vocabulary size."),
    hidden_size: int = typer.Option(256, help="Model width."),
    num_layers: int = typer.Option(6, help="Decoder layers."),
    num_heads: int = typer.Option(4, help="Query heads."),
    head_dim: int = typer.Option(64, help="Head size."),
    num_kv_heads: int = typer.Option(2, help="Key/value heads (GQA)."),
    intermediate_size: int = typer.Option(768, help="SwiGLU MLP width."),
    max_position_embeddings: int = typer.Option(2048, help="Positions the model is configured for."),
    rope_theta: float = typer.Option(10000.0, help="RoPE base."),
    log_every: int = typer.Option(20, help="Log a training line every this many steps."),
    eval_batch_size: int = typer.Option(16, help="Blocks per forward pass in evaluation."),
    cache_dir: Optional[Path] = typer.Option(None, help="Token-stream cache (default: $T2R_EXPORT_CACHE or "
                                             "~/.cache/t2r_export)."),
    save_dtype: str = typer.Option("float16", help="Storage dtype of the weights: float32 | float16 | bfloat16."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Pretrain the bundled softmax teacher (a small Llama) on the CPython standard library source."""
    if steps <= 0:
        _fail(f"--steps must be a positive integer, got {steps}")
    check_output_early(out, force)

    from t2r_export.train.pretrain import PretrainConfig, pretrain_teacher

    cfg = PretrainConfig(
        out_dir=out,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        seed=seed,
        num_threads=num_threads,
        eval_max_tokens=eval_max_tokens,
        max_files=max_files,
        block_size=block_size,
        min_lr=min_lr,
        weight_decay=weight_decay,
        beta1=beta1,
        beta2=beta2,
        grad_clip=grad_clip,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        head_dim=head_dim,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        log_every=log_every,
        eval_batch_size=eval_batch_size,
        cache_dir=cache_dir,
        save_dtype=save_dtype,
    )
    console = Console()
    command = shlex.join(["t2r-export", *sys.argv[1:]])
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    try:
        with claimed_output(out, force), Progress(*columns, console=console) as bar:
            record = pretrain_teacher(cfg, progress=_progress_handler(bar, steps), command=command)
    except ValueError as err:
        _fail(str(err))
    console.print(_summary(record, out))


def ship(
    src: Path = typer.Argument(..., help="A trained model directory (e.g. a finetune or pretrain --out)."),
    dst: Path = typer.Argument(..., help="Where the bundled copy goes (e.g. t2r_export/teacher/t2r)."),
) -> None:
    """Store a trained model as a bundled one: fp16 weights on disk, fp32 compute, its records beside."""
    from .common import check_writable_parent, console, fail

    if not (src / "config.json").is_file():
        fail(f"{src} is not a model directory (no config.json)")
    check_writable_parent(dst)
    from ..teacher.ship import ship as ship_model

    try:
        ship_model(src, dst)
    except ValueError as err:
        fail(str(err))
    console.print(f"[bold green]shipped[/] {src} → {dst}", highlight=False)
