"""ONNX Runtime sessions for a bundle: execution providers, session options, and the weights shared
between the step and prefill sessions (one memory-mapped copy). Torch-free.

    sessions = open_sessions("bundle/", {"step": "step.onnx", "prefill": "prefill.onnx"}, threads=1)
"""

from __future__ import annotations

from pathlib import Path

from ..export.weight_file import map_weights, read_index
from .bundle import BundleError

PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    # ONNX Runtime's own TensorRT execution provider; `tensorrt` alone means our TrtDecoder (engines)
    "ort-tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
# where the state tensors live for each provider
DEVICES = {"cpu": "cpu", "cuda": "cuda", "ort-tensorrt": "cuda"}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class ProviderError(ValueError):
    """The requested execution provider is unknown or missing from this onnxruntime build."""


def resolve_providers(provider: str) -> list[str]:
    """ORT execution-provider names for ``cpu`` | ``cuda`` | ``ort-tensorrt``, fallbacks after the first."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    wanted = PROVIDERS[provider]
    if wanted[0] not in available:
        raise ProviderError(f"provider {provider!r} needs onnxruntime's {wanted[0]}, which this onnxruntime "
                            f"build lacks (it has {', '.join(available)}); install onnxruntime-gpu or "
                            "the Jetson onnxruntime wheel")
    return [name for name in wanted if name in available]


def session_options(threads: int = 0, optimization: str = "all"):
    import onnxruntime as ort

    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = onnxruntime's default), got {threads}")
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise ValueError(f"unknown graph optimization level {optimization!r}; expected one of "
                         f"{', '.join(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = levels[optimization]
    return options


def shared_weights(folder: str | Path) -> tuple[dict, dict[str, list[str]]]:
    """(name -> OrtValue over the memory-mapped weights file, graph file -> names it reads), or two
    empty dicts for a bundle whose weights sit inside its graphs. Both sessions get the same OrtValues:
    the weights are in memory once, as file-backed pages the kernel can share and drop."""
    import onnxruntime as ort

    try:
        index = read_index(folder)
        if index is None:
            return {}, {}
        views = map_weights(folder, index)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BundleError(f"{Path(folder) / 'weights.json'}: {err}") from None
    return {name: ort.OrtValue.ortvalue_from_numpy(view) for name, view in views.items()}, index.get("graphs", {})


def open_sessions(folder: str | Path, files: dict[str, str], threads: int = 0, optimization: str = "all",
                  providers=("CPUExecutionProvider",), prepack: bool = False, no_arena=(),
                  memory_pattern: bool = True) -> dict:
    """One ONNX Runtime session per ``kind -> graph file`` of a bundle folder, sharing one copy of the weights.

    The returned dict also keeps the weight OrtValues alive (key ``"weights"``) as long as the sessions.
    ``prepack``: keep ONNX Runtime's weight prepacking (the weight-only plans need it, see below).
    ``no_arena``: the kinds whose sessions allocate with plain malloc/free instead of ONNX Runtime's
    CPU arena (which keeps the largest blocks it has ever needed).
    ``memory_pattern``: ONNX Runtime's memory pattern, one planned block per input shape it has seen,
    each kept; off, every intermediate comes from the arena on its own and a run needs only what its
    own shape needs (for callers whose shapes keep changing, docs/design.md#serving-memory).
    """
    import onnxruntime as ort

    values, graphs = shared_weights(folder)
    sessions: dict = {"weights": values}
    for kind, file in files.items():
        options = session_options(threads, optimization)
        if kind in no_arena:
            options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = memory_pattern
        names = [name for name in graphs.get(file, []) if name in values]
        # add_initializer uses the OrtValue's buffer as it is (add_external_initializers would copy it)
        for name in names:
            options.add_initializer(name, values[name])
        if names and not prepack:
            # prepacking would keep a second, re-laid-out copy of every matmul weight per session
            options.add_session_config_entry("session.disable_prepacking", "1")
        path = Path(folder) / file
        try:
            sessions[kind] = ort.InferenceSession(str(path), options, providers=list(providers))
            # the session reads these buffers in place: it keeps them alive however the caller holds it
            sessions[kind].t2r_shared_weights = values
        except Exception as err:  # onnxruntime raises InvalidProtobuf, Fail, NoSuchFile, ...
            text = (str(err).strip() or type(err).__name__).splitlines()[0][:300]
            raise BundleError(f"{path.name} is not a loadable ONNX model: {text}") from None
    return sessions


