"""`t2r-export generate BUNDLE --prompt TEXT`: decode with the torch-free runtime (ONNX Runtime).

Imports nothing heavy at module level and never torch: this command works on a runtime-only
install (a Jetson with `pip install t2r-export`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from .common import err_console, fail


def generate(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `t2r-export onnx`."),
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="Prompt text; repeat for a batch. With "
                                     "--state-in: text that continues the saved stream (may be omitted)."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate per prompt at most."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 = greedy."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens; 0 = off."),
    top_p: float = typer.Option(1.0, help="Keep the smallest set with this probability mass; 1 = off."),
    seed: int = typer.Option(0, help="Sampling seed (prompt i uses seed + i)."),
    provider: str = typer.Option("cpu", help="cpu | cuda | ort-tensorrt (ONNX Runtime execution providers) | "
                                             "tensorrt (the bundle's TensorRT engines, `t2r-export trt`)."),
    threads: int = typer.Option(0, help="ONNX Runtime intra-op threads; 0 = its default."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop a row when its text contains this; repeatable."),
    state_in: Path = typer.Option(None, "--state-in", help="Continue the stream saved in this state file "
                                                           "(`--state-out`); one stream only."),
    state_out: Path = typer.Option(None, "--state-out", help="Save the stream's final state (safetensors) to "
                                                             "continue it later with --state-in; one stream only."),
) -> None:
    from ..runtime import NonFiniteLogitsError, OrtDecoder, SamplingParams, load_bundle
    from ..runtime import generate as run_generation
    from ..runtime.generate import GenerationError, check_text

    prompt = list(prompt or [])
    if not prompt and state_in is None:
        fail("give a prompt with --prompt (or a saved stream with --state-in)")
    if (state_in or state_out) and len(prompt) > 1:
        fail(f"--state-in/--state-out carry one stream, got {len(prompt)} prompts; give one --prompt")
    if (state_in or state_out) and provider == "tensorrt":
        fail("--state-in/--state-out run on ONNX Runtime (--provider cpu, cuda or ort-tensorrt), not on the TensorRT "
             "engines")
    if state_out is not None and (state_out.is_dir() or not state_out.resolve().parent.is_dir()):
        fail(f"--state-out {state_out} must be a file in an existing folder")
    for index, text in enumerate(prompt):
        which = "the prompt" if len(prompt) == 1 else f"prompt {index}"
        if not text:
            fail(f"{which} is empty; give at least one character of text")
        try:
            check_text(text, which)
            for string in stop or []:
                check_text(string, f"--stop {string.encode('utf-8', 'backslashreplace').decode()!r}")
        except GenerationError as err:
            fail(str(err))
    try:
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        loaded = load_bundle(bundle)
        tokenizer = loaded.load_tokenizer()
        add_bos = loaded.tokenizer_config().get("add_bos_token") is True
        decoder = _tensorrt_decoder(loaded) if provider == "tensorrt" else OrtDecoder(loaded, provider=provider,
                                                                                      threads=threads)
    except ValueError as err:
        fail(str(err))
    if state_in is not None or state_out is not None:
        with decoder:
            _generate_stream(loaded, decoder, tokenizer, prompt[0] if prompt else "", add_bos, state_in, state_out,
                             max_new_tokens, sampling, stop or [], provider)
        return
    # one prompt streams live; rows of a batch decode interleaved, so they print whole, in order
    live = len(prompt) == 1

    echoed = []

    def on_text(row: int, delta: str) -> None:
        # the prompt is echoed with the first text, so a rejected prompt prints nothing
        if not echoed:
            echoed.append(sys.stdout.write(prompt[0]))
        sys.stdout.write(delta)
        sys.stdout.flush()

    with decoder:
        try:
            result = run_generation(decoder, tokenizer, prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                                    stop_strings=stop or [], stream_callback=on_text if live else None,
                                    add_bos=add_bos)
        except NonFiniteLogitsError as err:
            sys.stdout.write("\n")
            fail(str(err), code=1)
        except ValueError as err:
            fail(str(err))
    if live:
        sys.stdout.write(("" if echoed else prompt[0]) + "\n")
    else:
        for index, row in enumerate(result.rows):
            err_console.rule(f"prompt {index + 1}: {prompt[index][:40]!r}", style="dim")
            sys.stdout.write(prompt[index] + row.text + "\n")
    sys.stdout.flush()
    timing = result.timing
    reasons = ", ".join(sorted({row.finish_reason for row in result.rows}))
    err_console.print(f"[dim]{timing.decode_tokens} tokens in {timing.decode_s:.3f} s "
                      f"([bold]{timing.tokens_per_s:.1f} tokens/s[/bold], batch {len(prompt)}, {provider}), "
                      f"prefill {timing.prefill_s * 1000:.1f} ms, finished: {reasons}[/dim]", highlight=False,
                      soft_wrap=True)


def _tensorrt_decoder(bundle):
    """The TensorRT runner over the bundle's engines; one line when TensorRT, a GPU or the engines are missing."""
    from ..trt import TensorRTUnavailable

    try:
        from ..trt.runner import TrtDecoder

        return TrtDecoder(bundle)
    except TensorRTUnavailable as err:
        fail(str(err))


def _generate_stream(bundle, decoder, tokenizer, prompt: str, add_bos: bool, state_in, state_out, max_new_tokens,
                     sampling, stop, provider) -> None:
    """One stream from / into a state file: the continuation is printed, the state saved atomically."""
    from ..runtime import NonFiniteLogitsError
    from ..runtime.resume import generate_resumed
    from ..runtime.state import StateError, bundle_identity, load_state, save_state

    identity = bundle_identity(bundle)
    try:
        state = load_state(state_in, bundle.config, identity) if state_in is not None else None
        ids = tokenizer.encode(prompt, add_special_tokens=state is None).ids if prompt else []
        bos = bundle.config.bos_token_id
        if state is None and add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]

        def on_text(row: int, delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()

        sys.stdout.write(prompt)
        output, timing, final = generate_resumed(decoder, tokenizer, ids, identity, state, max_new_tokens, sampling,
                                                 stop, on_text)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if state_out is not None:
            save_state(state_out, final)
    except NonFiniteLogitsError as err:
        sys.stdout.write("\n")
        fail(str(err), code=1)
    except (StateError, ValueError) as err:
        fail(str(err))
    saved = f", state at position {final.position} saved to {state_out}" if state_out is not None else ""
    err_console.print(f"[dim]{timing.decode_tokens} tokens in {timing.decode_s:.3f} s "
                      f"([bold]{timing.tokens_per_s:.1f} tokens/s[/bold], {provider}), finished: "
                      f"{output.finish_reason}{saved}[/dim]", highlight=False, soft_wrap=True)
