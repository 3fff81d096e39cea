"""`t2r-export bench`, the library part: decode speed, prefill speed and memory of the T2R bundle
against the softmax model it came from, measured side by side in one process. Returns a dict
(what ``bench.json`` holds); printing and plotting live elsewhere.

Decode paths (batch 1, the same thread count for ONNX Runtime and torch):
    t2r-ort       (a) the bundle's step graph, ONNX Runtime, IO binding (the project's OrtDecoder)
    softmax-ort   (b) the softmax teacher as an ONNX KV-cache decoder from the same emitter, IO binding
    genai         (b2) onnxruntime-genai, its own builder, in-place preallocated KV cache
    transformers  (c) the softmax teacher, transformers' DynamicCache, torch
    t2r-torch     (d) the T2R model's recurrent step in torch
    floor         (e) only the model's dense matmuls for one token, ONNX Runtime, IO binding

At each position P every path first consumes P tokens of one random token stream cheaply (the
prefill graph / chunked prefill / append), then runs warm-up steps (not timed), then ``repeats``
times ``steps`` single-token steps starting at P; tokens/s is the median over repeats. The paths
take turns repeat by repeat, so load from other processes falls on all of them alike. KV paths
rewind to P before each repeat. The T2R paths carry no sequence axis, so a step costs the same at
every position; t2r-ort (whose runtime has no state-restore call) runs its repeats back to back.

What the run loads, and in which order (exporters in child processes, each torch model only for its
path): ``bench/loading.py``; ``bench.json`` records the run's peak RSS under ``memory.process``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import contract
from ..machine import cpu_model
from .child import run_in_child
from .goals import QUANTIZED_PATHS, summarize
from .peers import DecodePath, PathUnavailable, T2ROrtPath

logger = logging.getLogger(__name__)

PATHS = {
    "t2r-ort": "T2R step graph, ONNX Runtime + IO binding",
    "softmax-ort": "softmax KV-cache graph (same emitter), ONNX Runtime + IO binding",
    "genai": "onnxruntime-genai (its builder, fp32 cpu, in-place KV cache)",
    "transformers": "softmax teacher, transformers DynamicCache (torch)",
    "t2r-torch": "T2R recurrent step (torch, decode_step)",
    "floor": "dense matmuls only (floor), ONNX Runtime + IO binding",
    "t2r-int4": "T2R step graph, int4 weight blocks (MatMulNBits), ONNX Runtime + IO binding",
    "t2r-int8-wo": "T2R step graph, int8 weight blocks (MatMulNBits), ONNX Runtime + IO binding",
    "t2r-int4-qdq": "T2R step graph, INT4 DequantizeLinear blocks (TensorRT's plan), ONNX Runtime + IO binding",
}
# what `bench` runs unless --paths names more: the weight-only paths export bundles of their own
DEFAULT_PATHS = tuple(name for name in PATHS if name not in QUANTIZED_PATHS)
TORCH_PATHS = ("transformers", "t2r-torch")
DEFAULT_POSITIONS = (128, 1024, 4096, 16384)
QUICK_POSITIONS = (128, 1024)



def check_counts(cfg, names) -> None:
    """ValueError (one line) for the first setting of ``cfg`` in ``names`` below 1, or ``warmup`` below 0."""
    for name in names:
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {cfg.warmup}")

@dataclass
class BenchConfig:
    bundle: Path
    softmax_model: Path
    t2r_model: Path
    positions: tuple = DEFAULT_POSITIONS
    # timed single-token steps per repeat; median over repeats; warm-up steps are not timed
    steps: int = 64
    repeats: int = 5
    warmup: int = 8
    # same intra-op thread count for ONNX Runtime, onnxruntime-genai and torch
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    device: str = "cpu"
    prefill_lengths: tuple = (1024, 8192)
    # greedy T2R decode watched for RSS growth: ~20-60 s here; the 100k-token check sets 100000
    rss_tokens: int = 10_000
    paths: tuple = DEFAULT_PATHS
    cache_dir: Path | None = None
    seed: int = 0
    # ORT's profiler on the step graph and the floor: time and node count by op type
    profile: bool = False
    # the public shape (bench/sizes.py) whose random-init models are timed, when not the user's own
    shape: str | None = None

    @classmethod
    def quick(cls, **kw) -> "BenchConfig":
        defaults = dict(positions=QUICK_POSITIONS, steps=8, repeats=3, warmup=2, prefill_lengths=(256, 1024),
                        rss_tokens=2_000)
        return cls(**{**defaults, **kw})

    def validate(self, max_position: int | None) -> None:
        """ValueError with one line for every setting that cannot run."""
        if not self.positions or any(int(p) < 1 for p in self.positions):
            raise ValueError(f"positions must be integers >= 1, got {list(self.positions)}")
        check_counts(self, ("steps", "repeats", "threads", "rss_tokens"))
        if not self.prefill_lengths or any(int(t) < 1 for t in self.prefill_lengths):
            raise ValueError(f"prefill lengths must be integers >= 1, got {list(self.prefill_lengths)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; expected cpu or cuda")
        unknown = set(self.paths) - set(PATHS)
        if unknown or "t2r-ort" not in self.paths:
            raise ValueError(f"paths must include t2r-ort and be among {', '.join(PATHS)}; got {', '.join(self.paths)}")
        if max_position is not None:
            if self.stream_length() > max_position:
                furthest = max(max(self.positions), max(self.prefill_lengths))
                raise ValueError(f"position {furthest} (+ {self.tokens_after_position()} timed/warm-up steps) is "
                                 f"beyond the model's maximum of {max_position} positions")

    def stream_length(self) -> int:
        """Tokens of context the run reaches: the furthest position plus its steps, or the longest prompt."""
        return max(max(self.positions) + self.tokens_after_position(), max(self.prefill_lengths))

    def tokens_after_position(self) -> int:
        """Tokens a path may decode past P at one position (t2r-ort runs its repeats back to back)."""
        return self.warmup + self.steps * self.repeats


# -- measuring -----------------------------------------------------------------------------------

def failure_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def _reach(path, stream: np.ndarray, p: int, warmup: int) -> None:
    """Bring ``path`` to position p (prefill from where it is), mark it, run untimed warm-up steps, rewind."""
    if path.position > p:
        path.reset()
    path.prefill(stream[path.position:p])
    path.sync()
    path.mark()
    for token in stream[p:p + warmup]:
        path.step(int(token))
    path.sync()
    path.rewind()


def _time_steps(path, stream: np.ndarray, steps: int) -> tuple[float, float]:
    """(wall s, process CPU s) of ``steps`` single-token steps from the path's position; then rewind."""
    first = path.position
    c0, t0 = time.process_time(), time.perf_counter()
    for token in stream[first:first + steps]:
        path.step(int(token))
    path.sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    path.rewind()
    return wall, cpu


