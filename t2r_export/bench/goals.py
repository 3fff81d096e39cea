"""The ratios and goals every `bench run` prints (``summarize``): T2R step vs each softmax peer and
the fastest, latency over the dense-matmul floor, the ceiling (floor ÷ fastest peer), prefill, RSS."""

from __future__ import annotations

import statistics

SOFTMAX_PATHS = ("softmax-ort", "genai", "transformers")
# goals for the T2R step's speed-up over the fastest softmax peer at these positions (the first bench's)
SPEEDUP_GOALS = {128: 1.6, 4096: 8.0, 16384: 24.0}
FLOOR_GOAL = 1.10
# the step graph at the matmul floor: at least the fastest peer at 128; further out, within 5% of
# the ceiling (floor ÷ fastest peer: the most any decoder of these weights can win there); on a
# realistic shape within 5% of the floor at every position
PEER_GOAL_AT = {128: 1.0}
CEILING_GOAL_AT = (4096, 16384)
CEILING_SHARE = 0.95
FLOOR_GOAL_EVERY_POSITION = 1.05
# bench paths that run the same T2R model exported with a weight-only plan: path -> precision
QUANTIZED_PATHS = {"t2r-int4": "int4", "t2r-int8-wo": "int8-wo", "t2r-int4-qdq": "int4-qdq"}
# int4 weight blocks: at least this many times the fp32 step's tokens/s at every position
INT4_SPEEDUP_GOAL = 2.0


# the prefill table's rows, in order: T2R's two ways to take a prompt, the softmax peers, and the
# floor's prefill form (the prompt's dense matmuls alone)
PREFILL_NAMES = ("t2r-ort prefill graph", "t2r-ort step feeding", "softmax-ort", "genai", "transformers", "floor")


def summarize(result: dict) -> dict:
    """Per position: T2R speedup over each softmax path and the fastest one, latency vs the floor; goals."""
    paths = result["paths"]
    t2r = paths["t2r-ort"]["tokens_per_s"]
    per_position, goals = {}, []
    for p, tps in t2r.items():
        row = {}
        for name in (*SOFTMAX_PATHS, "t2r-torch"):
            other = paths.get(name, {}).get("tokens_per_s", {}).get(p)
            row[f"t2r/{name}"] = tps / other if other else None
        softmax = {n: paths[n]["tokens_per_s"][p] for n in SOFTMAX_PATHS
                   if paths.get(n, {}).get("tokens_per_s", {}).get(p)}
        if softmax:
            fastest = max(softmax, key=softmax.get)
            row["fastest_softmax"] = fastest
            row["t2r/fastest_softmax"] = tps / softmax[fastest]
        floor = paths.get("floor", {}).get("tokens_per_s", {}).get(p)
        row["t2r_latency/floor"] = floor / tps if floor else None
        # the most any decoder of these weights could win here: one running at the floor
        row["floor/fastest_softmax"] = floor / softmax[fastest] if floor and softmax else None
        per_position[p] = row
        goal = SPEEDUP_GOALS.get(int(p))
        if goal and row.get("t2r/fastest_softmax"):
            entry = _goal(f"T2R step ≥ {goal:g}× the fastest softmax peer at position {p}",
                          row["t2r/fastest_softmax"], goal, "×", higher=True)
            if row["floor/fastest_softmax"]:
                entry["value"] += f" (ceiling: the floor is {row['floor/fastest_softmax']:.2f}×)"
            goals.append(entry)
    goals += _floor_goals(per_position)
    goals += _quantized(paths, per_position)
    for row in result.get("prefill", {}).values():
        if "t2r-ort prefill graph" in row:
            graph = row["t2r-ort prefill graph"]
            row["prefill_graph/step_feeding"] = graph / row["t2r-ort step feeding"]
            if isinstance(row.get("floor"), float):
                # the most the prefill graph could reach over step feeding here, with the runtime's kernels
                row["prefill_floor/step_feeding"] = row["floor"] / row["t2r-ort step feeding"]
                row["prefill_graph/floor"] = graph / row["floor"]
            peers = {n: row[n] for n in SOFTMAX_PATHS if isinstance(row.get(n), float)}
            if peers:
                fastest = max(peers, key=peers.get)
                row["fastest_softmax"] = fastest
                row["prefill_graph/fastest_softmax"] = graph / peers[fastest]
    prefill = result.get("prefill", {})
    if "1024" in prefill:
        row = prefill["1024"]
        entry = _goal("prefill graph ≥ 10× step feeding at 1k tokens", row["prefill_graph/step_feeding"], 10, "×",
                      higher=True)
        if row.get("prefill_floor/step_feeding"):
            entry["value"] += (f" (ceiling: the floor's prefill is {row['prefill_floor/step_feeding']:.2f}×; the graph "
                               f"runs at {row['prefill_graph/floor']:.2f} of the floor)")
        goals.append(entry)
        if "prefill_graph/fastest_softmax" in row:
            goals.append(_goal("prefill ≥ the fastest softmax peer at 1k tokens",
                               row["prefill_graph/fastest_softmax"], 1.0, "×", higher=True))
    if "8192" in prefill and "prefill_graph/fastest_softmax" in prefill["8192"]:
        goals.append(_goal("prefill ≥ 2× the fastest softmax peer at 8k tokens",
                           prefill["8192"]["prefill_graph/fastest_softmax"], 2.0, "×", higher=True))
    rss = result.get("memory", {}).get("rss")
    if rss:
        growth = rss["growth_bytes"] / 2**20
        goals.append({"goal": f"RSS flat over {rss['decode_tokens']:,} generated tokens (state constant)",
                      "value": f"{growth:+.1f} MiB after warm-up, state {rss['state_bytes']:,} → "
                               f"{rss['state_bytes_after']:,} bytes",
                      "met": abs(growth) < 8 and rss["state_bytes"] == rss["state_bytes_after"]})
    return {"positions": per_position, "goals": goals}


