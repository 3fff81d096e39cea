"""PNG plots and a markdown summary of a ``bench.json`` result (matplotlib, Agg backend).

    decode.png   single-token decode tokens/s vs context position, every path
    memory.png   T2R state bytes vs softmax KV-cache bytes vs position
    rss.png      process RSS over a long greedy T2R decode
    prefill.png  prompt tokens/s: prefill graph, step feeding, softmax peers
    summary.md   the tables, for a README
    streams.png  `bench streams`: aggregate tokens/s vs batch size, streams that fit the budget
    streams.md   its tables
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .goals import PREFILL_NAMES, QUANTIZED_PATHS  # noqa: E402
from .loading import peak_rss_line  # noqa: E402
from .streams import gib  # noqa: E402

STYLE = {
    "t2r-ort": dict(color="tab:red", marker="o", linewidth=2.5),
    "t2r-torch": dict(color="tab:orange", marker="s", linestyle="--"),
    "softmax-ort": dict(color="tab:blue", marker="^"),
    "genai": dict(color="tab:purple", marker="D"),
    "transformers": dict(color="tab:green", marker="v", linestyle="--"),
    "floor": dict(color="black", marker="_", linestyle=":"),
    "t2r-int4": dict(color="darkred", marker="*"),
    "t2r-int8-wo": dict(color="indianred", marker="P"),
    "t2r-int4-qdq": dict(color="maroon", marker="X", linestyle="-."),
}
PREFILL_COLORS = {"t2r-ort prefill graph": "tab:red", "t2r-ort step feeding": "salmon",
                  "softmax-ort": "tab:blue", "genai": "tab:purple", "transformers": "tab:green", "floor": "black"}
MIB = 2 ** 20


def _title(result: dict, what: str) -> str:
    m = result["machine"]
    threads = f"{m['threads']} thread" + ("s" if m["threads"] != 1 else "")
    return f"{what}\n{m['cpu']}, {threads}, batch 1, fp32"


def plot_decode(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 6.0))
    for name, entry in result["paths"].items():
        points = sorted((int(p), v) for p, v in entry.get("tokens_per_s", {}).items())
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, label=f"{name}: {entry['label']}", **STYLE.get(name, {}))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context position (tokens already in the cache / state)")
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_title(_title(result, "single-token decode speed vs context"), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    # the legend sits below the axes: a tight bounding box keeps it in the picture
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_memory(result: dict, path: Path) -> None:
    mem = result["memory"]
    points = sorted((int(p), v) for p, v in mem["kv_cache_bytes"].items())
    xs = [p for p, _ in points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [v / MIB for _, v in points], marker="^", color="tab:blue", label="softmax KV cache (fp32)")
    ax.plot(xs, [mem["state_bytes"] / MIB] * len(xs), marker="o", color="tab:red", linewidth=2.5,
            label="T2R state (fp32, constant)")
    if mem.get("genai_preallocated_kv_bytes"):
        ax.axhline(mem["genai_preallocated_kv_bytes"] / MIB, color="tab:purple", linestyle=":",
                   label="onnxruntime-genai preallocated KV (this run's max length)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context position")
    ax.set_ylabel("MiB per sequence")
    ax.set_title(_title(result, "decode memory per sequence"), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rss(result: dict, path: Path) -> None:
    rss = result["memory"]["rss"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(rss["tokens"], [b / MIB for b in rss["rss_bytes"]], color="tab:red")
    ax.set_xlabel("tokens generated (greedy, T2R step graph, ONNX Runtime)")
    ax.set_ylabel("process RSS (MiB)")
    low = min(rss["rss_bytes"]) / MIB
    ax.set_ylim(max(0.0, low - 64), max(rss["rss_bytes"]) / MIB + 64)
    ax.set_title(_title(result, f"RSS over a {rss['decode_tokens']:,}-token decode "
                                f"(growth after warm-up {rss['growth_bytes'] / MIB:+.1f} MiB)"), fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_prefill(result: dict, path: Path) -> None:
    rows = result.get("prefill", {})
    names = [n for n in PREFILL_NAMES if any(n in row for row in rows.values())]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / max(1, len(names))
    lengths = list(rows)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(lengths))]
        ax.bar(xs, [v if isinstance(v := rows[t].get(name), float) else 0 for t in lengths], width, label=name,
               color=PREFILL_COLORS.get(name))
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(lengths))])
    ax.set_xticklabels([f"{int(t):,}-token prompt" for t in lengths])
    ax.set_yscale("log")
    ax.set_ylabel("prompt tokens/s")
    ax.set_title(_title(result, "prefill speed"), fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PLOTS = {"decode.png": plot_decode, "memory.png": plot_memory, "rss.png": plot_rss, "prefill.png": plot_prefill}


def write_plots(result: dict, out_dir: Path) -> list[Path]:
    written = []
    for name, plot in PLOTS.items():
        plot(result, Path(out_dir) / name)
        written.append(Path(out_dir) / name)
    return written


def _x(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}×"


def markdown_summary(result: dict) -> str:
    """The decode, ratio, memory, prefill and goal tables as GitHub markdown."""
    m = result["machine"]
    paths = result["paths"]
    positions = list(result["summary"]["positions"])
    lines = [f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['threads']} threads for every path, batch 1, fp32; "
             f"onnxruntime {m['onnxruntime']}, onnxruntime-genai {m.get('onnxruntime_genai') or 'absent'}, "
             f"torch {m['torch']}, transformers {m['transformers']}; load average "
             f"{m['loadavg_start'][0]:.1f} → {m.get('loadavg_end', [float('nan')])[0]:.1f}"
             + (f"; the timed steps got {m['cpu_share']:.0%} of the CPU time they asked for"
                if m.get("cpu_share") else "") + ".", "",
             "Decode tokens/s (single-token steps at the context position, median of repeats):", "",
             "| path | " + " | ".join(f"@{int(p):,}" for p in positions) + " |",
             "| --- |" + " ---: |" * len(positions)]
    for name, entry in paths.items():
        cells = [f"{entry['tokens_per_s'][p]:,.1f}" if p in entry.get("tokens_per_s", {}) else
                 (entry["status"] if entry["status"] != "ok" else "—") for p in positions]
        lines.append(f"| {name}: {entry['label']} | " + " | ".join(cells) + " |")
    lines += ["", "T2R step graph (t2r-ort) speedup in tokens/s, and its latency over the floor's:", "",
              "| position | vs softmax-ort | vs genai | vs transformers | vs fastest softmax | latency / floor | "
              "ceiling: floor vs fastest softmax |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p, row in result["summary"]["positions"].items():
        fastest = f" ({row['fastest_softmax']})" if row.get("fastest_softmax") else ""
        lines.append(f"| {int(p):,} | {_x(row.get('t2r/softmax-ort'))} | {_x(row.get('t2r/genai'))} | "
                     f"{_x(row.get('t2r/transformers'))} | {_x(row.get('t2r/fastest_softmax'))}{fastest} | "
                     f"{_x(row.get('t2r_latency/floor'))} | {_x(row.get('floor/fastest_softmax'))} |")
    quantized = [name for name in QUANTIZED_PATHS if paths.get(name, {}).get("status") == "ok"]
    if quantized:
        lines += ["", "Weight-only plans, tokens/s over the fp32 T2R step's:", "",
                  "| position | " + " | ".join(quantized) + " |", "| ---: |" + " ---: |" * len(quantized)]
        for p, row in result["summary"]["positions"].items():
            lines.append(f"| {int(p):,} | " + " | ".join(_x(row.get(f"{name}/t2r-ort")) for name in quantized) + " |")
    mem = result["memory"]
    rss = mem["rss"]
    lines += ["", "Memory per sequence (fp32):", "", "| position | softmax KV cache | T2R state |",
              "| ---: | ---: | ---: |"]
    for p, kv in mem["kv_cache_bytes"].items():
        lines.append(f"| {int(p):,} | {kv / MIB:,.2f} MiB | {mem['state_bytes'] / MIB:,.3f} MiB |")
    lines += ["", f"RSS over a {rss['decode_tokens']:,}-token greedy T2R decode: {rss['growth_bytes'] / MIB:+.1f} MiB "
                  f"after warm-up ({rss['growth_from_start_bytes'] / MIB:+.1f} MiB from the first sample); state "
                  f"{rss['state_bytes']:,} bytes before and {rss['state_bytes_after']:,} after.", ""]
    peak = peak_rss_line(result)
    if peak:
        lines += [peak, ""]
    lines += ["Prefill, prompt tokens/s:", "",
              "| prompt | " + " | ".join(PREFILL_NAMES) + " | graph / step feeding | floor / step feeding (ceiling) | "
              "graph / fastest softmax |", "| ---: |" + " ---: |" * (len(PREFILL_NAMES) + 3)]
    for t, row in result["prefill"].items():
        cells = [f"{row[n]:,.0f}" if isinstance(row.get(n), float) else row.get(n, "—") for n in PREFILL_NAMES]
        lines.append(f"| {int(t):,} | " + " | ".join(cells) + f" | {_x(row.get('prefill_graph/step_feeding'), 1)} | "
                     f"{_x(row.get('prefill_floor/step_feeding'), 1)} | {_x(row.get('prefill_graph/fastest_softmax'))} |")
    lines += ["", "| goal (T2R vs the fastest softmax peer) | measured | met |", "| --- | ---: | :---: |"]
    lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'no'} |" for g in result["summary"]["goals"]]
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir: Path) -> list[Path]:
    """All PNGs and summary.md into ``out_dir``."""
    written = write_plots(result, out_dir)
    (Path(out_dir) / "summary.md").write_text(markdown_summary(result))
    return [*written, Path(out_dir) / "summary.md"]


def plot_streams(result: dict, path: Path) -> None:
    """Aggregate tokens/s vs batch size, and the streams each path fits in the memory budget."""
    cfg, summary = result["config"], result["summary"]["paths"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for name, entry in result["paths"].items():
        points = sorted((int(b), v) for b, v in entry.get("tokens_per_s", {}).items())
        if points:
            xs, ys = zip(*points, strict=True)
            left.plot(xs, ys, label=f"{name}: {entry['label']}", **STYLE.get(name, {}))
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent streams (batch size)")
    left.set_ylabel("aggregate decode tokens/s (median)")
    left.set_title(f"all streams at context {cfg['context']:,}", fontsize=10)
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    fits = {name: row["fits"] for name, row in summary.items() if row.get("fits") is not None}
    if fits:
        names = list(fits)
        right.bar(names, [max(fits[n], 0.5) for n in names], color=[STYLE.get(n, {}).get("color") for n in names])
        for i, n in enumerate(names):
            right.text(i, max(fits[n], 0.5), f"{fits[n]:,}", ha="center", va="bottom", fontsize=8)
        right.set_yscale("log")
        right.set_ylabel("streams that fit")
        right.set_title(f"within {gib(cfg['memory_budget'])} (weights + per-stream state / KV)",
                        fontsize=10)
    else:
        right.axis("off")
    m = result["machine"]
    threads = f"{m['threads']} thread" + ("s" if m["threads"] != 1 else "")
    fig.suptitle(f"many streams: {m['cpu']}, {threads}, fp32" + (f", {cfg['shape']}" if cfg.get("shape") else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def streams_markdown(result: dict) -> str:
    """The many-streams tables (aggregate tokens/s per batch; memory, fit and goals) as markdown."""
    cfg, m = result["config"], result["machine"]
    batches = sorted(int(b) for b in cfg["batches"])
    summary = result["summary"]
    lines = [f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['threads']} threads for every path, fp32; context "
             f"{cfg['context']:,}" + (f"; {cfg['shape']}-shaped models (random init)" if cfg.get("shape") else "")
             + f"; load average {m['loadavg_start'][0]:.1f}.", "",
             "Aggregate decode tokens/s (all streams, median of repeats):", "",
             "| path | " + " | ".join(f"B={b}" for b in batches) + " |", "| --- |" + " ---: |" * len(batches)]
    for name, entry in result["paths"].items():
        if entry["status"] != "ok":
            lines.append(f"| {name} | {entry['status']} |" + " |" * (len(batches) - 1))
            continue
        cells = [f"{entry['tokens_per_s'][str(b)]:,.0f}" if str(b) in entry["tokens_per_s"]
                 else entry["skipped"].get(str(b), "—") for b in batches]
        lines.append(f"| {name}: {entry['label']} | " + " | ".join(cells) + " |")
    budget = cfg.get("memory_budget")
    lines += ["", "| path | weights | bytes per stream | streams in " + (gib(budget) if budget else "—")
              + " | best aggregate tokens/s (batch) | flattens at |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in summary["paths"].items():
        entry = result["paths"][name]
        fits = "—" if row["fits"] is None else f"{row['fits']:,}"
        lines.append(f"| {name} | {gib(entry['weight_bytes'])} | {entry['stream_bytes']:,} | {fits} | "
                     f"{row['best_tokens_per_s'] or 0:,.0f} ({row['best_batch']}) | "
                     f"{'B=' + str(row['flattens_at']) if row['flattens_at'] else 'not in these batches'} |")
    lines += ["", "| goal | measured | met |", "| --- | ---: | :---: |"]
    lines += [f"| {g['goal']} | {g['value']} | {'yes' if g['met'] else 'no'} |" for g in summary["goals"]]
    return "\n".join(lines) + "\n"


def write_streams_report(result: dict, out_dir: Path) -> list[Path]:
    plot_streams(result, Path(out_dir) / "streams.png")
    (Path(out_dir) / "streams.md").write_text(streams_markdown(result))
    return [Path(out_dir) / "streams.png", Path(out_dir) / "streams.md"]