def time_decode(paths: dict, stream: np.ndarray, cfg: BenchConfig, progress: Callable[[str], None],
                failed: dict) -> dict:
    """tokens/s of single-token steps at each position (median of repeats), every path.

    Paths take turns repeat by repeat (in a rotating order), so a busy spell on a shared machine
    lands on all of them instead of on whichever ran then. A path that raises is moved to
    ``failed`` with its reason and measured no further.
    """
    # process CPU seconds beside wall seconds: on a shared machine a big gap means the run was starved
    out = {name: {"tokens_per_s": {}, "repeat_s": {}, "repeat_cpu_s": {}} for name in paths}

    def guarded(name, fn, *args):
        try:
            return fn(paths[name], *args)
        except Exception as err:  # a peer failing mid-run is reported, never faked
            if name == "t2r-ort":
                raise
            logger.exception("%s failed", name)
            failed[name] = failure_line(err)
            paths.pop(name).close()
            return None

    for p in sorted(cfg.positions):
        for name in list(paths):
            progress(f"{name}: context → {p:,}")
            guarded(name, _reach, stream, p, cfg.warmup)
        times = {name: [] for name in paths}
        for r in range(cfg.repeats):
            progress(f"position {p:,}: repeat {r + 1}/{cfg.repeats}, {cfg.steps} steps per path")
            names = list(paths)
            for name in names[r % len(names):] + names[:r % len(names)]:
                if name in paths:
                    measured = guarded(name, _time_steps, stream, cfg.steps)
                    if measured is not None:
                        times[name].append(measured)
        for name in paths:
            wall, cpu = zip(*times[name], strict=True)
            out[name]["tokens_per_s"][str(p)] = cfg.steps / statistics.median(wall)
            out[name]["repeat_s"][str(p)] = list(wall)
            out[name]["repeat_cpu_s"][str(p)] = list(cpu)
    return {name: out[name] for name in paths}


