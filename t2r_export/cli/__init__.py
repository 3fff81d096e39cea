"""The `t2r-export` command line: thin wrappers that parse, build a config, call the library.

Each command lives in its own module and imports torch (or anything heavy) inside the function,
so `t2r-export --help` and the torch-free commands start fast and work on a runtime-only install.
`bench` and `experiment` are groups whose first subcommand is also what the bare group runs
(`t2r-export bench [BUNDLE]` is `t2r-export bench run [BUNDLE]`).
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from ..interrupt import report_interrupt, restore_default_handler
from . import (bench_cmd, bench_tools_cmd, demo_cmd, experiment_cmd, export_cmd, info_cmd, pretrain_cmd,
               runtime_cmd, serve_cmd, sizes_cmd, swap_cmd, train_cmd, triton_cmd, trt_cmd)
from .common import settings


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
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of a failure instead of one line."),
) -> None:
    """Finetune pretrained transformers into RNNs (T2R) and export them as constant-memory decoders."""
    settings.debug = debug
    # the setting lives for one invocation (tests and embedders call the app many times in one process)
    ctx.call_on_close(lambda: setattr(settings, "debug", False))


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
    ("serve", serve_cmd.serve, "An OpenAI-compatible HTTP server over a bundle: continuous batching, streaming, "
                               "prefix cache."),
    ("serve-load", serve_cmd.serve_load, "Load-test `serve` on 127.0.0.1: requests/s, tokens/s, latency, memory, "
                                         "correctness."),
    ("triton", triton_cmd.triton, "A Triton Inference Server model repository: sequence batcher, implicit state, "
                                  "client example."),
    ("sizes", sizes_cmd.sizes, "Public models' configs (random weights) through swap, onnx, generate and check "
                               "--trt: time, peak memory, bundle size."),
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
        ("streams", bench_tools_cmd.streams, None),
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
    """The console script: every failure is one line (exit 2 bad input, 1 failed, 130 Ctrl-C)."""
    import os
    import sys

    # HF's per-file progress bars drown the one-line messages a user needs to see
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    restore_default_handler()
    sys.exit(run(sys.argv[1:]))


def run(args: list[str]) -> int:
    """Run the command line on ``args``; returns the exit code instead of raising."""
    # read here too: the app's own setting ends with the invocation, before an escaping error arrives
    debug = "--debug" in args
    try:
        app(args=args, prog_name="t2r-export")
    except SystemExit as done:
        # typer answers Ctrl-C with a silent exit 130; say what happened, in one line
        if done.code == 130 and _interrupted(done):
            if debug:
                raise KeyboardInterrupt from None
            return report_interrupt()
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except KeyboardInterrupt:
        if debug:
            raise
        return report_interrupt()
    except Exception as err:
        if debug:
            raise
        from rich.markup import escape

        from .common import err_console

        text = (str(err).strip() or type(err).__name__).splitlines()[0][:300]
        err_console.print(f"[bold red]error:[/] {escape(f'unexpected {type(err).__name__}: {text}')} "
                          "(rerun with --debug for the traceback)", highlight=False, soft_wrap=True)
        return 1
    return 0


def _interrupted(done: SystemExit) -> bool:
    """True when the exit came from a KeyboardInterrupt (Ctrl-C) somewhere in its chain."""
    seen = done.__context__
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


if __name__ == "__main__":
    main()
