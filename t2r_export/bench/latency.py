"""Per-token decode latency of a bundle with the torch-free runtime: IO binding vs plain session.run,
and position 128 vs 16k (a recurrent step should not care where it is).

    python -m t2r_export.bench.latency [BUNDLE] [--positions 128,16384] [--steps 200] [--repeats 5] [--threads 2]

For each position P: the prompt (real stdlib test tokens, repeated if needed) goes through the
prefill graph up to P, then ``--steps`` single-token steps are timed; the median over repeats
counts (each repeat continues from where the last stopped, so positions drift by steps × repeats).
Prints one table and the two ratios; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
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


def main(argv=None) -> dict:
    from ..runtime import load_bundle

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", default="graphs/t2r-teacher")
    parser.add_argument("--positions", default="128,16384")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)
    bundle = load_bundle(Path(args.bundle))
    positions = [int(p) for p in args.positions.split(",")]
    tokens = _tokens(bundle, max(positions) + 16)
    rows = []
    for position in positions:
        for io_binding in (True, False):
            seconds = step_latency(bundle, position, io_binding, args.steps, args.repeats, args.threads, tokens)
            rows.append({"position": position, "io_binding": io_binding, "ms_per_token": seconds * 1e3})
    print(f"{'position':>9} {'io binding':>10} {'ms/token':>9} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['position']:9d} {str(r['io_binding']):>10} {r['ms_per_token']:9.3f} {1e3 / r['ms_per_token']:9.1f}")
    lat = {(r["position"], r["io_binding"]): r["ms_per_token"] for r in rows}
    first, last = positions[0], positions[-1]
    result = {
        "bundle": str(args.bundle), "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
        "rows": rows,
        "plain_run_over_io_binding": lat[(first, False)] / lat[(first, True)],
        "io_binding_last_over_first_position": lat[(last, True)] / lat[(first, True)],
    }
    print(f"plain session.run / IO binding at position {first}: {result['plain_run_over_io_binding']:.2f}x")
    print(f"IO binding latency at position {last} / {first}: {result['io_binding_last_over_first_position']:.3f}x")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
