"""Evidence for the precision plans (docs/design.md#precision-plan, #verification rung 5), measured with
ONNX Runtime on the CPU.

    t2r-export bench precision [BUNDLE_OR_MODEL] [--steps 4096] [--long-steps 65536] [--json OUT]

BUNDLE_OR_MODEL is a T2R model directory (default: the bundled T2R teacher), exported here to fp32,
fp16, fp16-all and int8 graphs, or an fp32 bundle (give ``--fp16``/``--fp16-all`` bundles beside it;
the int8 one is calibrated from it). Three experiments, every row of the batch a different stretch
of the stdlib test split (or the calibration prompts when the corpus is unavailable):

(a) overflow: the all-fp16 variant (state and denominator in fp16) against the fp16 plan over a
    long teacher-forced decode, real tokens fed cyclically, positions increasing: the step where it
    first produces inf/NaN, where its state drifts more than 10% from the plan's fp32 state (fp16
    rounds a large sum's increments away, so sums stall), where its greedy choice stops agreeing
    with the plan (rolling window below 50%), and max |state| then; the plan must stay finite.
(b) fp16 plan (and fp16-all) vs fp32 over ``--steps`` chained steps, teacher-forced, and the plan
    free-running greedy (fp32 fed the plan's own tokens): top-1 agreement, max and mean |logit diff|.
(c) int8 vs fp32 on the same teacher-forced tokens: top-1 agreement and perplexity delta (%).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .. import contract
from ..tolerances import MIN_AGREEMENT, TOLERANCES

# the goals of tolerances.py, in percent: the fp16 plan's top-1 agreement with fp32, int8's perplexity delta
PLAN_AGREEMENT_GOAL = 100.0 * MIN_AGREEMENT["fp16"]
PPL_DELTA_GOAL = 100.0 * TOLERANCES[("ppl-delta", "int8")]


class StepChain:
    """One step graph on ONNX Runtime (CPU) with its state fed back each call; state dtype from the graph."""

    def __init__(self, path: Path, batch: int, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.pasts = {i.name: i for i in self.session.get_inputs() if i.name.startswith("past_state.")}
        self.presents = [name.replace("past_state.", "present_state.") for name in self.pasts]
        self.batch = batch
        self.reset()

    def reset(self) -> None:
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.state = {name: np.zeros((self.batch, *i.shape[1:]), dtypes[i.type]) for name, i in self.pasts.items()}

    def step(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        feed = {"input_ids": ids.reshape(-1, 1).astype(np.int64),
                "position_ids": positions.reshape(-1, 1).astype(np.int64), **self.state}
        values = dict(zip(self.outputs, self.session.run(None, feed)))
        self.state = {past: values[present] for past, present in zip(self.pasts, self.presents)}
        return values["logits"]

    def state_max(self) -> float:
        return max(float(np.max(np.abs(v.astype(np.float32)))) for v in self.state.values())

    def state_finite(self) -> bool:
        return all(np.isfinite(v).all() for v in self.state.values())


@dataclass
class Comparison:
    """Running agreement and logit error of one variant against a reference."""

    agree: int = 0
    total: int = 0
    max_err: float = 0.0
    sum_err: float = 0.0
    count: int = 0
    nll: float = 0.0
    nonfinite_step: int | None = None
    details: dict = field(default_factory=dict)

    def add(self, logits: np.ndarray, ref: np.ndarray, step: int, targets: np.ndarray | None = None) -> None:
        if self.nonfinite_step is None and not np.isfinite(logits).all():
            self.nonfinite_step = step
        self.agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        self.total += len(logits)
        diff = np.abs(logits.astype(np.float64) - ref)
        self.max_err = max(self.max_err, float(diff.max()))
        self.sum_err += float(diff.sum())
        self.count += diff.size
        if targets is not None:
            self.nll += float(nll(logits, targets).sum())

    def summary(self) -> dict:
        return {"top1_agreement_pct": 100.0 * self.agree / max(self.total, 1), "max_abs_logit_err": self.max_err,
                "mean_abs_logit_err": self.sum_err / max(self.count, 1), "nonfinite_step": self.nonfinite_step,
                "tokens": self.total, **self.details}


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-row negative log-likelihood of ``targets`` under ``logits`` [B, V] (float64)."""
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - top).sum(-1)) + top[:, 0]
    return lse - x[np.arange(len(x)), targets]


