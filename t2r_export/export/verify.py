"""Export-time verification: the ONNX graphs in ONNX Runtime against the torch model (docs/design.md#verification, rungs 3-4).

1. step graph vs torch decode step at batch 1 and 3 (not the export's shapes), from a non-zero
   state, every output compared by name;
2. N chained steps of the step graph, decoding greedily, vs the torch parallel forward over the
   same tokens: max |logit diff| ≤ the ("ort", "fp32") tolerance and identical greedy tokens;
3. prefill of T tokens then steps vs the parallel forward.
Failures raise ``ToleranceError`` naming the output and its max error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import torch

from ..models import decode_step, new_state, prefill
from ..tolerances import TOLERANCES, ToleranceError, check_close, max_abs_diff
from .. import contract

logger = logging.getLogger(__name__)


@dataclass
class VerificationReport:
    checks: list = field(default_factory=list)     # (check, output name, max |diff|)
    # (check, output group) -> (worst figure, its tolerance); states are relative to their size
    figures: dict = field(default_factory=dict)
    greedy_identical: bool | None = None

    def add(self, check: str, name: str, err: float, key: tuple[str, str] = ("ort", "fp32"),
            scale: float = 1.0) -> None:
        self.checks.append((check, name, err))
        group = "logits" if name == "logits" else "state (relative)" if contract.is_state(name) else name
        worst, _ = self.figures.get((check, group), (0.0, 0.0))
        self.figures[(check, group)] = (max(worst, err / scale), TOLERANCES[key])

    def worst(self) -> dict:
        out: dict = {}
        for check, _, err in self.checks:
            out[check] = max(out.get(check, 0.0), err)
        return out

    def record(self, reference: str = "fp32 torch model") -> contract.VerificationRecord:
        figures = tuple(contract.Figure(f"{check}: {group}", value, tol, bool(value <= tol))
                        for (check, group), (value, tol) in self.figures.items())
        passed = all(f.passed for f in figures) and self.greedy_identical is not False
        return contract.VerificationRecord(reference, passed, self.greedy_identical, figures)


def ort_session(path_or_bytes, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])


def _state_parts(state, i: int) -> dict:
    """Layer i's state tensors by contract part name (s, z, and wk, wv, wm with a window)."""
    return dict(zip([p.name for p in contract.state_parts(state.window)], state.layer(i), strict=True))


def _state_feeds(state, num_layers: int) -> dict:
    return {contract.past_name(i, part): tensor.detach().cpu().numpy().astype(np.float32)
            for i in range(num_layers) for part, tensor in _state_parts(state, i).items()}


def _run(session, input_ids: np.ndarray, positions: np.ndarray, state_feeds: dict, num_layers: int):
    wm = state_feeds.get(contract.past_name(0, "wm"))
    pairs = contract.state_pairs(num_layers, contract.state_parts(0 if wm is None else wm.shape[-1]))
    outputs = ["logits"] + [present for _, present in pairs]
    values = session.run(outputs, {"input_ids": input_ids, "position_ids": positions, **state_feeds})
    next_feeds = {past: v for (past, _), v in zip(pairs, values[1:])}
    return dict(zip(outputs, values)), next_feeds


def verify_step_batches(model, step, num_layers: int, vocab: int, report: VerificationReport,
                        batches=(1, 3), prompt_len: int = 5, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, prompt_len + 1), generator=gen)
        state = new_state(model, batch)
        prefill(model, ids[:, :prompt_len], state)
        feeds = _state_feeds(state, num_layers)
        pos = torch.full((batch, 1), prompt_len, dtype=torch.long)
        expected_logits = decode_step(model, ids[:, prompt_len:], pos, state)
        got, _ = _run(step, ids[:, prompt_len:].numpy(), pos.numpy(), feeds, num_layers)
        check = f"step batch {batch}"
        report.add(check, "logits", check_close(f"{check}: logits", got["logits"], expected_logits.numpy(),
                                                ("ort", "fp32")))
        for i in range(num_layers):
            for part, tensor in _state_parts(state, i).items():
                name = contract.present_name(i, part)
                err = check_close(f"{check}: {name}", got[name], tensor.numpy(), ("ort-state", "fp32"), relative=True)
                report.add(check, name, err, ("ort-state", "fp32"), max(1.0, float(tensor.abs().max())))


