"""`t2r-export swap MODEL_DIR -o OUT_DIR`."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import FORCE_HELP, TRUST_HELP, atomic_output_dir, claimed_output, console, fail
from .progress import quiet_transformers


def swap(
    model_dir: Path = typer.Argument(..., help="Local Hugging Face causal LM directory (safetensors)."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the T2R model."),
    feature_map: str = typer.Option("t2r", help="t2r (learned, the paper's) | hedgehog (learned, softmax over "
                                    "±Wx: 2k features) | elu | rfa (baselines)."),
    feature_dim: int = typer.Option(32, help="Feature size k of phi (ignored by elu, which uses head_dim)."),
    init: str = typer.Option("default", help="Feature-map init: default (nn.Linear's for t2r, the identity for "
                             "hedgehog) | identity."),
    window: int = typer.Option(0, help="Sliding window W: exact softmax over the last W keys plus phi over the "
                               "older ones, one normalisation (LoLCATs); 0 = off."),
    decay: bool = typer.Option(False, "--decay", help="With --window: the older keys' terms decay by a learned "
                               "gamma per KV head, so the model behaves alike at any length."),
    seed: int = typer.Option(0, help="Seed for the feature-map init and rfa's random features."),
    trust_remote_code: bool = typer.Option(False, help=TRUST_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    from ..data.tokenizer import TOKENIZER_FILES, load_tokenizer
    from ..models import T2RConfig, load_causal_lm, swap_attention, swap_summary

    try:
        cfg = T2RConfig(feature_map=feature_map, feature_dim=feature_dim, init=init, seed=seed, window=window, decay=decay)
    except ValueError as err:
        fail(str(err))
    # a bad --window is found once the model is loaded: its error must stay the only line
    quiet_transformers()
    with claimed_output(out, force, inputs=[model_dir]):
        try:
            import torch

            model = load_causal_lm(model_dir, trust_remote_code=trust_remote_code)
            # the tokenizer is copied, not used: still, a damaged one is named now rather than at export
            if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
                load_tokenizer(model_dir, trust_remote_code)
            torch.manual_seed(seed)
            swap_attention(model, cfg)
        except ValueError as err:
            fail(str(err))
        with atomic_output_dir(out, force, inputs=[model_dir]) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            _copy_tokenizer(model_dir, tmp)
    summary = swap_summary(model)
    from rich.table import Table

    table = Table(title=f"swapped → {out}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    console.print(table)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                 "merges.txt", "generation_config.json"):
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