def _time_prefill(path, prompt: np.ndarray) -> float:
    path.reset()
    t0 = time.perf_counter()
    path.prefill(prompt)
    path.sync()
    return time.perf_counter() - t0


def measure_prefill(paths: dict, stream: np.ndarray, cfg: BenchConfig, progress) -> dict:
    """Prompt tokens/s (median of up to 3, paths taking turns): the T2R prefill graph, each softmax
    peer's prefill, the floor's prefill form (the prompt's dense matmuls alone in one run, with the
    kernels the runtime's prefill uses: what the prefill graph cannot beat) and T2R step feeding
    (one step per prompt token, timed once)."""
    result = {}
    repeats = min(cfg.repeats, 3)
    for t in cfg.prefill_lengths:
        prompt = stream[:t]
        seconds = {name: [] for name in paths}
        row = {}
        for r in range(repeats):
            names = list(paths)
            for name in names[r % len(names):] + names[:r % len(names)]:
                if name in row:
                    continue
                progress(f"prefill {t:,} tokens: {name} ({r + 1}/{repeats})")
                try:
                    seconds[name].append(_time_prefill(paths[name], prompt))
                except Exception as err:  # e.g. a peer's context limit: reported, not faked
                    if name == "t2r-ort":
                        raise
                    row[name] = f"unavailable: {failure_line(err)}"
        row.update({name: t / statistics.median(s) for name, s in seconds.items() if s and name not in row})
        progress(f"prefill {t:,} tokens: t2r-ort, one step per token")
        path = paths["t2r-ort"]
        path.reset()
        t0 = time.perf_counter()
        for token in prompt:
            path.step(int(token))
        row["t2r-ort step feeding"] = t / (time.perf_counter() - t0)
        row["t2r-ort prefill graph"] = row.pop("t2r-ort")
        result[str(t)] = row
    return result


