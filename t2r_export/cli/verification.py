"""A written bundle and its verification record as the CLI shows them (`onnx`, `demo`, `info`)."""

from __future__ import annotations

from .common import console


def print_bundle(out, rt) -> None:
    """One line about the bundle at ``out``, then its verification record."""
    console.print(f"[bold green]bundle[/] {out}: {rt.architecture}, {rt.num_layers} layers, "
                  f"{rt.num_kv_heads} KV heads × k={rt.feature_dim} × d={rt.head_dim}, "
                  f"state {rt.state_bytes_per_sequence:,} bytes/sequence, precision {rt.precision}", soft_wrap=True)
    print_verification(rt)


def print_verification(rt) -> None:
    """The verification record: one row per figure (worst over layers) with its tolerance, then a verdict."""
    from rich.table import Table

    record = rt.verification
    if record is None:
        console.print("[yellow]not verified[/] (exported with --no-verify)")
        return
    table = Table(title=f"verification: {rt.precision} bundle vs {record.reference}")
    for col in ("figure", "value", "tolerance", ""):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for f in record.figures:
        bound = "≥" if f.bound == "min" else "≤"
        table.add_row(f.name, f"{f.value:.3g}", f"{bound} {f.tolerance:.3g}", "ok" if f.passed else "[red]FAIL[/]")
    console.print(table)
    greedy = {True: "greedy tokens identical", False: "greedy tokens differ", None: "greedy tokens not compared"}
    verdict = "[bold green]PASS[/]" if record.passed else "[bold red]FAIL[/]"
    console.print(f"{verdict}: {sum(f.passed for f in record.figures)}/{len(record.figures)} figures within "
                  f"tolerance; {greedy[record.greedy_identical]} to the fp32 model's", soft_wrap=True)
