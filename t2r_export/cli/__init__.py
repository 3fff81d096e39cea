"""The `t2r-export` command line: thin wrappers that parse, build a config, call the library.

Each command lives in its own module and imports torch (or anything heavy) inside the function,
so `t2r-export --help` and the torch-free commands start fast and work on a runtime-only install.
"""

from __future__ import annotations

import typer

from . import export_cmd, runtime_cmd, swap_cmd

app = typer.Typer(
    name="t2r-export",
    help="Finetune pretrained transformers into RNNs (T2R) and export them as constant-memory decoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Finetune pretrained transformers into RNNs (T2R) and export them as constant-memory decoders."""


app.command("swap", help="Swap every softmax attention of a HF causal LM for T2R linear attention.")(swap_cmd.swap)

app.command("onnx", help="Export step + prefill ONNX graphs with explicit fp32 state as a verified bundle.")(
    export_cmd.onnx_export)

app.command("generate", help="Generate text from a bundle with the torch-free runtime (ONNX Runtime).")(
    runtime_cmd.generate)

try:
    from . import pretrain_cmd

    app.command("pretrain", help="Train the bundled softmax teacher on the Python standard library.")(
        pretrain_cmd.pretrain)
except ImportError:  # written in a parallel branch; absent until it lands
    pass


def main() -> None:
    import os

    # HF's per-file progress bars drown the one-line messages a user needs to see
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    app()


if __name__ == "__main__":
    main()