def profile_graph(model, feeds: dict, threads: int, runs: int = 200, prepack: bool = True) -> dict:
    """ONNX Runtime's own profile of ``runs`` runs: kernel µs per run and node count by op type.

    ``prepack``: ONNX Runtime's weight prepacking (the runtime turns it off for fp32 bundles).

    Profiling adds a few µs per node, so the per-op times are for ranking, not for the tables.
    """
    import json
    import tempfile

    import onnx
    import onnxruntime as ort

    from ..runtime.ort_backend import session_options
    from .softmax_graph import open_session

    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        if isinstance(model, (str, Path)):
            session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        else:
            session = open_session(model, options)
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
        # only the node list is needed; the weights stay in the bundle's weights.bin
        optimized = [node.op_type for node in
                     onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node]
    by_op: dict[str, list] = {}
    model_run = []
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            entry = by_op.setdefault(event["args"]["op_name"], [0.0, 0])
            entry[0] += event["dur"]
            entry[1] += 1
        elif event.get("cat") == "Session" and event["name"] == "model_run":
            model_run.append(event["dur"])
    ops = {op: {"us_per_run": us / runs, "nodes": count // runs}
           for op, (us, count) in sorted(by_op.items(), key=lambda kv: -kv[1][0])}
    return {"runs": runs, "model_run_us": statistics.median(model_run), "optimized_nodes": len(optimized),
            "kernel_us_per_run": sum(v["us_per_run"] for v in ops.values()), "by_op": ops}


def profile_step_and_floor(bundle, dec, threads: int) -> dict:
    """Where the T2R step graph's time goes, beside the floor's (ORT profiling)."""
    from .softmax_graph import build_floor_graph

    shape = bundle.config.state_shape
    rng = np.random.default_rng(0)
    feeds = {"input_ids": np.array([[1]], np.int64), "position_ids": np.array([[1000]], np.int64)}
    for spec in contract.graph_inputs(shape, contract.STEP)[2:]:
        feeds[spec.name] = rng.random((1, *spec.shape[1:]), dtype=np.float32)
    # prepacking as the runtime opens the bundle (ort_backend.OrtDecoder)
    prepack = bundle.config.precision in contract.WEIGHT_ONLY_PRECISIONS
    return {"t2r_step": profile_graph(bundle.graph_path(contract.STEP), feeds, threads, prepack=prepack),
            "floor": profile_graph(build_floor_graph(dec), {"input_ids": feeds["input_ids"]}, threads, prepack=False)}


def measure_rss(path: T2ROrtPath, tokens: int, progress, samples: int = 100) -> dict:
    """Process RSS over a greedy T2R decode of ``tokens`` tokens (state constant by construction)."""
    import psutil

    proc = psutil.Process()
    path.reset()
    logits = path.prefill(np.array([0]))
    every = max(1, tokens // samples)
    marks, rss = [], []
    state_bytes = path.state_nbytes()
    t0 = time.perf_counter()
    for i in range(1, tokens + 1):
        logits = path.step(int(np.argmax(logits)))
        if i % every == 0 or i == tokens:
            marks.append(i)
            rss.append(proc.memory_info().rss)
            if i % (every * 10) == 0:
                progress(f"rss: {i:,}/{tokens:,} tokens")
    elapsed = time.perf_counter() - t0
    # growth after the first tenth: allocator and arena warm-up are not growth with length
    settle = max(1, len(rss) // 10)
    return {"tokens": marks, "rss_bytes": rss, "decode_tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed, "state_bytes": state_bytes, "state_bytes_after": path.state_nbytes(),
            "growth_bytes": int(rss[-1] - rss[settle - 1]), "growth_from_start_bytes": int(rss[-1] - rss[0])}


# -- the run -------------------------------------------------------------------------------------

def machine_info(threads: int) -> dict:
    import onnxruntime
    import torch
    import transformers

    info = {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": threads, "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "loadavg_start": list(os.getloadavg())}
    try:
        from .peers import genai_version

        info["onnxruntime_genai"] = genai_version()
    except PathUnavailable:
        info["onnxruntime_genai"] = None
    return info


def _cpu_share(paths: dict, threads: int) -> float | None:
    """Process CPU seconds / (wall seconds × threads) over every timed repeat: near 1 on an idle
    machine (with ORT's spinning threads), well below 1 when other processes took the cores."""
    wall = sum(sum(v) for e in paths.values() for v in e.get("repeat_s", {}).values())
    cpu = sum(sum(v) for e in paths.values() for v in e.get("repeat_cpu_s", {}).values())
    return cpu / (wall * threads) if wall else None


def _unavailable(reason: str) -> dict:
    return {"status": f"unavailable: {reason}", "tokens_per_s": {}}


def load_softmax(path: Path):
    from ..models import load_causal_lm

    softmax = load_causal_lm(path).eval()
    if getattr(softmax.config, "t2r", None) is not None:
        raise ValueError(f"{path} is a T2R model; --softmax needs the softmax original")
    return softmax


def check_models_match(bundle_config, softmax_dec, t2r_config=None) -> None:
    """ValueError (one line) when the softmax weights, or the T2R model's config, do not have the
    bundle's dimensions. ``t2r_config``: the T2R model's HF config (its weights are not needed)."""
    from ..models import attention_dims

    want = (bundle_config.num_layers, bundle_config.num_heads, bundle_config.num_kv_heads,
            bundle_config.head_dim, bundle_config.vocab_size)
    have = (len(softmax_dec.layers), softmax_dec.num_heads, softmax_dec.num_kv_heads, softmax_dec.head_dim,
            softmax_dec.vocab_size)
    if want != have:
        raise ValueError(f"the softmax model (layers, heads, kv heads, head dim, vocab) {have} does not match "
                         f"the bundle's {want}; pass --softmax with the model the bundle came from")
    if t2r_config is None:
        return
    heads, kv, head_dim = attention_dims(t2r_config)
    t2r_have = (t2r_config.num_hidden_layers, heads, kv, head_dim, t2r_config.vocab_size)
    if t2r_have != want:
        raise ValueError(f"the T2R model {t2r_have} does not match the bundle's {want}; pass --t2r-model with "
                         "the model the bundle was exported from")


def exporter_fingerprint(package: Path | None = None) -> str:
    """sha256 of the whole exporter's source: every file of ``t2r_export/export/`` and the bundle
    contract, so a cached bundle from an older exporter is never timed as if it were today's graph.
    ``package``: the package directory (default: this one)."""
    package = Path(package) if package is not None else Path(contract.__file__).parent
    files = sorted((package / "export").rglob("*.py")) + [package / "contract.py"]
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(package).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def default_bundle(t2r_model: Path, cache_root: Path | None = None, precision: str = "fp32",
                   check_quality: bool = True) -> Path:
    """A verified bundle of ``t2r_model`` in ``precision``, exported once into the cache (keyed by its
    weights, the precision and the exporter's source). ``check_quality=False`` skips a quantized
    plan's check against fp32 (top-1 agreement, perplexity): random-init weights, whose near-flat
    logits any rounding reorders, are timed, not scored."""
    from ..data.corpus import cache_dir_default
    from ..export.bundle import checkpoint_sha256

    sha = checkpoint_sha256(Path(t2r_model), None)
    key = f"{sha[:16]}-{exporter_fingerprint()[:12]}" + ("" if precision == "fp32" else f"-{precision}")
    out = Path(cache_root or cache_dir_default()) / "bench-bundle" / key
    if not (out / contract.RUNTIME_JSON).is_file():
        # in a child process: the exporter's peak (model, graphs, verification sessions) is not this one's
        run_in_child(_export_job, Path(t2r_model), out, precision, check_quality or precision == "fp32",
                     what=f"{precision} export")
    return out


def _export_job(t2r_model: Path, out: Path, precision: str, verify: bool) -> None:
    """``default_bundle``'s export, run in the child process (module level: the child imports it by name)."""
    from ..export.plans import export_plan

    # the exporter's step-by-step log would bury the bench's own progress lines
    logging.getLogger("t2r_export.export").setLevel(logging.WARNING)
    export_plan(t2r_model, out, precision=precision, verify=verify)


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """"128,1024" -> (128, 1024); ValueError naming ``what`` for anything else."""
    items = [item.strip().replace("_", "") for item in str(text).split(",") if item.strip()]
    if not items or not all(item.isdigit() for item in items):
        raise ValueError(f"{what} must be comma-separated positive integers (e.g. 128,1024), got {text!r}")
    values = tuple(sorted({int(item) for item in items}))
    if values[0] < 1:
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return values


def _cuda_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False)"
    return None


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Measure everything; returns the dict written to bench.json."""
    import psutil
    import torch

    from ..data.corpus import cache_dir_default
    from ..runtime import load_bundle
    from .loading import attempt, load_models, open_paths, peak_rss, quantized_bundle, release_memory
    from .peers import FloorPath, FloorPrefillPath, GenaiPath, SoftmaxOrtPath, T2RTorchPath, TransformersPath, build_genai_model
    from .softmax_graph import dense_weight_bytes, kv_cache_nbytes

    progress = progress or (lambda message: logger.info(message))
    rss_at_start = psutil.Process().memory_info().rss
    bundle = load_bundle(cfg.bundle)
    cfg.validate(bundle.config.max_position)
    torch.set_num_threads(cfg.threads)
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else cache_dir_default()
    device_reason = _cuda_reason() if cfg.device == "cuda" else None
    failed, quantized = {}, {}
    # weight-only bundles first: each exporter runs in a child before this process loads a model
    for name in cfg.paths:
        if name in QUANTIZED_PATHS:
            path = attempt(name, lambda name=name: quantized_bundle(name, cfg, cache_root, progress), failed,
                           progress)
            if path is not None:
                quantized[name] = path
    torch_paths = set() if device_reason else set(cfg.paths) & set(TORCH_PATHS)
    softmax_model, dec, t2r_model = load_models(cfg, bundle.config, torch_paths)
    stream = np.random.default_rng(cfg.seed).integers(0, bundle.config.vocab_size, cfg.stream_length() + 1)
    result = {"machine": machine_info(cfg.threads),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
              "paths": {}}
    # the genai generator preallocates its cache to max_length: the run's longest context
    max_length = int(max(max(cfg.positions) + max(cfg.warmup, cfg.steps) + 8, max(cfg.prefill_lengths) + 8))
    memory = {"kv_cache_bytes": {str(p): kv_cache_nbytes(dec, p) for p in sorted(cfg.positions)},
              "genai_preallocated_kv_bytes": kv_cache_nbytes(dec, max_length),
              "dense_weight_bytes": dense_weight_bytes(dec)}

    def open_path(name: str) -> DecodePath:
        if name == "t2r-ort":
            return T2ROrtPath(bundle, cfg.threads)
        if name in QUANTIZED_PATHS:
            return T2ROrtPath(load_bundle(quantized[name]), cfg.threads)
        if name == "floor":
            return FloorPath(dec, cfg.threads)
        if name == "softmax-ort":
            return SoftmaxOrtPath(dec, cfg.threads)
        if name == "genai":
            progress("genai: building the softmax model with onnxruntime-genai's model builder (cached)")
            context = 1 << (max_length - 1).bit_length()
            model_path = build_genai_model(cfg.softmax_model, context, cache_root)
            return GenaiPath(model_path, max_length, cfg.threads)
        if device_reason:
            raise PathUnavailable(device_reason)
        if name == "transformers":
            return TransformersPath(softmax_model, cfg.device)
        return T2RTorchPath(t2r_model, cfg.device)

    def drop_weights() -> None:
        # the floor and softmax-ort graphs hold their own copies now; the profile rebuilds the floor
        nonlocal dec
        if not cfg.profile:
            dec = None
            release_memory()

    opened = open_paths(cfg, open_path, drop_weights, failed, progress)
    # the open paths hold what they run (the transformers and t2r-torch paths their models)
    softmax_model = t2r_model = None
    measured = time_decode(opened, stream, cfg, progress, failed)
    for name in cfg.paths:
        entry = {"label": PATHS[name], "status": "ok"}
        if name in failed:
            entry.update(_unavailable(failed[name]))
        else:
            entry.update(measured[name])
            entry["rewinds"] = name not in ("t2r-ort", "floor", *QUANTIZED_PATHS)
            if getattr(opened[name], "graph_note", ""):
                entry["note"] = opened[name].graph_note
        if name in TORCH_PATHS:
            entry["device"] = cfg.device
        result["paths"][name] = entry
    prefill_paths = {name: path for name, path in opened.items()
                     if name in ("t2r-ort", "softmax-ort", "genai", "transformers")}
    if "floor" in opened:
        # the prefill's ceiling: the same dense matmuls over the whole prompt in one run
        prefill_paths["floor"] = FloorPrefillPath(opened["floor"].runner)
    for name, path in opened.items():
        if name not in prefill_paths:
            path.close()
    opened = None
    release_memory()

    result["prefill"] = measure_prefill(prefill_paths, stream, cfg, progress)
    result["memory"] = {"state_bytes": prefill_paths["t2r-ort"].state_nbytes(), **memory}
    if "genai" not in prefill_paths:
        result["memory"]["genai_preallocated_kv_bytes"] = None
    for name, path in prefill_paths.items():
        if name != "t2r-ort":
            path.close()
    release_memory()
    progress(f"rss: greedy T2R decode of {cfg.rss_tokens:,} tokens")
    result["memory"]["rss"] = measure_rss(prefill_paths["t2r-ort"], cfg.rss_tokens, progress)
    prefill_paths["t2r-ort"].close()
    if cfg.profile:
        progress("profiling the T2R step graph and the floor (ONNX Runtime profiler)")
        result["profile"] = profile_step_and_floor(bundle, dec, cfg.threads)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["machine"]["cpu_share"] = _cpu_share(result["paths"], cfg.threads)
    # the run's own high-water mark (the exporters' is their child's): what a machine must hold for it
    result["memory"]["process"] = {"rss_at_start_bytes": rss_at_start, **peak_rss()}
    result["summary"] = summarize(result)
    return result
