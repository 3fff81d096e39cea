"""Seed-to-seed spread of the paper experiment, from several of its output folders.

Each folder holds the ``results.json`` of one ``t2r-export experiment paper --seed N`` invocation
(the same plan but the seed; subsets of runs are fine). The summary gives, per run, the perplexity
of every seed with the mean and the spread, and for each comparison with pretrained ``t2r`` the
paired ratio (other run / ``t2r``, same seed: same swap init, same batches) per seed::

    t2r-export experiment seeds runs/experiment-paper runs/experiment-paper-seed1 \\
        runs/experiment-paper-seed2 --out docs/experiment-paper/seeds.md

Bad input (a folder without results, two folders of one seed, plans that differ in more than the
seed) is one line on stderr and exit code 2; the Markdown and JSON are written atomically.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..atomic import atomic_write_text
from .paper import PAPER_RUNS, RESULTS_JSON

REFERENCE = "t2r"


def load_results(folders: list[Path]) -> list[dict]:
    """results.json of each folder, checked to be one plan with distinct seeds; sorted by seed."""
    if len(folders) < 2:
        raise ValueError(f"need at least 2 result folders (one per seed), got {len(folders)}")
    loaded = []
    for folder in folders:
        path = Path(folder) / RESULTS_JSON
        if not path.is_file():
            raise ValueError(f"{folder} has no {RESULTS_JSON}; expected the --out folder of "
                             "`t2r-export experiment paper`")
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{path} is not valid JSON") from None
        if results.get("experiment") != "paper" or "plan" not in results or "rows" not in results:
            raise ValueError(f"{path} is not a paper experiment's results")
        loaded.append(results)
    first = {k: v for k, v in loaded[0]["plan"].items() if k != "seed"}
    for folder, results in zip(folders, loaded):
        plan = {k: v for k, v in results["plan"].items() if k != "seed"}
        if plan != first:
            changed = sorted(k for k in set(plan) | set(first) if plan.get(k) != first.get(k))
            raise ValueError(f"{folder} ran another plan than {folders[0]} (differs in: {', '.join(changed)}); "
                             "only the seed may differ")
    seeds = [r["plan"]["seed"] for r in loaded]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"two folders hold the same seed (seeds: {', '.join(map(str, seeds))}); "
                         "expected one folder per seed")
    return sorted(loaded, key=lambda r: r["plan"]["seed"])


def seed_summary(loaded: list[dict]) -> dict:
    """Per run: perplexity by seed, mean, min, max; per comparison with t2r: paired ratios by seed."""
    by_run: dict[str, dict[int, float]] = {}
    for results in loaded:
        for row in results["rows"]:
            by_run.setdefault(row["run"], {})[results["plan"]["seed"]] = row["test_perplexity"]
    order = [spec.name for spec in PAPER_RUNS if spec.name in by_run]
    runs = []
    for name in order:
        ppl = by_run[name]
        values = list(ppl.values())
        runs.append({"run": name, "perplexity_by_seed": {str(s): p for s, p in ppl.items()},
                     "seeds": len(values), "mean": statistics.fmean(values), "min": min(values), "max": max(values),
                     "spread_pct": (100 * (max(values) - min(values)) / statistics.fmean(values)
                                    if len(values) > 1 else None)})
    comparisons = []
    reference = by_run.get(REFERENCE, {})
    for name in order:
        if name in ("teacher", REFERENCE):
            continue
        common = sorted(set(reference) & set(by_run[name]))
        if not common:
            continue
        ratios = {str(s): by_run[name][s] / reference[s] for s in common}
        comparisons.append({"run": name, "ratio_by_seed": ratios, "seeds": len(common),
                            "min_ratio": min(ratios.values()), "max_ratio": max(ratios.values()),
                            "t2r_better_in": sum(r > 1 for r in ratios.values())})
    return {"experiment": "paper-seeds", "plan": {k: v for k, v in loaded[0]["plan"].items() if k != "seed"},
            "seeds": [r["plan"]["seed"] for r in loaded],
            # a folder may be filled by several invocations (--runs subsets): each row keeps its own
            "commands": list(dict.fromkeys(row.get("command") or r["command"] for r in loaded for row in r["rows"])),
            "runs": runs, "comparisons": comparisons}


def render_markdown(summary: dict) -> str:
    seeds = summary["seeds"]
    budget = summary["plan"]["budget"]
    tokens = budget["steps"] * budget["batch_size"] * budget["block_size"]
    lines = [f"# T2R paper comparison: seed-to-seed spread ({summary['plan']['budget_name']} budget)", "",
             f"- seeds: {', '.join(map(str, seeds))}; {tokens:,} training tokens per run, "
             f"{budget['test_tokens']:,} test tokens; a seed sets the swap init and the batch order", "",
             "- commands:", *[f"  - `{c}`" for c in summary["commands"]], "",
             "| run | " + " | ".join(f"ppl seed {s}" for s in seeds) + " | mean | spread (max-min)/mean |",
             "| --- | " + " | ".join("---:" for _ in seeds) + " | ---: | ---: |"]
    for run in summary["runs"]:
        cells = [f"{run['perplexity_by_seed'][str(s)]:.2f}" if str(s) in run["perplexity_by_seed"] else "-"
                 for s in seeds]
        spread = "-" if run["spread_pct"] is None else f"{run['spread_pct']:.1f}%"
        lines.append(f"| {run['run']} | " + " | ".join(cells) + f" | {run['mean']:.2f} | {spread} |")
    if summary["comparisons"]:
        lines += ["", f"Paired with `{REFERENCE}` of the same seed (ratio of perplexities; above 1: `{REFERENCE}` "
                      "is better):", "",
                  "| run | " + " | ".join(f"seed {s}" for s in seeds) + f" | `{REFERENCE}` better in |",
                  "| --- | " + " | ".join("---:" for _ in seeds) + " | ---: |"]
        for comp in summary["comparisons"]:
            cells = [f"{comp['ratio_by_seed'][str(s)]:.3f}" if str(s) in comp["ratio_by_seed"] else "-"
                     for s in seeds]
            lines.append(f"| {comp['run']} / {REFERENCE} | " + " | ".join(cells) +
                         f" | {comp['t2r_better_in']} of {comp['seeds']} seeds |")
    return "\n".join(lines) + "\n"


def write_summary(summary: dict, out: Path) -> str:
    """Write the Markdown to ``out`` (a .md path) and the JSON beside it, each atomically; returns the Markdown."""
    if Path(out).suffix != ".md":
        raise ValueError(f"--out must name a .md file, got {out}")
    markdown = render_markdown(summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out, markdown)
    return markdown
