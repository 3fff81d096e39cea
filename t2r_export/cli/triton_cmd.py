"""`t2r-export triton BUNDLE -o REPO`: a Triton Inference Server model repository (t2r_export/deploy/triton.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import FORCE_HELP, atomic_output_dir, check_output_early, console, fail


def triton(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `t2r-export onnx`."),
    out: Path = typer.Option(..., "--out", "-o", help="Model repository folder to write (required)."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime | tensorrt (Triton backend of both models)."),
    max_batch: int = typer.Option(64, help="Sequences Triton batches together at most (max_batch_size)."),
    device: str = typer.Option("gpu", help="gpu | cpu (instance_group kind; cpu only with onnxruntime)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    from ..deploy.triton import BACKENDS, TritonError, check_state_names, write_repository
    from ..runtime import BundleError, inspect_bundle
    from .. import contract

    if backend not in BACKENDS:
        fail(f"unknown --backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if max_batch < 1:
        fail(f"--max-batch must be >= 1, got {max_batch}")
    check_output_early(out, force, inputs=[bundle])
    try:
        loaded = inspect_bundle(bundle)
        config = loaded.config
        check_state_names([n for pair in contract.state_pairs(config.num_layers, config.state_shape.parts)
                           for n in pair])
    except (BundleError, TritonError) as err:
        fail(str(err))
    with atomic_output_dir(out, force, inputs=[bundle], what="model repository") as tmp:
        try:
            notes = write_repository(loaded, tmp, backend, max_batch, device)
        except TritonError as err:
            fail(str(err))
    console.print(f"wrote Triton model repository {out} ({backend}, max batch {max_batch}): t2r_step (sequence "
                  "batcher, implicit state), t2r_prefill (stateless), client_example.py", highlight=False,
                  soft_wrap=True)
    for note in notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    console.print("the Triton server itself was not run here; see README.md in the repository", highlight=False)
