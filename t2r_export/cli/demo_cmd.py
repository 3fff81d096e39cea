"""`t2r-export demo`: the whole pipeline on a bundled model, offline, in a few minutes.

``--model t2r`` (default) is the paper's T2R model; ``--model hybrid`` the Hedgehog + sliding-window
model (docs/quality.md), whose state also holds the window.

(optional short finetune) → export step + prefill graphs → verify against torch → generate with
the torch-free runtime → a short speed and memory comparison against the softmax teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import FORCE_HELP, check_output_early, console, fail

DEFAULT_PROMPT = "def read_config(path):\n"


def demo(
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Where the bundle is kept (default: a temporary "
                                                                 "folder, removed at the end)."),
    model: str = typer.Option("t2r", help="Bundled model: t2r (the paper's T2R) | hybrid (Hedgehog + a 64-token "
                                          "sliding window, closer to the teacher)."),
    finetune_steps: int = typer.Option(0, help="First finetune the softmax teacher for this many steps (0: use "
                                               "the bundled T2R model)."),
    prompt: str = typer.Option(DEFAULT_PROMPT, help="Prompt for the generation step."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
    temperature: float = typer.Option(0.7, help="Sampling temperature for the generation step (0 = greedy)."),
    seed: int = typer.Option(0, help="Sampling seed: the demo's text is the same every run."),
    threads: int = typer.Option(2, help="Threads for ONNX Runtime and torch in the speed comparison."),
    speed: bool = typer.Option(True, help="Run the short speed/memory comparison at the end."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    import tempfile

    from ..teacher import bundled_model_dir

    if finetune_steps < 0:
        fail(f"--finetune-steps must be ≥ 0, got {finetune_steps}")
    if model not in ("t2r", "hybrid"):
        fail(f"unknown --model {model!r}; expected t2r or hybrid")
    if finetune_steps and model != "t2r":
        fail("--finetune-steps makes a new T2R model from the teacher; it cannot be combined with --model hybrid")
    if not prompt:
        fail("the prompt is empty; give at least one character of text")
    if out is not None:
        check_output_early(out, force, what="bundle directory")
    try:
        model_dir = bundled_model_dir(model)
    except ValueError as err:
        fail(str(err))
    from ..export.bundle import export_bundle
    from .verification import print_bundle

    with tempfile.TemporaryDirectory(prefix="t2r-demo-") as scratch:
        # nothing is written anywhere the user did not name: without -o the bundle lives in the scratch folder
        keep = out is not None
        out = out if keep else Path(scratch) / "bundle"
        if finetune_steps:
            model_dir = _finetune(Path(scratch) / "t2r", finetune_steps)
        console.rule("[bold]1. export + verify")
        with console.status(f"exporting {model_dir} → {out}"):
            try:
                result = export_bundle(model_dir, out, overwrite=force)
            except ValueError as err:
                fail(str(err))
        print_bundle(result.out, result.runtime)
        console.rule("[bold]2. generate (torch-free runtime, ONNX Runtime)")
        tokens_per_s = _generate(out, prompt, max_new_tokens, threads, temperature, seed)
        if speed:
            console.rule("[bold]3. speed and memory vs the softmax teacher (bench --quick, 3 paths)")
            _speed(out, model_dir, threads)
    if keep:
        console.print(f"[bold green]done[/]: bundle at {out}; try `t2r-export generate {out} --prompt 'import '`"
                      f" ({tokens_per_s:.0f} tokens/s above)")
    else:
        console.print(f"[bold green]done[/] ({tokens_per_s:.0f} tokens/s above); the bundle was temporary: pass "
                      "-o DIR to keep it")


def _finetune(out: Path, steps: int) -> Path:
    from ..teacher import bundled_model_dir
    from ..train.finetune import FinetuneConfig, finetune

    console.rule(f"[bold]0. finetune the softmax teacher into T2R ({steps} steps)")
    cfg = FinetuneConfig(model=bundled_model_dir("softmax"), out_dir=out, steps=steps,
                         attention_transfer_steps=min(steps, 50))
    with console.status("finetuning"):
        finetune(cfg)
    return out


def _generate(bundle: Path, prompt: str, max_new_tokens: int, threads: int, temperature: float, seed: int) -> float:
    import sys

    from ..runtime import OrtDecoder, SamplingParams, generate, load_bundle

    loaded = load_bundle(bundle)
    sys.stdout.write(prompt)

    def on_text(row: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    with OrtDecoder(loaded, threads=threads) as decoder:
        result = generate(decoder, loaded.load_tokenizer(), prompt, max_new_tokens=max_new_tokens,
                          sampling=SamplingParams(temperature=temperature, top_k=40, seed=seed),
                          stream_callback=on_text)
    sys.stdout.write("\n")
    t = result.timing
    console.print(f"[dim]{t.decode_tokens} tokens, {t.tokens_per_s:.1f} tokens/s, prefill "
                  f"{t.prefill_s * 1000:.1f} ms[/dim]")
    return t.tokens_per_s


def _speed(bundle: Path, t2r_dir: Path, threads: int) -> None:
    """The bench command's quick run on three paths: T2R step graph, softmax KV graph, transformers."""
    from ..bench.run import BenchConfig
    from ..teacher import bundled_model_dir
    from .bench_cmd import print_result, run_with_progress

    cfg = BenchConfig.quick(bundle=bundle, softmax_model=bundled_model_dir("softmax"), t2r_model=t2r_dir,
                            threads=threads, positions=(128, 2048), prefill_lengths=(1024,), rss_tokens=1000,
                            paths=("t2r-ort", "softmax-ort", "transformers"))
    print_result(run_with_progress(cfg))