# ---- experiments ---------------------------------------------------------------------------------------

def teacher_forced(chains: dict[str, StepChain], tokens: np.ndarray, reference: str = "fp32",
                   progress=None) -> dict:
    """Every chain over ``tokens`` [B, T+1] in lockstep; agreement, logit error and perplexity per chain."""
    steps = tokens.shape[1] - 1
    results = {name: Comparison() for name in chains}
    for chain in chains.values():
        chain.reset()
    for t in range(steps):
        positions = np.full(len(tokens), t)
        logits = {name: chain.step(tokens[:, t], positions) for name, chain in chains.items()}
        ref = logits[reference].astype(np.float64)
        for name, value in logits.items():
            results[name].add(value, ref, t, targets=tokens[:, t + 1])
        if progress and (t + 1) % 512 == 0:
            progress(f"teacher-forced step {t + 1}/{steps}")
    out = {}
    for name, comparison in results.items():
        summary = comparison.summary()
        summary["perplexity"] = float(np.exp(comparison.nll / max(comparison.total, 1)))
        out[name] = summary
    ref_ppl = out[reference]["perplexity"]
    for summary in out.values():
        summary["perplexity_delta_pct"] = 100.0 * (summary["perplexity"] / ref_ppl - 1.0)
    return out


def free_running(plan: StepChain, reference: StepChain, prompts: np.ndarray, steps: int, progress=None) -> dict:
    """Greedy decoding by the plan after ``prompts`` [B, P]; the reference is fed the plan's tokens."""
    plan.reset()
    reference.reset()
    comparison = Comparison()
    batch, prompt_len = prompts.shape
    for t in range(prompt_len - 1):
        positions = np.full(batch, t)
        plan.step(prompts[:, t], positions)
        reference.step(prompts[:, t], positions)
    token = prompts[:, -1]
    first_divergence = None
    for t in range(prompt_len - 1, prompt_len - 1 + steps):
        positions = np.full(batch, t)
        logits, ref = plan.step(token, positions), reference.step(token, positions)
        if first_divergence is None and (logits.argmax(-1) != ref.argmax(-1)).any():
            first_divergence = t - prompt_len + 1
        comparison.add(logits, ref.astype(np.float64), t)
        token = logits.argmax(-1)
        if progress and (t - prompt_len + 2) % 512 == 0:
            progress(f"free-running step {t - prompt_len + 2}/{steps}")
    comparison.details["first_disagreement_step"] = first_divergence
    return comparison.summary()


def state_error(chain: StepChain, reference: StepChain) -> float:
    """max over state tensors of max |chain - reference| / max(1, max |reference|)."""
    worst = 0.0
    for name, ref in reference.state.items():
        ref32 = ref.astype(np.float32)
        diff = np.abs(chain.state[name].astype(np.float32) - ref32)
        worst = max(worst, float(diff.max()) / max(1.0, float(np.abs(ref32).max())))
    return worst


