"""`t2r-export bench streams`: many concurrent streams at one context, and how many fit a memory budget.

For each batch size B every path decodes B streams together at context P (default 4096): one
call per step advances all B streams by one greedy token. Aggregate tokens/s = B × steps / the
median repeat's wall time (paths take turns repeat by repeat, as in ``bench run``).

    t2r-ort      the bundle's step graph through OrtDecoder with batch B (IO binding)
    softmax-ort  the softmax KV-cache graph from the same emitter, batch B
    genai        onnxruntime-genai's generator with batch_size B (in-place KV cache)

How the streams reach P: genai appends B × P prompt tokens (its real prefill; it accepts one
prompt per generator at B > 1). softmax-ort prefills one stream of P tokens once and copies that
cache into all B rows: a step's work depends on the cache's length, not on its values. The T2R
step's work depends on neither (the state has no sequence axis), so its B rows prefill the last
tokens before P (128, or 1,024 ÷ B when fewer: the prefill graph keeps per-token running sums), at
their true positions. No path rewinds: the context moves on by the
warm-up and timed steps (a few dozen tokens past P).

Memory per stream is what each path holds for one stream, from its buffers: T2R, its state once
per state set the runtime keeps (one set for graphs that update it in place, else two) and its
logits row; softmax-ort, the past and the
present cache (its concat graph holds both during a step); genai, the KV cache at P (it
preallocates the run's maximum length). With ``--memory-budget`` the largest batch each fits is
(budget - its weights) // per-stream bytes; a peer is not run at a batch over the budget.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .peers import PathUnavailable
from .run import check_counts

STREAM_PATHS = {
    "t2r-ort": "T2R step graph, OrtDecoder batch B",
    "softmax-ort": "softmax KV-cache graph (same emitter), batch B",
    "genai": "onnxruntime-genai, batch_size B",
}
T2R_WARM_TOKENS = 128
# the prefill graph keeps running sums per token: a large batch prefills fewer tokens per row
T2R_WARM_TOTAL = 1024
# aggregate tokens/s gaining less than this from one batch size to the next: the curve has flattened
FLAT_GAIN = 1.10
# goals at context 4k within the budget: T2R streams over genai's, T2R's best aggregate over genai's
STREAMS_GOAL = 100.0
AGGREGATE_GOAL = 2.0
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, what: str = "--memory-budget") -> int:
    """"8GiB", "512 MiB", "8GB", "1000000" -> bytes; ValueError naming ``what`` otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{what} must be a positive size such as 8GiB, 512MiB or 8GB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def gib(n: float) -> str:
    """A byte count in the largest binary unit it reaches (8.00 GiB, 97.50 KiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n):,} B"


@dataclass
class StreamsConfig:
    bundle: Path
    softmax_model: Path
    batches: tuple = (1, 8, 32, 64)
    context: int = 4096
    steps: int = 16
    repeats: int = 3
    warmup: int = 2
    threads: int = 1
    memory_budget: int | None = 8 * 2**30
    paths: tuple = tuple(STREAM_PATHS)
    cache_dir: Path | None = None
    seed: int = 0
    shape: str | None = None

    def validate(self, max_position: int | None) -> None:
        """ValueError with one line for every setting that cannot run."""
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"--batch must be positive integers, got {list(self.batches)}")
        check_counts(self, ("context", "steps", "repeats", "threads"))
        unknown = set(self.paths) - set(STREAM_PATHS)
        if unknown or "t2r-ort" not in self.paths:
            raise ValueError(f"paths must include t2r-ort and be among {', '.join(STREAM_PATHS)}; "
                             f"got {', '.join(self.paths)}")
        if max_position is not None and self.max_length() > max_position:
            raise ValueError(f"--context {self.context} (+ {self.max_length() - self.context} warm-up/timed steps) "
                             f"is beyond the model's maximum of {max_position} positions")

    def max_length(self) -> int:
        return self.context + self.warmup + self.steps * self.repeats + 1


def check_budget(cfg: StreamsConfig, weight_bytes: int, stream_bytes: int) -> None:
    """ValueError (one line) when the T2R runtime cannot hold a requested batch at the context in the budget."""
    if cfg.memory_budget is None:
        return
    for batch in sorted(cfg.batches, reverse=True):
        need = weight_bytes + batch * stream_bytes
        if need > cfg.memory_budget:
            raise ValueError(f"--batch {batch} at --context {cfg.context} needs {gib(need)} for the T2R runtime "
                             f"(weights {gib(weight_bytes)} + {batch} × {stream_bytes:,} bytes per stream), over "
                             f"--memory-budget {gib(cfg.memory_budget)}")


def _file_bytes(folder: Path, suffixes: tuple[str, ...]) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file() and f.suffix in suffixes)


def t2r_footprint(bundle) -> tuple[int, int]:
    """(weight bytes, bytes per stream) of the T2R runtime on ``bundle``: its graphs and weight file;
    per stream its state once per state set the runtime keeps (one where the graphs update it in
    place, two where IO binding ping-pongs between them) and one fp32 logits row."""
    from ..runtime.in_place import resident_row_nbytes

    per_stream = resident_row_nbytes(bundle.config, bundle.updates_in_place)
    return _file_bytes(bundle.path, (".onnx", ".bin", ".data")), per_stream


# -- batched paths: start(batch, stream), step(), stream_bytes(), close() -------------------------

class T2RStreams:
    def __init__(self, bundle, threads: int):
        from ..runtime import OrtDecoder

        self.decoder = OrtDecoder(bundle, provider="cpu", threads=threads)
        self.weight_bytes, self._stream_bytes = t2r_footprint(bundle)

    def start(self, batch: int, stream: np.ndarray, context: int) -> None:
        self.decoder.reset(batch)
        t = max(1, min(context, T2R_WARM_TOKENS, T2R_WARM_TOTAL // batch))
        ids = np.tile(np.asarray(stream[context - t:context], np.int64), (batch, 1))
        positions = np.tile(np.arange(context - t, context, dtype=np.int64), (batch, 1))
        self._next = np.argmax(self.decoder.prefill(ids, positions), axis=-1)[:, None]
        self._pos = np.full((batch, 1), context, np.int64)

    def step(self) -> None:
        self._next = np.argmax(self.decoder.step(self._next, self._pos), axis=-1)[:, None]
        self._pos += 1

    def stream_bytes(self, context: int) -> int:
        # the state has no sequence axis: the same at every context
        return self._stream_bytes

    def close(self) -> None:
        self.decoder.close()


class SoftmaxOrtStreams:
    def __init__(self, dec, threads: int, weight_bytes: int):
        from .softmax_graph import KVCacheDecoder, kv_cache_nbytes

        self.one = KVCacheDecoder(dec, threads)
        self.session = self.one.sessions["step"]
        self.weight_bytes = weight_bytes
        self._kv_bytes = lambda context: kv_cache_nbytes(dec, context)
        self._base = None

    def start(self, batch: int, stream: np.ndarray, context: int) -> None:
        import onnxruntime as ort

        # the previous batch's cache goes before this one is made
        self.cache = None
        if self._base is None or self._base[0] != context:
            self.one.reset()
            self.one.prefill(stream[:context])
            self._base = (context, {past: value.numpy() for past, value in self.one.cache.items()})
            self.one.reset()
        self.cache = {past: ort.OrtValue.ortvalue_from_numpy(np.repeat(kv, batch, axis=0))
                      for past, kv in self._base[1].items()}
        self._next = np.full((batch, 1), int(stream[context]), np.int64)
        self._pos = np.full((batch, 1), context, np.int64)

    def step(self) -> None:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", self._next)
        binding.bind_cpu_input("position_ids", self._pos)
        binding.bind_output("logits", "cpu")
        for past, present in self.one.pairs:
            binding.bind_ortvalue_input(past, self.cache[past])
            binding.bind_output(present, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.cache = {past: value for (past, _), value in zip(self.one.pairs, outputs[1:], strict=True)}
        self._next = np.argmax(outputs[0].numpy(), axis=-1).reshape(-1, 1).astype(np.int64)
        self._pos += 1

    def stream_bytes(self, context: int) -> int:
        # the concat graph holds the past cache and the one token longer present during a step
        return self._kv_bytes(context) + self._kv_bytes(context + 1)

    def close(self) -> None:
        self.cache = None
        self.one = None


class GenaiStreams:
    def __init__(self, model_path: Path, threads: int, kv_bytes, max_length: int):
        import json

        import onnxruntime_genai as og

        config = og.Config(str(model_path))
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.og = og
        self.model = og.Model(config)
        self.weight_bytes = _file_bytes(model_path, (".onnx", ".data"))
        self.max_length = max_length
        self._kv_bytes = kv_bytes

    def start(self, batch: int, stream: np.ndarray, context: int) -> None:
        self.generator = None
        gc.collect()
        params = self.og.GeneratorParams(self.model)
        # greedy, no stop on EOS: random-token contexts must not end a stream
        params.set_search_options(max_length=self.max_length, min_length=self.max_length, batch_size=batch,
                                  do_sample=False)
        self.generator = self.og.Generator(self.model, params)
        self.generator.append_tokens(np.tile(np.asarray(stream[:context], np.int32), (batch, 1)))
        # the first call only samples from the prompt's logits; each later call runs one model step
        self.generator.generate_next_token()

    def step(self) -> None:
        self.generator.generate_next_token()

    def stream_bytes(self, context: int) -> int:
        return self._kv_bytes(context)

    def close(self) -> None:
        self.generator = None
        self.model = None


# -- the run -------------------------------------------------------------------------------------

def _time(path, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        path.step()
    return time.perf_counter() - t0


def run_streams(cfg: StreamsConfig, progress=lambda message: None) -> dict:
    """Aggregate tokens/s per batch size and path, memory per stream, what fits the budget."""
    import torch

    from ..cache import cache_root
    from ..runtime import load_bundle
    from .peers import build_genai_model
    from .run import failure_line, load_softmax, check_models_match, machine_info
    from .softmax_graph import extract_softmax_decoder, kv_cache_nbytes

    bundle = load_bundle(cfg.bundle)
    cfg.validate(bundle.config.max_position)
    torch.set_num_threads(cfg.threads)
    softmax = load_softmax(cfg.softmax_model)
    dec = extract_softmax_decoder(softmax)
    check_models_match(bundle.config, dec, None)
    softmax_weights = 4 * sum(p.numel() for p in softmax.parameters())
    del softmax
    stream = np.random.default_rng(cfg.seed).integers(0, bundle.config.vocab_size, cfg.max_length() + 1)
    opened, failed = {"t2r-ort": T2RStreams(bundle, cfg.threads)}, {}
    check_budget(cfg, opened["t2r-ort"].weight_bytes, opened["t2r-ort"].stream_bytes(cfg.context))
    for name in cfg.paths:
        try:
            if name == "softmax-ort":
                opened[name] = SoftmaxOrtStreams(dec, cfg.threads, softmax_weights)
            elif name == "genai":
                progress("genai: building the softmax model with onnxruntime-genai's builder (cached)")
                context = 1 << (cfg.max_length() - 1).bit_length()
                built = build_genai_model(cfg.softmax_model, context, Path(cfg.cache_dir or cache_root()))
                opened[name] = GenaiStreams(built, cfg.threads, lambda p: kv_cache_nbytes(dec, p), cfg.max_length())
        except PathUnavailable as err:
            failed[name] = str(err)
    result = {"machine": machine_info(cfg.threads),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}, "paths": {}}
    for name in cfg.paths:
        entry = {"label": STREAM_PATHS[name], "status": "ok", "tokens_per_s": {}, "repeat_s": {}, "skipped": {}}
        if name in failed:
            entry["status"] = f"unavailable: {failed[name]}"
        else:
            path = opened[name]
            entry.update(weight_bytes=path.weight_bytes, stream_bytes=path.stream_bytes(cfg.context))
        result["paths"][name] = entry
    for batch in sorted(cfg.batches):
        running = {}
        for name, path in list(opened.items()):
            entry = result["paths"][name]
            if cfg.memory_budget and entry["weight_bytes"] + batch * entry["stream_bytes"] > cfg.memory_budget:
                entry["skipped"][str(batch)] = "over the memory budget"
                continue
            progress(f"batch {batch}: {name} → context {cfg.context:,}")
            try:
                path.start(batch, stream, cfg.context)
                for _ in range(cfg.warmup):
                    path.step()
                running[name] = []
            except Exception as err:  # e.g. out of memory in a peer: reported, never faked
                if name == "t2r-ort":
                    raise
                entry["skipped"][str(batch)] = failure_line(err)
        for r in range(cfg.repeats):
            progress(f"batch {batch}: repeat {r + 1}/{cfg.repeats}, {cfg.steps} steps per path")
            names = list(running)
            for name in names[r % len(names):] + names[:r % len(names)]:
                if name not in running:
                    continue
                try:
                    running[name].append(_time(opened[name], cfg.steps))
                except Exception as err:  # a peer failing mid-run is reported, never faked
                    if name == "t2r-ort":
                        raise
                    result["paths"][name]["skipped"][str(batch)] = failure_line(err)
                    del running[name]
        for name, walls in running.items():
            entry = result["paths"][name]
            entry["tokens_per_s"][str(batch)] = batch * cfg.steps / statistics.median(walls)
            entry["repeat_s"][str(batch)] = walls
        gc.collect()
    for path in opened.values():
        path.close()
    result["summary"] = summarize_streams(result, cfg.memory_budget, cfg.context)
    return result


def summarize_streams(result: dict, budget: int | None, context: int) -> dict:
    """Streams each path fits in the budget, best aggregate tokens/s, where the curve flattens; goals."""
    per_path = {}
    for name, entry in result["paths"].items():
        if entry["status"] != "ok":
            continue
        tps = {int(b): v for b, v in entry["tokens_per_s"].items()}
        row = {"best_tokens_per_s": max(tps.values()) if tps else None,
               "best_batch": max(tps, key=tps.get) if tps else None,
               "fits": max(0, (budget - entry["weight_bytes"]) // entry["stream_bytes"]) if budget else None}
        batches = sorted(tps)
        row["flattens_at"] = next((b for a, b in zip(batches, batches[1:]) if tps[b] < FLAT_GAIN * tps[a]), None)
        per_path[name] = row
    goals = []
    t2r, genai = per_path.get("t2r-ort"), per_path.get("genai")
    ratios = {}
    if t2r and genai:
        if budget and genai["fits"] is not None:
            ratios["streams t2r/genai"] = t2r["fits"] / genai["fits"] if genai["fits"] > 0 else None
            value = ratios["streams t2r/genai"]
            text = f"≥ {STREAMS_GOAL:g}× as many streams as genai at context {context:,} in {gib(budget)}"
            goals.append({"goal": text,
                          "value": f"{t2r['fits']:,} vs {genai['fits']:,}" + (f" ({value:,.1f}×)" if value else ""),
                          "met": value is None or value >= STREAMS_GOAL})
        if genai["best_tokens_per_s"]:
            value = t2r["best_tokens_per_s"] / genai["best_tokens_per_s"]
            ratios["best aggregate t2r/genai"] = value
            goals.append({"goal": f"≥ {AGGREGATE_GOAL:g}× genai's best aggregate tokens/s (batches measured)",
                          "value": f"{value:.2f}× ({t2r['best_tokens_per_s']:,.0f} at batch {t2r['best_batch']} vs "
                                   f"{genai['best_tokens_per_s']:,.0f} at batch {genai['best_batch']})",
                          "met": value >= AGGREGATE_GOAL})
    return {"paths": per_path, "ratios": ratios, "goals": goals}
