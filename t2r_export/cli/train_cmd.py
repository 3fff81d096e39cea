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

from .common import FORCE_HELP, TRUST_HELP, check_output_early, claimed_output, console, fail
from .progress import EvalProgress, TrainProgress, quiet_transformers

TEACHER_HELP = "the bundled softmax teacher"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def finetune(
    model: Optional[Path] = typer.Argument(None, metavar="MODEL_DIR", help=f"Local HF causal LM (softmax or T2R); default: {TEACHER_HELP}."),
    tokenizer: Optional[Path] = typer.Option(None, help="tokenizer.json (or a folder holding it); default: the "
                                                        "model folder's own."),
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
    feature_map: str = typer.Option("t2r", help="t2r | hedgehog | elu | rfa (used when MODEL is a softmax model)."),
    feature_dim: int = typer.Option(32, help="Feature size k of phi."),
    init: str = typer.Option("default", help="Feature-map init: default | identity."),
    window: int = typer.Option(0, help="Sliding window W of the hybrid (0 = off; used when MODEL is a softmax "
                               "model)."),
    decay: bool = typer.Option(False, "--decay", help="With --window: the linear part forgets, by a learned "
                               "gamma per KV head (used when MODEL is a softmax model)."),
    distill: bool = typer.Option(False, "--distill", help="Finetune on KL to the softmax MODEL's next-token "
                                 "distribution instead of the observed next token."),
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
    lora_dropout: float = typer.Option(0.0, help="LoRA dropout (--train lora)."),
    warmup_fraction: float = typer.Option(0.05, help="Fraction of the finetune steps spent warming the lr up."),
    min_lr_ratio: float = typer.Option(0.1, help="The cosine decay ends at lr x this."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    beta1: float = typer.Option(0.9, help="AdamW beta1."),
    beta2: float = typer.Option(0.95, help="AdamW beta2."),
    grad_clip: float = typer.Option(1.0, help="Gradient-norm clip."),
    eval_batch_size: int = typer.Option(8, help="Blocks per forward pass in validation."),
    log_every: int = typer.Option(10, help="Log a training line every this many steps."),
    num_threads: Optional[int] = typer.Option(None, help="CPU threads (default: torch's)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Token-stream cache (default: $T2R_EXPORT_CACHE or "
                                             "~/.cache/t2r_export)."),
    max_files: Optional[int] = typer.Option(None, hidden=True, help="Only the first N files of each stdlib split."),
    trust_remote_code: bool = typer.Option(False, help=TRUST_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    from ..preflight import check_model_and_tokenizer
    from ..teacher import bundled_model_dir

    main = _rank() == 0
    # every cheap check before torch is imported: a wrong path fails in a second, not after loading
    try:
        check_model_and_tokenizer(model or bundled_model_dir("softmax"), tokenizer, need_fast=False)
        if main:
            check_output_early(out, force or resume, inputs=[model, *(data or [])])
    except ValueError as err:
        if not main:
            raise typer.Exit(2)
        fail(str(err))

    from ..train.finetune import FinetuneConfig, finetune as run_finetune

    quiet_transformers()
    cfg = FinetuneConfig(
        model=model, tokenizer=tokenizer, out_dir=out, data=list(data) if data else None, dataset=dataset, steps=steps,
        attention_transfer_steps=attention_transfer_steps, train=train, lr=lr,
        attention_transfer_lr=attention_transfer_lr, batch_size=batch_size, block_size=block_size,
        grad_accum=grad_accum, feature_map=feature_map, feature_dim=feature_dim, init=init, seed=seed,
        window=window, decay=decay, distill=distill, save_every=save_every, eval_every=eval_every, eval_max_tokens=eval_max_tokens,
        resume=resume, fsdp=fsdp,
        lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, warmup_fraction=warmup_fraction,
        min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, beta1=beta1, beta2=beta2, grad_clip=grad_clip,
        eval_batch_size=eval_batch_size, log_every=log_every, num_threads=num_threads, cache_dir=cache_dir,
        max_files=max_files, trust_remote_code=trust_remote_code,
    )
    import shlex
    import sys

    command = shlex.join(["t2r-export", *sys.argv[1:]])
    # --resume continues the folder this tool wrote: that is a replacement it asked for
    claim = claimed_output(out, force=force or resume, inputs=[model, *(data or [])]) if main else nullcontext()
    with claim:
        try:
            with TrainProgress(enabled=main) as progress:
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
    positions: bool = typer.Option(False, "--positions", help="Perplexity by position bucket (0-256, 256-1k, "
                                   "1k-4k, 4k-16k) over long sequences, state carried across chunks; window models "
                                   "also with each part alone."),
    positions_length: int = typer.Option(16384, help="--positions: tokens per sequence (at most 16384)."),
    sequences: int = typer.Option(1, help="--positions: consecutive sequences of the stream to average over."),
    plot: Optional[Path] = typer.Option(None, help="--positions: write a PNG plot here."),
    tokenizer: Optional[Path] = typer.Option(None, help="tokenizer.json (or a folder holding it) for every model; "
                                                        "default: the first model's own."),
    trust_remote_code: bool = typer.Option(False, help=TRUST_HELP),
) -> None:
    from ..preflight import SLOW_TOKENIZER_FILES, check_model_dir, check_tokenizer, tokenizer_file

    paths = list(models) if models else default_eval_models()
    if not models and not paths[0].is_dir():
        fail(f"the bundled teacher is missing at {paths[0]}; name the model directories to compare")
    # every cheap check before torch is imported
    try:
        if block_size <= 0:
            raise ValueError(f"block size must be a positive integer, got {block_size}")
        # exported bundles (a runtime.json) are scored by their step graph beside the models
        bundles = [path for path in paths if (path / "runtime.json").is_file()]
        if bundles and positions:
            raise ValueError(f"--positions scores model directories; {bundles[0]} is an exported bundle")
        if bundles:
            from ..runtime.bundle import load_bundle

            for path in bundles:
                load_bundle(path)
        infos = [check_model_dir(path) for path in paths if path not in bundles]
        # a shared --tokenizer must fit every model; a model's own tokenizer its own model (the others must
        # share its vocabulary, checked with the tokenizers themselves before any weights load)
        sizes = [i.vocab_size for i in (infos if tokenizer is not None else infos[:1]) if i.vocab_size is not None]
        slow_only = tokenizer is None and not (paths[0] / "tokenizer.json").is_file() and any(
            (paths[0] / name).is_file() for name in SLOW_TOKENIZER_FILES)
        if not slow_only:
            check_tokenizer(tokenizer_file(paths[0], tokenizer), min(sizes, default=None))
        for path in data or []:
            if not path.exists():
                raise ValueError(f"data path {path} does not exist: expected a file or directory of "
                                 ".txt/.py/.md/.jsonl")
    except ValueError as err:
        fail(str(err))
    quiet_transformers()
    if positions:
        from .positions_cmd import evaluate_positions

        evaluate_positions(paths, data, positions_length, sequences, block_size, plot, json_out, tokenizer)
        return
    from ..train.evaluate import evaluate_models

    try:
        with EvalProgress() as progress:
            rows = evaluate_models(paths, data, block_size, batch_size, max_tokens, progress=progress.update,
                                   tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    except ValueError as err:
        fail(str(err))
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    where = "--data files" if data else "stdlib test split"
    table = Table(title=f"perplexity on the {where} ({rows[0]['tokens']:,} tokens, block {block_size})")
    agreement = any(row.get("agreement") is not None for row in rows)
    columns = ("model", "kind", "params", "test loss", "ppl", "ratio") + (("top-1 vs source",) if agreement else ())
    for column in columns:
        # full paths wrap rather than being cut: two runs often differ only at the end
        table.add_column(column, justify="left" if column in ("model", "kind") else "right",
                         overflow="fold" if column == "model" else "ellipsis")
    for row in rows:
        cells = [row["model"], row["kind"], f"{row['params']:,}" if row["params"] is not None else "—",
                 f"{row['loss']:.4f}", f"{row['perplexity']:.3f}", f"{row['ratio']:.3f}"]
        if agreement:
            cells.append(f"{100 * row['agreement']:.2f}%" if row.get("agreement") is not None else "—")
        table.add_row(*cells)
    console.print(table)