def _floor_goals(per_position: dict) -> list[dict]:
    """The step at the floor: ≥ the fastest peer at 128, within 5% of the ceiling further out, and its
    latency over the floor's (median, and at every position)."""
    goals = []
    for p, row in per_position.items():
        vs_peer = row.get("t2r/fastest_softmax")
        if int(p) in PEER_GOAL_AT and vs_peer:
            goals.append(_goal(f"T2R step ≥ {PEER_GOAL_AT[int(p)]:g}× the fastest softmax peer at position {p}",
                               vs_peer, PEER_GOAL_AT[int(p)], "×", higher=True))
        if int(p) in CEILING_GOAL_AT and vs_peer and row.get("floor/fastest_softmax"):
            share = vs_peer / row["floor/fastest_softmax"]
            goals.append(_goal(f"T2R step within {1 - CEILING_SHARE:.0%} of the ceiling (floor ÷ fastest peer, "
                               f"{row['floor/fastest_softmax']:.2f}×) at position {p}", share, CEILING_SHARE,
                               " of it", higher=True))
    floors = [r["t2r_latency/floor"] for r in per_position.values() if r["t2r_latency/floor"]]
    if floors:
        goals.append(_goal(f"T2R step latency ≤ {FLOOR_GOAL:.2f}× the floor (median over positions)",
                           statistics.median(floors), FLOOR_GOAL, "×", higher=False))
        goals.append(_goal(f"T2R step latency ≤ {FLOOR_GOAL_EVERY_POSITION:.2f}× the floor at every position "
                           "(the worst)", max(floors), FLOOR_GOAL_EVERY_POSITION, "×", higher=False))
    return goals


def _quantized(paths: dict, per_position: dict) -> list[dict]:
    """Each weight-only path's tokens/s over the fp32 step's (``{path}/t2r-ort`` per position); the int4 goal."""
    t2r = paths["t2r-ort"]["tokens_per_s"]
    for name in QUANTIZED_PATHS:
        measured = paths.get(name, {}).get("tokens_per_s", {})
        for p, row in per_position.items():
            row[f"{name}/t2r-ort"] = measured[p] / t2r[p] if measured.get(p) else None
    ratios = [row["t2r-int4/t2r-ort"] for row in per_position.values() if row.get("t2r-int4/t2r-ort")]
    if not ratios:
        return []
    return [_goal(f"int4 step ≥ {INT4_SPEEDUP_GOAL:g}× the fp32 step's tokens/s at every position (the worst)",
                  min(ratios), INT4_SPEEDUP_GOAL, "×", higher=True)]


def _goal(text: str, value: float, target: float, unit: str, higher: bool) -> dict:
    met = value >= target if higher else value <= target
    return {"goal": text, "value": f"{value:.2f}{unit}", "met": bool(met)}
