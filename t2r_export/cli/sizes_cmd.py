"""`t2r-export sizes`: public models' configs (random weights) through swap -> onnx -> generate -> check --trt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import check_writable_parent, console, fail


def sizes(
    models: str = typer.Option("gpt2-124m,pythia-160m,smollm2-135m,qwen2.5-0.5b,llama-3.2-1b",
                               help="Comma-separated models: gpt2-124m, pythia-160m, smollm2-135m, qwen2.5-0.5b, "
                                    "llama-3.2-1b."),
    precisions: str = typer.Option("fp32,fp16,int8", help="Comma-separated bundle precisions: fp32, fp16, int8."),
    work: Path = typer.Option(..., "--work", help="Scratch folder for checkpoints, bundles and logs."),
    threads: int = typer.Option(0, help="ONNX Runtime threads for generate; 0 = its default."),
    verify: bool = typer.Option(True, help="Export with verification against torch (as a user would)."),
    keep: bool = typer.Option(False, help="Keep checkpoints and bundles in --work (they are large)."),
    markdown: Optional[Path] = typer.Option(None, help="Also write the table as Markdown to this file."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the measurements as JSON."),
) -> None:
    from rich.table import Table

    from ..bench.sizes import MODELS, PRECISIONS, TABLE_COLUMNS, markdown_table, run_sizes, table_rows

    chosen = [m.strip() for m in models.split(",") if m.strip()]
    wanted = [p.strip() for p in precisions.split(",") if p.strip()]
    for value, allowed, what in ((chosen, MODELS, "--models"), (wanted, PRECISIONS, "--precisions")):
        unknown = [v for v in value if v not in allowed]
        if unknown or not value:
            fail(f"{what}: unknown or empty {', '.join(unknown) or 'list'}; expected a comma-separated subset of "
                 f"{', '.join(allowed)}")
    check_writable_parent(work, "--work folder")
    for path in (markdown, json_out):
        if path is not None:
            check_writable_parent(path, "output file")
    finished: list = []

    def on_row(row) -> None:
        # rewritten after every row, so an interrupted run keeps what it measured
        finished.append(row.to_json())
        if json_out is not None:
            json_out.write_text(json.dumps(finished, indent=2) + "\n")

    try:
        rows = run_sizes(chosen, wanted, work, threads=threads, verify=verify, keep=keep,
                         progress=lambda message: console.log(message), on_row=on_row)
    except RuntimeError as err:
        fail(str(err), code=1)
    table = Table(title="real model sizes (random weights, public configs)")
    for column in TABLE_COLUMNS:
        table.add_column(column)
    for cells in table_rows(rows):
        table.add_row(*cells)
    console.print(table)
    if markdown is not None:
        markdown.write_text(markdown_table(rows) + "\n")
    failed = [f"{r.model} {r.precision}" for r in rows
              if not (r.export.ok and r.generate and r.generate.ok and r.check and r.check.ok)]
    if failed:
        fail(f"failed stages in: {', '.join(failed)} (see {work}/*/log.txt)", code=1)
