"""The `t2r-export` command line: thin wrappers that parse, build a config, call the library.

Each command lives in its own module and imports torch (or anything heavy) inside the function,
so `t2r-export --help` and the torch-free commands start fast and work on a runtime-only install.
"""

from __future__ import annotations

import typer

from . import (bench_cmd, demo_cmd, experiment_cmd, export_cmd, pretrain_cmd, runtime_cmd, sizes_cmd,
               swap_cmd, train_cmd, trt_cmd)

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


COMMANDS = [
    ("demo", demo_cmd.demo, "The whole pipeline on the bundled model: export, verify, generate, compare."),
    ("swap", swap_cmd.swap, "Swap every softmax attention of a HF causal LM for T2R linear attention."),
    ("pretrain", pretrain_cmd.pretrain, "Train the bundled softmax teacher on the Python standard library."),
    ("finetune", train_cmd.finetune, "Swap, then attention transfer and next-token finetuning (DDP-ready)."),
    ("eval", train_cmd.evaluate, "Test-split perplexity of softmax and T2R models, side by side."),
    ("onnx", export_cmd.onnx_export, "Export step + prefill ONNX graphs with explicit fp32 state as a verified "
                                     "bundle."),
    ("check", trt_cmd.check, "Static checks of a bundle's graphs (--trt: TensorRT 10 ONNX-parser compatibility)."),
    ("trt", trt_cmd.trt, "Build TensorRT engines (fp16 / int8, fp32 state) into a bundle. Needs TensorRT + GPU."),
    ("generate", runtime_cmd.generate, "Generate text from a bundle with the torch-free runtime."),
    ("bench", bench_cmd.bench, "Decode/prefill speed and memory of T2R vs the softmax original, one run."),
    ("sizes", sizes_cmd.sizes, "Public models' configs (random weights) through swap, onnx, generate and check "
                               "--trt: time, peak memory, bundle size."),
    ("experiment", experiment_cmd.experiment, "The paper's comparison on the bundled teacher (T2R vs ELU vs RFA vs "
                                              "scratch, transfer, feature sizes)."),
]
for _name, _fn, _help in COMMANDS:
    app.command(_name, help=_help)(_fn)


def main() -> None:
    import os

    # HF's per-file progress bars drown the one-line messages a user needs to see
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    app()


if __name__ == "__main__":
    main()
