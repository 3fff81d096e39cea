"""`t2r-export info BUNDLE`: what a bundle holds, without torch."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console, fail
from .verification import print_verification


def info(bundle: Path = typer.Argument(..., help="Bundle directory written by `t2r-export onnx`.")) -> None:
    from rich.table import Table

    from ..runtime.bundle import BundleError
    from ..runtime.info import bundle_info

    try:
        found = bundle_info(bundle)
    except BundleError as err:
        fail(str(err))
    rt = found.config
    console.print(f"[bold]{bundle}[/]: {rt.architecture}, {rt.num_layers} layers, {rt.num_heads} heads / "
                  f"{rt.num_kv_heads} KV heads, head_dim {rt.head_dim}, vocab {rt.vocab_size}", soft_wrap=True)
    console.print(f"contract: format version {rt.format_version}, opset {rt.opset}, feature map "
                  f"{rt.feature_map or '?'} (k={rt.feature_dim})"
                  + (f", sliding window {rt.window}" if rt.window else "") + f", state {rt.state_dtype}, "
                  f"{rt.state_bytes_per_sequence or 0:,} bytes/sequence, max position "
                  f"{rt.max_position or 'unbounded (RoPE)'}", soft_wrap=True)
    quantization = rt.quantization or {}
    # int8 is calibrated on prompts; the weight-only plans quantize blocks of weights, nothing calibrated
    recipe = (f"{quantization['prompts']} calibration prompts" if "prompts" in quantization
              else f"{quantization.get('bits')}-bit blocks of {quantization.get('block_size')}")
    console.print(f"precision: {rt.precision}" + (f" ({quantization.get('tool')}, {recipe})" if quantization else ""),
                  soft_wrap=True)
    table = Table(title=f"files ({found.total_bytes / 1e6:.1f} MB)")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    table.add_column("referenced by")
    for name, size in found.sizes.items():
        table.add_row(name, f"{size:,}", ", ".join(found.shared.get(name, [])))
    console.print(table)
    if found.shared:
        for data, graphs in found.shared.items():
            console.print(f"weights: {data} is shared by {' and '.join(graphs)}" if len(graphs) > 1 else
                          f"weights: {data} is used by {graphs[0]} only", soft_wrap=True)
    else:
        console.print("weights: inside each graph (no external data; each graph holds its own copy)")
    print_verification(rt)
    tools = ", ".join(f"{k} {v}" for k, v in sorted(rt.tools.items())) or "not recorded"
    console.print(f"provenance: {tools}; checkpoint sha256 {rt.source_checkpoint_sha256 or 'not recorded'}",
                  soft_wrap=True)
