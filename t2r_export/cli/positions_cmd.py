"""`t2r-export eval --positions`: perplexity by position bucket, teacher and variants, with a plot."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import check_writable_parent, console, fail


def evaluate_positions(paths: list[Path], data: list[Path] | None, length: int, sequences: int, chunk: int,
                       plot: Path | None, json_out: bool, tokenizer_path: Path | None = None) -> None:
    from ..data.corpus import read_text_files, stdlib_token_stream, tokenize_documents
    from ..data.tokenizer import load_tokenizer
    from ..models import is_t2r_model, load_causal_lm
    from ..train.positions import plot_positions, position_perplexity

    if plot is not None:
        if plot.suffix.lower() != ".png":
            fail(f"--plot must name a .png file, got {plot}")
        check_writable_parent(plot, "plot file")
    try:
        for path in paths:
            if not path.is_dir():
                raise ValueError(f"model directory not found: {path}")
        tokenizer = load_tokenizer(tokenizer_path or paths[0])
        stream = (tokenize_documents(tokenizer, read_text_files(data)) if data
                  else stdlib_token_stream(tokenizer, "test"))
        rows = []
        for path in paths:
            model = load_causal_lm(path)
            window = model.config.t2r.get("window", 0) if is_t2r_model(model) else 0
            # with a window: the model, then each part alone (is the linear branch carrying anything?)
            for parts in ("both", "linear", "window") if window else ("both",):
                score = position_perplexity(model, stream, length, sequences, chunk, parts=parts)
                label = path.name if parts == "both" else f"{path.name} ({parts} part only)"
                rows.append({"model": str(path), "label": label, "parts": parts, "window": window,
                             "kind": "t2r" if is_t2r_model(model) else "softmax", **score})
    except ValueError as err:
        fail(str(err))
    if plot is not None:
        plot_positions(rows, plot)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    where = "--data files" if data else "stdlib test split"
    table = Table(title=f"perplexity by position ({sequences} x {length:,} tokens of the {where})")
    table.add_column("model", overflow="fold")
    for label in rows[0]["buckets"]:
        table.add_column(label, justify="right")
    for row in rows:
        table.add_row(row["label"], *("-" if p is None else f"{p:.2f}" for p in row["perplexity"]))
    console.print(table)
    if plot is not None:
        console.print(f"plot: {plot}")
