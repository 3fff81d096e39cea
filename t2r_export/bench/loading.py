"""What a `bench run` loads, and when: the order that keeps the run's own peak memory low.

At 0.5-1B parameters every copy of the weights is 2-5 GB, so the run holds as few at once as it can:

1. the weight-only bundles (``t2r-int4`` ...) are exported first, each by a child process
   (``bench.child``), before this process loads any model: the exporter's peak is the child's;
2. the T2R model's dimensions are checked against the bundle from its config; its weights are
   loaded only for the ``t2r-torch`` path;
3. the softmax model's weights (``DecoderWeights``, read lazily from the torch model) feed the
   floor and softmax-ort graphs; the torch model is swapped in place instead of copied unless
   the ``transformers`` path runs it, and dropped once those graphs are open;
4. the paths that read their graphs from disk (the bundles, genai) open after that.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
from pathlib import Path
from typing import Callable

from .goals import QUANTIZED_PATHS
from .peers import DecodePath, PathUnavailable

logger = logging.getLogger(__name__)

# paths whose graphs are built from the softmax weights in this process
WEIGHT_PATHS = ("floor", "softmax-ort")


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        # the symbols already loaded, libc's among them: ctypes.util.find_library would start a
        # subprocess, and a child started now would inherit this process's peak RSS as its own
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        # not glibc (musl has no malloc_trim): freed pages stay with the allocator
        pass


def peak_rss() -> dict:
    """Peak RSS in bytes of this process (``getrusage``'s ru_maxrss) and of each job it ran in a child
    process so far (``bench.child.CHILD_PEAKS``: the exporters, the checkpoint builds)."""
    from .child import CHILD_PEAKS, own_peak_rss

    return {"peak_rss_bytes": own_peak_rss(), "child_peak_rss_bytes": dict(CHILD_PEAKS)}


def quantized_bundle(name: str, cfg, cache_root: Path, progress: Callable[[str], None]) -> Path:
    """The cached weight-only bundle of path ``name``, exported by a child process if missing.
    PathUnavailable (one line) when the plan fails its check against fp32 or the child dies."""
    from ..tolerances import ToleranceError
    from . import run
    from .child import ChildProcessFailed

    precision = QUANTIZED_PATHS[name]
    # a public shape's random weights are timed only (see default_bundle); a real model is checked
    scored = cfg.shape is None
    progress(f"{name}: exporting the T2R model as {precision} in a child process (cached"
             + ("" if scored else "; random weights: not checked against fp32") + ")")
    try:
        return run.default_bundle(cfg.t2r_model, cache_root, precision, check_quality=scored)
    except ToleranceError as err:
        raise PathUnavailable(f"the {precision} bundle failed its check against fp32: {err}") from None
    except ChildProcessFailed as err:
        raise PathUnavailable(str(err)) from None


def load_models(cfg, bundle_config, torch_paths: set) -> tuple:
    """(softmax torch model or None, its DecoderWeights, T2R torch model or None).

    ``torch_paths``: the torch paths that will run; each torch model is loaded only for its path.
    ValueError (one line) when a model does not match the bundle.
    """
    from ..models import load_model_config, load_t2r_model
    from .run import check_models_match, load_softmax
    from .softmax_graph import extract_softmax_decoder

    t2r_config = load_model_config(cfg.t2r_model)
    if getattr(t2r_config, "t2r", None) is None:
        raise ValueError(f"{cfg.t2r_model} holds a softmax model, not a T2R model; run `t2r-export swap` first")
    softmax = load_softmax(cfg.softmax_model)
    keep = "transformers" in torch_paths
    # without the transformers path nothing needs the unswapped model: no second copy of the weights
    dec = extract_softmax_decoder(softmax, in_place=not keep)
    check_models_match(bundle_config, dec, t2r_config)
    t2r = load_t2r_model(cfg.t2r_model).eval() if "t2r-torch" in torch_paths else None
    return (softmax if keep else None), dec, t2r


def attempt(name: str, make: Callable[[], object], failed: dict, progress: Callable[[str], None]):
    """``make()``, or None with ``failed[name]`` set to why (one line) when it raises: a path that
    cannot be built (its exporter or builder raising) is reported, never faked. t2r-ort's failure is
    the run's own and is raised."""
    try:
        return make()
    except PathUnavailable as err:
        failed[name] = str(err)
    except Exception as err:
        if name == "t2r-ort":
            raise
        from .run import failure_line

        logger.exception("%s could not be opened", name)
        failed[name] = failure_line(err)
    progress(f"{name}: unavailable: {failed[name]}")
    return None


def open_paths(cfg, open_path: Callable[[str], DecodePath], drop_weights: Callable[[], None],
               failed: dict, progress: Callable[[str], None]) -> dict:
    """{name: open path} in ``cfg.paths`` order; a path that cannot open goes to ``failed`` with its
    reason (see :func:`attempt`). The graphs built from the softmax weights open first, then
    ``drop_weights()`` lets those weights go, then the rest open."""
    opened = {}

    def open_one(name: str) -> None:
        path = attempt(name, lambda: open_path(name), failed, progress)
        if path is not None:
            opened[name] = path

    names = [name for name in cfg.paths if name not in failed]
    for name in names:
        if name in WEIGHT_PATHS:
            open_one(name)
    drop_weights()
    for name in names:
        if name not in WEIGHT_PATHS:
            open_one(name)
    return {name: opened[name] for name in cfg.paths if name in opened}


def peak_rss_line(result: dict) -> str | None:
    """One line for the console and summary.md: the run's peak RSS (None for results without it)."""
    process = result.get("memory", {}).get("process")
    if not process:
        return None
    gib = 2**30
    children = process["child_peak_rss_bytes"]
    ran = ("child processes ran " + ", ".join(f"the {what} (peak {peak / gib:,.2f} GiB)"
                                               for what, peak in children.items()) if children else
           "no exporter ran (every bundle was cached)")
    return (f"Peak RSS of the bench process: {process['peak_rss_bytes'] / gib:,.2f} GiB (ru_maxrss; "
            f"{process['rss_at_start_bytes'] / gib:,.2f} GiB at the start of the run); {ran}.")