def verify_chained(model, step, prefill_graph, num_layers: int, vocab: int, report: VerificationReport,
                   steps: int = 256, prompt_len: int = 8, seed: int = 1) -> list[int]:
    """Greedy decode with the ONNX graphs, then one torch parallel forward over all the tokens."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen).numpy()
    zero = _state_feeds(new_state(model, 1), num_layers)
    # chain A: every token through the step graph; chain B: prompt through prefill, then steps
    tokens = list(prompt[0])
    feeds = dict(zero)
    logits_a = []
    for t in range(prompt_len + steps - 1):
        got, feeds = _run(step, np.array([[tokens[t]]], np.int64), np.array([[t]], np.int64), feeds, num_layers)
        logits_a.append(got["logits"][0])
        if t >= prompt_len - 1:
            tokens.append(int(np.argmax(got["logits"][0])))
    got, feeds_b = _run(prefill_graph, prompt, np.arange(prompt_len, dtype=np.int64)[None], zero, num_layers)
    logits_b = [got["logits"][0]]
    for t in range(prompt_len, prompt_len + steps - 1):
        got, feeds_b = _run(step, np.array([[tokens[t]]], np.int64), np.array([[t]], np.int64), feeds_b,
                            num_layers)
        logits_b.append(got["logits"][0])

    with torch.no_grad():
        ref = model(torch.tensor([tokens[:-1]]), use_cache=False).logits[0].numpy()
    check = f"{steps} chained steps"
    report.add(check, "logits", check_close(f"{check}: logits", np.stack(logits_a), ref, ("ort", "fp32")))
    greedy_ref = ref[prompt_len - 1:].argmax(-1).tolist()
    report.greedy_identical = greedy_ref == tokens[prompt_len:]
    if not report.greedy_identical:
        first = next(i for i, (a, b) in enumerate(zip(greedy_ref, tokens[prompt_len:])) if a != b)
        raise ToleranceError(f"{check}: greedy tokens differ from torch at generated token {first}")
    check = f"prefill {prompt_len} + {steps - 1} steps"
    report.add(check, "logits", check_close(f"{check}: logits", np.stack(logits_b), ref[prompt_len - 1:],
                                            ("ort", "fp32")))
    return tokens


def verify_bundle_graphs(model, step_path, prefill_path, num_layers: int, vocab: int,
                         chained_steps: int = 256) -> VerificationReport:
    model.eval()
    report = VerificationReport()
    step, pre = ort_session(str(step_path)), ort_session(str(prefill_path))
    logger.info("verifying: the step graph at batch 1 and 3 against torch")
    verify_step_batches(model, step, num_layers, vocab, report)
    logger.info("verifying: %d chained greedy steps and the prefill graph against torch", chained_steps)
    verify_chained(model, step, pre, num_layers, vocab, report, steps=chained_steps)
    window = new_state(model, 1).window
    if window:
        # the same from a state whose window is full and has spilled into S and z: a step that
        # evicts, and a prompt longer than the window through the prefill graph
        verify_step_batches(model, step, num_layers, vocab, report, batches=(2,), prompt_len=window + 5)
        verify_chained(model, step, pre, num_layers, vocab, report, steps=min(chained_steps, 32),
                       prompt_len=window + 8)
    for check, err in report.worst().items():
        logger.info("verified %s: max |diff| %.2e", check, err)
    return report


__all__ = ["VerificationReport", "verify_bundle_graphs", "max_abs_diff", "ort_session"]
