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

from .. import contract
from ..models import decode_step, new_state, prefill
from ..tolerances import TOLERANCES, ToleranceError, check_close, max_abs_diff

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


def _state_parts(state, i: int, target: str = "plain") -> dict:
    """Layer i's state tensors by contract part name (s, z, and wk, wv, wm with a window; the ort
    target's sz: s with z as its last column)."""
    if target == "ort":
        s, z = state.layer(i)[:2]
        return {contract.ORT_STATE_PARTS[0].name: torch.cat([s, z.unsqueeze(-1)], dim=-1)}
    return dict(zip([p.name for p in contract.state_parts(state.window)], state.layer(i), strict=True))


def _state_feeds(state, num_layers: int, target: str = "plain") -> dict:
    return {contract.past_name(i, part): tensor.detach().cpu().numpy().astype(np.float32)
            for i in range(num_layers) for part, tensor in _state_parts(state, i, target).items()}


def _run(session, input_ids: np.ndarray, positions: np.ndarray, state_feeds: dict, num_layers: int):
    # the feeds name the state: past_state.{i}.{part} in, present_state.{i}.{part} out
    pairs = [(past, "present_state." + past[len("past_state."):]) for past in state_feeds]
    outputs = ["logits"] + [present for _, present in pairs]
    values = session.run(outputs, {"input_ids": input_ids, "position_ids": positions, **state_feeds})
    next_feeds = {past: v for (past, _), v in zip(pairs, values[1:])}
    return dict(zip(outputs, values)), next_feeds


@dataclass
class TorchReference:
    """What the torch model says, computed before any graph runs, so the model can be freed first.

    ``batches``: per batch size, the step feeds (ids, positions, state before) and torch's logits and
    state after. ``tokens``: greedy tokens from torch's recurrent decode; ``logits``: one parallel
    forward over ``tokens[:-1]``.
    """

    num_layers: int
    target: str = "plain"
    batches: list = field(default_factory=list)
    prompt_len: int = 0
    steps: int = 0
    tokens: list = field(default_factory=list)
    logits: np.ndarray | None = None
    zero: dict = field(default_factory=dict)
    # with a sliding window: a chain whose prompt is longer than the window (it spills into S and z)
    spilled: TorchReference | None = None


def reference_step_batches(model, ref: TorchReference, vocab: int, batches=(1, 3), prompt_len: int = 5,
                           seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, prompt_len + 1), generator=gen)
        state = new_state(model, batch)
        prefill(model, ids[:, :prompt_len], state)
        feeds = _state_feeds(state, ref.num_layers, ref.target)
        pos = torch.full((batch, 1), prompt_len, dtype=torch.long)
        logits = decode_step(model, ids[:, prompt_len:], pos, state)
        after = {contract.present_name(i, part): tensor.numpy().copy()
                 for i in range(ref.num_layers) for part, tensor in _state_parts(state, i, ref.target).items()}
        ref.batches.append((batch, ids[:, prompt_len:].numpy(), pos.numpy(), feeds, logits.numpy(), after))