def overflow_run(plan: StepChain, all_fp16: StepChain, stream: np.ndarray, steps: int, window: int = 256,
                 check_every: int = 16, state_limit: float = 0.1, follow_after: int = 4096, progress=None) -> dict:
    """Long teacher-forced decode, tokens ``stream`` fed cyclically; where the all-fp16 variant breaks.

    The all-fp16 chain breaks in one of three ways, each reported with its first step:
    - ``nonfinite_step``: inf/NaN in its logits or state (overflow past 65504);
    - ``state_diverged_step``: its state is off the plan's fp32 state by more than ``state_limit``
      (relative to the state's size): once a running sum is large, fp16 rounds the per-token
      increments away and the sum stalls below the overflow;
    - ``degraded_step``: its greedy choice agreed with the plan's on fewer than half of the last
      ``window`` steps.
    It is followed until it is non-finite, or for ``follow_after`` steps after it first diverged or
    degraded (it does not recover; the rest of the budget goes to the plan's long run).
    """
    plan.reset()
    all_fp16.reset()
    agree = np.ones(window, bool)
    bad = {"nonfinite_step": None, "max_abs_state_before_nonfinite": None, "plan_max_abs_state_at_that_step": None,
           "state_diverged_step": None, "state_error_when_diverged": None, "degraded_step": None,
           "max_abs_state_when_degraded": None, "rolling_window": window, "state_limit": state_limit}
    plan_nonfinite, plan_max, all_max = None, 0.0, 0.0
    agreed = followed = 0
    last_error = 0.0
    for t in range(steps):
        token, positions = stream[t % len(stream)][None], np.array([t])
        logits = plan.step(token, positions)
        if progress and (t + 1) % 4096 == 0:
            progress(f"long decode step {t + 1}/{steps}")
        if t % check_every == 0 or t == steps - 1:
            plan_max = max(plan_max, plan.state_max())
            if plan_nonfinite is None and not plan.state_finite():
                plan_nonfinite = t
        if plan_nonfinite is None and not np.isfinite(logits).all():
            plan_nonfinite = t
        broke = min((s for s in (bad["state_diverged_step"], bad["degraded_step"]) if s is not None), default=None)
        if bad["nonfinite_step"] is not None or (broke is not None and t - broke >= follow_after):
            continue
        logits_all = all_fp16.step(token, positions)
        followed = t + 1
        if not (np.isfinite(logits_all).all() and all_fp16.state_finite()):
            bad.update(nonfinite_step=t, max_abs_state_before_nonfinite=all_max,
                       plan_max_abs_state_at_that_step=plan.state_max())
            continue
        all_max = all_fp16.state_max()
        same = logits_all.argmax(-1)[0] == logits.argmax(-1)[0]
        agree[t % window] = same
        agreed += int(same)
        if bad["degraded_step"] is None and t >= window and agree.mean() < 0.5:
            bad.update(degraded_step=t, max_abs_state_when_degraded=all_max)
        if t % check_every == 0:
            last_error = state_error(all_fp16, plan)
            if bad["state_diverged_step"] is None and last_error > state_limit:
                bad.update(state_diverged_step=t, state_error_when_diverged=last_error)
    bad.update(followed_steps=followed, top1_agreement_with_plan_pct=100.0 * agreed / max(followed, 1),
               final_state_error=last_error, final_max_abs_state=all_max)
    return {"steps": steps,
            "fp16_plan": {"nonfinite_step": plan_nonfinite, "max_abs_state_seen": plan_max},
            "fp16_all": bad,
            "fp16_max": float(np.finfo(np.float16).max)}


# ---- inputs ----------------------------------------------------------------------------------------------

def prepare_bundles(source: Path | None, work: Path, fp16: Path | None = None, fp16_all: Path | None = None,
                    progress=print) -> dict[str, Path]:
    """fp32 / fp16 / fp16-all / int8 bundle directories for ``source`` (a model or an fp32 bundle)."""
    from ..export.bundle import export_bundle
    from ..export.quantize import export_int8_bundle
    from ..teacher import bundled_model_dir

    source = Path(source) if source else bundled_model_dir("t2r")
    bundles: dict[str, Path] = {}
    if (source / contract.RUNTIME_JSON).is_file():
        bundles["fp32"] = source
        for name, path in (("fp16", fp16), ("fp16-all", fp16_all)):
            if path is not None:
                bundles[name] = Path(path)
    else:
        for precision in ("fp32", "fp16", "fp16-all"):
            progress(f"exporting {precision} graphs of {source}")
            result = export_bundle(source, work / precision, precision=precision, verify=precision == "fp32",
                                   chained_steps=64)
            bundles[precision] = result.out
    progress("calibrating and quantizing the int8 graphs")
    bundles["int8"] = export_int8_bundle(bundles["fp32"], work / "int8").out
    return bundles


