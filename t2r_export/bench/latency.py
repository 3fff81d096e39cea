"""Per-token decode latency of a bundle with the torch-free runtime: IO binding vs plain session.run,
and position 128 vs 16k (a recurrent step should not care where it is).

    t2r-export bench latency BUNDLE [--positions 128,16384] [--steps 200] [--repeats 5] [--threads 2]

For each position P: the prompt (real stdlib test tokens, repeated if needed) goes through the
prefill graph up to P, then ``--steps`` single-token steps are timed; the median over repeats
counts (each repeat continues from where the last stopped, so positions drift by steps × repeats).
The command prints one table and the two ratios; ``--json`` writes them.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np


def _tokens(bundle, count: int) -> np.ndarray:
    """Real text: the stdlib test split through the bundle's tokenizer (repeated up to ``count``)."""
    from ..data.corpus import read_split

    tok = bundle.load_tokenizer()
    ids: list[int] = []
    for doc in read_split("test"):
        ids.extend(tok.encode(doc).ids)
        if len(ids) >= count:
            break
    reps = -(-count // max(len(ids), 1))
    return np.array((ids * reps)[:count], dtype=np.int64)


def step_latency(bundle, position: int, io_binding: bool, steps: int, repeats: int, threads: int,
                 tokens: np.ndarray) -> float:
    """Median seconds per single-token step after prefilling ``position`` tokens."""
    from ..runtime import OrtDecoder

    with OrtDecoder(bundle, threads=threads, io_binding=io_binding) as decoder:
        decoder.reset(1)
        decoder.prefill(tokens[None, :position], np.arange(position, dtype=np.int64)[None])
        pos = position
        ids = np.zeros((1, 1), np.int64)
        pid = np.zeros((1, 1), np.int64)
        for _ in range(8):  # warm-up
            ids[0, 0], pid[0, 0] = tokens[pos % len(tokens)], pos
            decoder.step(ids, pid)
            pos += 1
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                ids[0, 0], pid[0, 0] = tokens[pos % len(tokens)], pos
                decoder.step(ids, pid)
                pos += 1
            times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def measure_latency(bundle_dir: Path, positions: list[int], steps: int = 200, repeats: int = 5,
                    threads: int = 2) -> dict:
    """Median ms per token at each position, with IO binding and with plain ``session.run``, and the two ratios."""
    from ..runtime import load_bundle

    if not positions or min(positions) < 1:
        raise ValueError(f"positions must be positive integers, got {positions}")
    for name, value in (("steps", steps), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    bundle = load_bundle(Path(bundle_dir))
    tokens = _tokens(bundle, max(positions) + 16)
    rows = []
    for position in positions:
        for io_binding in (True, False):
            seconds = step_latency(bundle, position, io_binding, steps, repeats, threads, tokens)
            rows.append({"position": position, "io_binding": io_binding, "ms_per_token": seconds * 1e3})
    lat = {(r["position"], r["io_binding"]): r["ms_per_token"] for r in rows}
    first, last = positions[0], positions[-1]
    return {
        "bundle": str(bundle_dir), "threads": threads, "steps": steps, "repeats": repeats, "rows": rows,
        "plain_run_over_io_binding": lat[(first, False)] / lat[(first, True)],
        "io_binding_last_over_first_position": lat[(last, True)] / lat[(first, True)],
    }


def latency_lines(result: dict) -> list[str]:
    """The result as a plain-text table and the two ratios."""
    lines = [f"{'position':>9} {'io binding':>10} {'ms/token':>9} {'tokens/s':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['position']:9d} {str(r['io_binding']):>10} {r['ms_per_token']:9.3f} "
                     f"{1e3 / r['ms_per_token']:9.1f}")
    first, last = result["rows"][0]["position"], result["rows"][-1]["position"]
    lines.append(f"plain session.run / IO binding at position {first}: {result['plain_run_over_io_binding']:.2f}x")
    lines.append(f"IO binding latency at position {last} / {first}: "
                 f"{result['io_binding_last_over_first_position']:.3f}x")
    return lines
