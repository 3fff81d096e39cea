"""Time and peak memory of the parallel (training) form vs sequence length, on this machine.

    t2r-export bench scaling [--lengths 512,1024,2048,4096,8192] [--json OUT]

Each length runs in a fresh subprocess (forward + backward of one attention layer at the bundled
teacher's sizes, batch 1), so peak RSS is that length's alone. Printed per length: seconds, peak
RSS growth over an empty run, and both divided by T: flat per-token columns mean linear growth.
The softmax layer (SDPA, causal) is measured the same way for comparison.
"""

from __future__ import annotations

import resource
import subprocess
import sys

CHILD = r"""
import resource, sys, time, torch
torch.set_num_threads({threads})
from t2r_export.ops.feature_maps import FeatureMap
from t2r_export.ops.linear_attention import chunked_linear_attention
import torch.nn.functional as F
T, form = {t}, "{form}"
B, HKV, G, D, K = 1, {hkv}, {g}, {d}, {k}
gen = torch.Generator().manual_seed(0)
q = torch.randn(B, HKV * G, T, D, generator=gen, requires_grad=True)
k = torch.randn(B, HKV, T, D, generator=gen, requires_grad=True)
v = torch.randn(B, HKV, T, D, generator=gen, requires_grad=True)
fm = FeatureMap("t2r", HKV, D, K)
def run():
    if T == 0:
        return
    if form == "t2r":
        pq = fm((q * D ** -0.5).view(B, HKV, G, T, D))
        pk = fm(k.unsqueeze(2)).squeeze(2)
        out, _ = chunked_linear_attention(pq, pk, v)
    else:
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True)
    out.square().mean().backward()
run()  # warm-up (allocator, kernels)
start = time.perf_counter()
for _ in range({repeats}):
    run()
elapsed = (time.perf_counter() - start) / {repeats}
print(elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(t: int, form: str, threads: int, repeats: int, dims: dict) -> tuple[float, int]:
    code = CHILD.format(t=t, form=form, threads=threads, repeats=repeats, **dims)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    seconds, maxrss_kb = out.split()
    return float(seconds), int(maxrss_kb) * 1024


def measure_scaling(lengths: list[int], threads: int = 2, repeats: int = 3) -> dict:
    """Seconds and peak RSS growth per length, for the T2R parallel form and causal softmax (SDPA)."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be positive integers, got {lengths}")
    if repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats}")
    # the bundled teacher's attention: 2 KV heads, 2 query heads each, head dim 64, k = 32
    dims = dict(hkv=2, g=2, d=64, k=32)
    rows = []
    for form in ("t2r", "softmax"):
        _, base = measure(0, form, threads, 1, dims)
        for t in lengths:
            seconds, peak = measure(t, form, threads, repeats, dims)
            grow = max(peak - base, 0)
            rows.append(dict(form=form, length=t, seconds=seconds, peak_rss_growth_bytes=grow,
                             us_per_token=seconds / t * 1e6, bytes_per_token=grow / t))
    return {"threads": threads, "dims": dims, "rows": rows,
            "max_rss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def scaling_lines(result: dict) -> list[str]:
    """The result as a plain-text table and the time ratio of the longest to the shortest length."""
    rows = result["rows"]
    lines = [f"{'form':8} {'T':>6} {'fwd+bwd s':>10} {'µs/token':>9} {'peak MB':>8} {'KB/token':>9}"]
    for r in rows:
        lines.append(f"{r['form']:8} {r['length']:6d} {r['seconds']:10.4f} {r['us_per_token']:9.2f} "
                     f"{r['peak_rss_growth_bytes'] / 2**20:8.1f} {r['bytes_per_token'] / 1024:9.2f}")
    for form in ("t2r", "softmax"):
        sel = [r for r in rows if r["form"] == form]
        lines.append(f"{form}: time ratio T={sel[-1]['length']} / T={sel[0]['length']}: "
                     f"{sel[-1]['seconds'] / sel[0]['seconds']:.1f}x for {sel[-1]['length'] / sel[0]['length']:.0f}x "
                     "tokens")
    return lines