def text_tokens(bundle: Path, needed: int) -> tuple[np.ndarray, str]:
    """``needed`` tokens of the stdlib test split (or the calibration prompts, repeated) and where they came from."""
    from ..runtime.bundle import load_bundle

    loaded = load_bundle(bundle)
    tokenizer = loaded.load_tokenizer()
    eos = loaded.config.eos_token_ids[0] if loaded.config.eos_token_ids else 0
    try:
        from ..data.corpus import stdlib_token_stream

        stream = stdlib_token_stream(SimpleNamespace(backend_tokenizer=tokenizer, eos_token_id=eos), "test")
        source = "stdlib test split"
    except (ImportError, ValueError):
        from ..export.quantize import load_prompts

        stream = np.concatenate([np.array(tokenizer.encode(p).ids + [eos]) for p in load_prompts()])
        source = "calibration prompts"
    if len(stream) < needed:
        stream = np.resize(stream, needed)
    return np.asarray(stream[:needed], np.int64), source


# ---- report ----------------------------------------------------------------------------------------------

def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def report_lines(report: dict) -> list[str]:
    """The report as plain text, one entry per line."""
    lines: list[str] = []
    lines.append(f"\nprecision evidence for {report['source']} (ONNX Runtime {report['onnxruntime']}, CPU, "
          f"{report['text']} tokens)")
    tf = report["teacher_forced"]
    lines.append(f"\n(b, c) teacher-forced, {report['rows']} rows x {report['steps']} chained steps, vs fp32:")
    lines.append(f"  {'graph':<9} {'top-1 agree %':>14} {'max |dlogit|':>13} {'mean |dlogit|':>14} {'ppl':>9} "
          f"{'ppl delta %':>12} {'non-finite at':>14}")
    for name, s in tf.items():
        lines.append(f"  {name:<9} {s['top1_agreement_pct']:>14.3f} {s['max_abs_logit_err']:>13.4g} "
              f"{s['mean_abs_logit_err']:>14.4g} {s['perplexity']:>9.4f} {s['perplexity_delta_pct']:>12.3f} "
              f"{_fmt(s['nonfinite_step']):>14}")
    fr = report.get("free_running")
    if fr:
        lines.append(f"\n(b) free-running greedy by the fp16 plan, {fr['tokens']} tokens, fp32 fed the same tokens: "
              f"top-1 agreement {fr['top1_agreement_pct']:.3f}%, max |dlogit| {fr['max_abs_logit_err']:.4g}, "
              f"first disagreement at step {_fmt(fr['first_disagreement_step'])}")
    ov = report.get("overflow")
    if ov:
        plan, bad = ov["fp16_plan"], ov["fp16_all"]
        lines.append(f"\n(a) long decode, {ov['steps']} steps, real tokens fed cyclically (fp16 max {ov['fp16_max']:.0f}):")
        lines.append(f"  fp16 plan: non-finite at {_fmt(plan['nonfinite_step'])}, max |state| {plan['max_abs_state_seen']:.4g}")
        lines.append(f"  fp16-all (followed {bad['followed_steps']} steps): non-finite at {_fmt(bad['nonfinite_step'])} "
              f"(max |state| just before {_fmt(bad['max_abs_state_before_nonfinite'])}, the plan's then "
              f"{_fmt(bad['plan_max_abs_state_at_that_step'])}); state off the plan's by > {bad['state_limit']:.0%} "
              f"from step {_fmt(bad['state_diverged_step'])}; greedy agreement with the plan below 50% "
              f"(window {bad['rolling_window']}) from step {_fmt(bad['degraded_step'])}; overall agreement "
              f"{bad['top1_agreement_with_plan_pct']:.2f}%, last state error {bad['final_state_error']:.3g}, "
              f"last max |state| {bad['final_max_abs_state']:.4g}")
    lines.append("\nverdict:")
    for line in report["verdict"]:
        lines.append(f"  {line}")
    return lines


