"""PNG plots of a ``bench.json`` result (matplotlib, Agg backend: no display needed).

    decode.png   single-token decode tokens/s vs context position, every path
    memory.png   T2R state bytes vs softmax KV-cache bytes vs position
    rss.png      process RSS over a long greedy T2R decode
    prefill.png  prompt tokens/s: prefill graph, step feeding, softmax peers
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "t2r-ort": dict(color="tab:red", marker="o", linewidth=2.5),
    "t2r-torch": dict(color="tab:orange", marker="s", linestyle="--"),
    "softmax-ort": dict(color="tab:blue", marker="^"),
    "genai": dict(color="tab:purple", marker="D"),
    "transformers": dict(color="tab:green", marker="v", linestyle="--"),
    "floor": dict(color="black", marker="_", linestyle=":"),
}
MIB = 2 ** 20


def _title(result: dict, what: str) -> str:
    m = result["machine"]
    return f"{what}\n{m['cpu']}, {m['threads']} threads, batch 1, fp32"


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
    fig.savefig(path, dpi=120)
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
    names = ["t2r-ort prefill graph", "t2r-ort step feeding", "softmax-ort", "genai", "transformers"]
    names = [n for n in names if any(n in row for row in rows.values())]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / max(1, len(names))
    lengths = list(rows)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(lengths))]
        ax.bar(xs, [rows[t].get(name, 0) for t in lengths], width, label=name)
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
