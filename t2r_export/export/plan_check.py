"""Export-time check of a reduced-precision bundle (fp16, fp16-all, int8) against the fp32 torch model.

Teacher-forced over real text (the calibration prompts, or text the user gives): the bundle's step
graph in ONNX Runtime, one token at a time from a zero state, against one fp32 torch forward over
the same tokens. Figures, each held to its entry in ``tolerances.py`` (docs/design.md#precision-plan):

- top-1 agreement: how often both pick the same next token (at least the goal);
- perplexity delta: the relative increase of the bundle's perplexity on the text's next tokens;
- max |logit diff| relative to max(1, max |fp32 logits|), step graph and prefill graph;
- greedy tokens: whether a short greedy continuation matches the fp32 model's (reported, not held:
  a quantized plan may pick another token where two are nearly tied).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .. import contract
from ..tolerances import MIN_AGREEMENT, TOLERANCES

logger = logging.getLogger(__name__)

MAX_TOKENS_PER_TEXT = 128
MAX_TOKENS = 1024
GREEDY_STEPS = 16


def encode_texts(tokenizer_json: Path, texts: list[str], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """Token rows of at least two tokens, each cut to MAX_TOKENS_PER_TEXT, ``max_tokens`` in all."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    rows, total = [], 0
    for text in texts:
        ids = tokenizer.encode(text).ids[:MAX_TOKENS_PER_TEXT]
        if len(ids) < 2 or total >= max_tokens:
            continue
        rows.append(ids[: max_tokens - total])
        total += len(rows[-1])
    if not rows:
        raise ValueError("no verification text has two tokens or more")
    return rows


def plan_session(path: Path, precision: str = "fp32", threads: int = 0):
    """An ONNX Runtime CPU session on a bundle graph that computes what the graph says, for the checks."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if precision in contract.QDQ_WEIGHT_PRECISIONS:
        # ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits, by default with int8
        # activations; level 1 keeps them fp32, the graph's own math (what TensorRT runs)
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


class _Chain:
    """The step graph with its state fed back, from a zero state of the bundle's state dtype."""

    def __init__(self, session, config: contract.RuntimeConfig):
        self.session, self.config = session, config
        self.pairs = contract.state_pairs(config.num_layers, config.state_shape.parts)
        specs, _ = config.graph_specs(contract.STEP)
        self.zero = {s.name: np.zeros((1, *s.shape[1:]), s.dtype) for s in specs if contract.is_state(s.name)}
        self.outputs = ["logits"] + [present for _, present in self.pairs]

    def run(self, ids: list[int], start: int = 0, state: dict | None = None) -> tuple[np.ndarray, dict]:
        state = dict(state or self.zero)
        logits = []
        for t, token in enumerate(ids):
            feed = {"input_ids": np.array([[token]], np.int64), "position_ids": np.array([[start + t]], np.int64)}
            values = self.session.run(self.outputs, {**feed, **state})
            logits.append(values[0][0])
            state = {past: v for (past, _), v in zip(self.pairs, values[1:])}
        return np.stack(logits), state


def verify_plan(model, bundle_dir: Path, config: contract.RuntimeConfig, texts: list[str],
                reference: str = "fp32 torch model") -> contract.VerificationRecord:
    """Every figure of a reduced-precision bundle in ``bundle_dir`` against the fp32 ``model``."""
    precision = config.precision
    rows = encode_texts(Path(bundle_dir) / contract.TOKENIZER_JSON, texts)
    chain = _Chain(plan_session(Path(bundle_dir) / config.graphs[contract.STEP].file, precision), config)
    prefill = plan_session(Path(bundle_dir) / config.graphs[contract.PREFILL].file, precision)
    agree = total = 0
    nll_ref = nll_got = 0.0
    step_err = prefill_err = 0.0
    for ids in rows:
        with torch.no_grad():
            ref = model(torch.tensor([ids]), use_cache=False).logits[0].double().numpy()
        got, _ = chain.run(ids)
        scale = max(1.0, float(np.abs(ref).max()))
        step_err = max(step_err, float(np.abs(got - ref).max()) / scale)
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
        targets = np.array(ids[1:])
        nll_ref -= float(_log_softmax(ref[:-1])[np.arange(len(targets)), targets].sum())
        nll_got -= float(_log_softmax(got[:-1])[np.arange(len(targets)), targets].sum())
        feed = {"input_ids": np.array([ids], np.int64), "position_ids": np.arange(len(ids), dtype=np.int64)[None],
                **chain.zero}
        last = prefill.run(["logits"], feed)[0][0]
        prefill_err = max(prefill_err, float(np.abs(last - ref[-1]).max()) / scale)
    targets_total = total - len(rows)
    ppl_delta = float(np.exp((nll_got - nll_ref) / max(targets_total, 1)) - 1.0)
    greedy = _greedy_identical(model, chain, rows[0][: max(2, len(rows[0]) // 2)])
    key = precision
    figures = (
        _figure("teacher-forced steps: top-1 agreement", agree / total, MIN_AGREEMENT[key], "min"),
        _figure("teacher-forced steps: perplexity delta", ppl_delta, TOLERANCES[("ppl-delta", key)]),
        _figure("teacher-forced steps: logits (relative)", step_err, TOLERANCES[("ort", key)]),
        _figure("prefill: logits (relative)", prefill_err, TOLERANCES[("ort", key)]),
    )
    logger.info("%s check over %d tokens: %s", precision, total,
                ", ".join(f"{f.name} {f.value:.4g}" for f in figures))
    return contract.VerificationRecord(f"{reference}, {total} teacher-forced tokens of {len(rows)} texts",
                                       all(f.passed for f in figures), greedy, figures)


def _figure(name: str, value: float, tolerance: float, bound: str = "max") -> contract.Figure:
    ok = value >= tolerance if bound == "min" else value <= tolerance
    return contract.Figure(name, float(value), float(tolerance), bool(np.isfinite(value) and ok), bound)


def _greedy_identical(model, chain: _Chain, prompt: list[int], steps: int = GREEDY_STEPS) -> bool:
    """Greedy continuation of ``prompt`` by the bundle and by the fp32 model: the same tokens?"""
    logits, state = chain.run(prompt)
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits, state = chain.run([tokens[-1]], start=len(tokens) - 1, state=state)
    with torch.no_grad():
        ref = model(torch.tensor([tokens[:-1]]), use_cache=False).logits[0]
    return ref[len(prompt) - 1:].argmax(-1).tolist() == tokens[len(prompt):]


def failures(record: contract.VerificationRecord) -> str:
    """The failed figures of a record, each with its bound: one line."""
    parts = [f"{f.name} {f.value:.4g} {'<' if f.bound == 'min' else '>'} {f.tolerance:.4g}"
             for f in record.figures if not f.passed]
    return "; ".join(parts) or "every figure passed"