def reference_chain(model, ref: TorchReference, vocab: int, steps: int = 256, prompt_len: int = 8,
                    seed: int = 1) -> None:
    """Greedy tokens from torch's recurrent decode, then one parallel forward over all of them."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen)
    state = new_state(model, 1)
    ref.zero = _state_feeds(state, ref.num_layers, ref.target)
    with torch.no_grad():
        logits = prefill(model, prompt, state)
        tokens = prompt[0].tolist()
        for t in range(prompt_len, prompt_len + steps):
            tokens.append(int(logits.reshape(-1, logits.shape[-1])[-1].argmax()))
            if t < prompt_len + steps - 1:
                logits = decode_step(model, torch.tensor([[tokens[-1]]]), torch.tensor([[t]]), state)
        ref.logits = model(torch.tensor([tokens[:-1]]), use_cache=False).logits[0].numpy()
    ref.tokens, ref.prompt_len, ref.steps = tokens, prompt_len, steps


def torch_reference(model, num_layers: int, vocab: int, chained_steps: int = 256,
                    target: str = "plain") -> TorchReference:
    model.eval()
    ref = TorchReference(num_layers, target)
    logger.info("verifying: the step graph at batch 1 and 3 against torch")
    reference_step_batches(model, ref, vocab)
    logger.info("verifying: %d chained greedy steps and the prefill graph against torch", chained_steps)
    reference_chain(model, ref, vocab, steps=chained_steps)
    window = new_state(model, 1).window
    if window:
        # the same from a state whose window is full and has spilled into S and z: a step that
        # evicts, and a prompt longer than the window through the prefill graph
        logger.info("verifying: a step and a prefill past the %d-token window against torch", window)
        reference_step_batches(model, ref, vocab, batches=(2,), prompt_len=window + 5)
        ref.spilled = TorchReference(num_layers)
        reference_chain(model, ref.spilled, vocab, steps=min(chained_steps, 32), prompt_len=window + 8)
    return ref


def check_step_batches(ref: TorchReference, step, report: VerificationReport) -> None:
    for batch, ids, pos, feeds, logits, after in ref.batches:
        got, _ = _run(step, ids, pos, feeds, ref.num_layers)
        check = f"step batch {batch}"
        report.add(check, "logits", check_close(f"{check}: logits", got["logits"], logits, ("ort", "fp32")))
        for name, expected in after.items():
            err = check_close(f"{check}: {name}", got[name], expected, ("ort-state", "fp32"), relative=True)
            report.add(check, name, err, ("ort-state", "fp32"), max(1.0, float(np.abs(expected).max())))


def _check_rows(name: str, got: np.ndarray, expected: np.ndarray, key, rows: int = 16) -> float:
    """check_close over blocks of rows: the same max error without float64 copies of a [T, V] matrix
    (at a 150k vocabulary those copies alone outweigh a small model)."""
    return max(check_close(name, got[i:i + rows], expected[i:i + rows], key) for i in range(0, len(got), rows))


def _chain_logits(step, tokens: list[int], start: int, stop: int, feeds: dict, n: int, out: np.ndarray) -> None:
    """Step-graph logits for tokens[start:stop] (positions start..stop-1) into the rows of ``out``."""
    for row, t in enumerate(range(start, stop)):
        got, feeds = _run(step, np.array([[tokens[t]]], np.int64), np.array([[t]], np.int64), feeds, n)
        out[row] = got["logits"][0]


def check_chain(ref: TorchReference, step, prefill_graph, report: VerificationReport) -> list[int]:
    """The torch tokens through the graphs (every one by the step graph; the prompt by prefill, then
    steps): logits against the parallel forward, and each greedy choice against torch's."""
    n, p, tokens, total = ref.num_layers, ref.prompt_len, ref.tokens, ref.prompt_len + ref.steps - 1
    logits = np.empty((total, ref.logits.shape[-1]), np.float32)
    _chain_logits(step, tokens, 0, total, dict(ref.zero), n, logits)
    check = f"{ref.steps} chained steps"
    report.add(check, "logits", _check_rows(f"{check}: logits", logits, ref.logits, ("ort", "fp32")))
    greedy_ref, greedy_ort = ref.logits[p - 1:].argmax(-1).tolist(), logits[p - 1:].argmax(-1).tolist()
    report.greedy_identical = greedy_ref == greedy_ort
    if not report.greedy_identical:
        first = next(i for i, (a, b) in enumerate(zip(greedy_ref, greedy_ort)) if a != b)
        raise ToleranceError(f"{check}: greedy tokens differ from torch at generated token {first}")
    got, feeds = _run(prefill_graph, np.array([tokens[:p]], np.int64), np.arange(p, dtype=np.int64)[None],
                      ref.zero, n)
    # the same buffer again: rows from p - 1 on are the prefill-then-steps chain
    logits[p - 1] = got["logits"][0]
    _chain_logits(step, tokens, p, total, feeds, n, logits[p:])
    check = f"prefill {p} + {ref.steps - 1} steps"
    report.add(check, "logits", _check_rows(f"{check}: logits", logits[p - 1:], ref.logits[p - 1:], ("ort", "fp32")))
    return tokens


def verify_step_batches(model, step, num_layers: int, vocab: int, report: VerificationReport,
                        batches=(1, 3), prompt_len: int = 5, seed: int = 0) -> None:
    ref = TorchReference(num_layers)
    reference_step_batches(model, ref, vocab, batches, prompt_len, seed)
    check_step_batches(ref, step, report)


def verify_chained(model, step, prefill_graph, num_layers: int, vocab: int, report: VerificationReport,
                   steps: int = 256, prompt_len: int = 8, seed: int = 1) -> list[int]:
    ref = TorchReference(num_layers)
    reference_chain(model, ref, vocab, steps, prompt_len, seed)
    return check_chain(ref, step, prefill_graph, report)


def check_graphs(ref: TorchReference, step, prefill_graph) -> VerificationReport:
    """Both graphs' ONNX Runtime sessions against ``ref``: every check, one report."""
    report = VerificationReport()
    check_step_batches(ref, step, report)
    check_chain(ref, step, prefill_graph, report)
    if ref.spilled is not None:
        check_chain(ref.spilled, step, prefill_graph, report)
    for check, err in report.worst().items():
        logger.info("verified %s: max |diff| %.2e", check, err)
    return report


def check_bundle_graphs(ref: TorchReference, bundle_dir) -> VerificationReport:
    """The bundle's graphs in ONNX Runtime (weights mapped once, as the runtime does) against ``ref``."""
    from ..runtime.ort_backend import open_sessions

    sessions = open_sessions(bundle_dir, {kind: f"{kind}.onnx" for kind in contract.GRAPH_KINDS})
    return check_graphs(ref, sessions[contract.STEP], sessions[contract.PREFILL])


def verify_bundle_graphs(model, step_path, prefill_path, num_layers: int, vocab: int,
                         chained_steps: int = 256) -> VerificationReport:
    ref = torch_reference(model, num_layers, vocab, chained_steps=chained_steps)
    return check_graphs(ref, ort_session(str(step_path)), ort_session(str(prefill_path)))


__all__ = ["TorchReference", "VerificationReport", "check_bundle_graphs", "torch_reference", "verify_bundle_graphs",
           "max_abs_diff", "ort_session"]