def verdict(report: dict) -> list[str]:
    lines = []
    tf = report["teacher_forced"]
    fp16 = tf.get("fp16")
    if fp16:
        ok = fp16["top1_agreement_pct"] >= PLAN_AGREEMENT_GOAL
        lines.append(f"{'PASS' if ok else 'FAIL'} fp16 plan top-1 agreement {fp16['top1_agreement_pct']:.3f}% "
                     f"(goal >= {PLAN_AGREEMENT_GOAL}%)")
    ov = report.get("overflow")
    if ov:
        finite = ov["fp16_plan"]["nonfinite_step"] is None
        lines.append(f"{'PASS' if finite else 'FAIL'} fp16 plan finite over {ov['steps']} steps")
        broke = any(ov["fp16_all"][k] is not None for k in ("nonfinite_step", "state_diverged_step", "degraded_step"))
        lines.append(f"{'PASS' if broke else 'FAIL'} fp16-all overflows or degrades within {ov['steps']} steps")
    int8 = tf.get("int8")
    if int8:
        ok = int8["perplexity_delta_pct"] <= PPL_DELTA_GOAL
        lines.append(f"{'PASS' if ok else 'FAIL'} int8 perplexity delta {int8['perplexity_delta_pct']:.3f}% "
                     f"(goal <= {PPL_DELTA_GOAL}%), top-1 agreement {int8['top1_agreement_pct']:.3f}%")
    return lines


def run_precision(source: Path | None = None, steps: int = 4096, rows: int = 4, greedy_steps: int = 1024,
                  long_steps: int = 65536, fp16: Path | None = None, fp16_all: Path | None = None,
                  work: Path | None = None, threads: int = 1, progress=None) -> dict:
    """The three experiments on ``source`` (a T2R model dir or an fp32 bundle; None = the bundled teacher).

    ``work`` keeps the exported bundles (default: a temporary directory); ``progress`` gets one
    message per stage. Returns the report, its ``verdict`` lines included.
    """
    import onnxruntime

    for name, value in (("steps", steps), ("rows", rows)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    progress = progress or (lambda message: None)
    with tempfile.TemporaryDirectory() as scratch:
        work = work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        bundles = prepare_bundles(source, work, fp16, fp16_all, progress)
        step = {name: path / "step.onnx" for name, path in bundles.items()}
        needed = rows * (steps + 1)
        tokens, text = text_tokens(bundles["fp32"], max(needed, 4096))
        batch = tokens[:needed].reshape(rows, steps + 1)
        report: dict = {"source": str(source or "bundled t2r teacher"), "onnxruntime": onnxruntime.__version__,
                        "text": text, "rows": rows, "steps": steps, "bundles": {k: str(v) for k, v in bundles.items()}}
        start = time.perf_counter()
        chains = {name: StepChain(step[name], rows, threads) for name in ("fp32", "fp16", "fp16-all", "int8")
                  if name in step}
        report["teacher_forced"] = teacher_forced(chains, batch, progress=progress)
        if "fp16" in chains and greedy_steps:
            report["free_running"] = free_running(chains["fp16"], chains["fp32"], batch[:, :32], greedy_steps,
                                                  progress=progress)
        if "fp16" in step and "fp16-all" in step and long_steps:
            report["overflow"] = overflow_run(StepChain(step["fp16"], 1, threads),
                                              StepChain(step["fp16-all"], 1, threads), tokens,
                                              long_steps, progress=progress)
        report["seconds"] = time.perf_counter() - start
    report["verdict"] = verdict(report)
    return report
