"""The `t2r-export` command line: thin wrappers that parse, build a config, call the library.

Each command lives in its own module and imports torch (or anything heavy) inside the function,
so `t2r-export --help` and the torch-free commands start fast and work on a runtime-only install.
`bench` and `experiment` are groups whose first subcommand is also what the bare group runs
(`t2r-export bench [BUNDLE]` is `t2r-export bench run [BUNDLE]`).
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from . import (bench_cmd, bench_tools_cmd, demo_cmd, experiment_cmd, export_cmd, info_cmd, pretrain_cmd,
               runtime_cmd, swap_cmd, train_cmd, trt_cmd)


class DefaultCommandGroup(TyperGroup):
    """A group that runs ``default_command`` when the first argument names none of its subcommands.

    ``positional_default``: also when that argument is a positional one (``bench BUNDLE``); else only
    for options or no arguments (``experiment --quick``), so a mistyped subcommand is an error.
    """

    default_command: str = ""
    positional_default: bool = False

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        first = args[0] if args else None
        is_help = first in ("--help", "-h")
        if not is_help and first not in self.commands and (
                first is None or first.startswith("-") or self.positional_default):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def _group(default: str, positional_default: bool) -> type[TyperGroup]:
    return type(f"{default.title()}DefaultGroup", (DefaultCommandGroup,),
                {"default_command": default, "positional_default": positional_default})


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
    ("ship", pretrain_cmd.ship, "Store a trained model as a bundled one (fp16 weights on disk, fp32 compute)."),
    ("onnx", export_cmd.onnx_export, "Export step + prefill ONNX graphs with explicit fp32 state as a verified "
                                     "bundle."),
    ("check", trt_cmd.check, "Static checks of a bundle's graphs (--trt: TensorRT 10 ONNX-parser compatibility)."),
    ("trt", trt_cmd.trt, "Build TensorRT engines (fp16 / int8, fp32 state) into a bundle. Needs TensorRT + GPU."),
    ("info", info_cmd.info, "What a bundle holds: contract, precision, sizes, weight sharing, verification, "
                            "provenance."),
    ("generate", runtime_cmd.generate, "Generate text from a bundle with the torch-free runtime."),
]
# (group, help, default subcommand, does a positional argument select the default, subcommands)
GROUPS = [
    ("bench", "Benchmarks: `bench [BUNDLE]` (= `bench run`) compares T2R with the softmax original; the other "
              "subcommands measure one thing each.", "run", True, [
        ("run", bench_cmd.bench, "Decode/prefill speed and memory of T2R vs the softmax original, one run."),
        ("latency", bench_tools_cmd.latency, None),
        ("precision", bench_tools_cmd.precision, None),
        ("scaling", bench_tools_cmd.scaling, None),
        ("startup", bench_tools_cmd.startup, None),
    ]),
    ("experiment", "Experiments on the bundled teacher: `experiment` (= `experiment paper`) and `experiment seeds`.",
     "paper", False, [
        ("paper", experiment_cmd.paper, "The paper's comparison on the bundled teacher (T2R vs ELU vs RFA vs "
                                        "scratch, transfer, feature sizes)."),
        ("seeds", experiment_cmd.seeds, None),
    ]),
]
for _name, _fn, _help in COMMANDS:
    app.command(_name, help=_help)(_fn)
for _name, _help, _default, _positional, _subcommands in GROUPS:
    _sub = typer.Typer(name=_name, help=_help, cls=_group(_default, _positional), add_completion=False,
                       pretty_exceptions_enable=False)
    for _sub_name, _fn, _sub_help in _subcommands:
        _sub.command(_sub_name, help=_sub_help)(_fn)
    app.add_typer(_sub, name=_name)


def main() -> None:
    import os

    # HF's per-file progress bars drown the one-line messages a user needs to see
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    app()


if __name__ == "__main__":
    main()
