"""The T2R paper's comparison (Kasai et al. 2021) on the bundled teacher, from our own trainer.

Every training run starts from the same softmax teacher and sees the same number of tokens
(``steps × batch_size × block_size``); the attention-transfer run spends part of its steps on
transfer, so transfer + finetune tokens equal the others' finetune tokens. Runs, in order:

- ``teacher``: the softmax model itself (reference, no training);
- ``t2r``, ``elu``, ``rfa``: swap with that feature map, then finetune every weight;
- ``t2r-scratch``: the same T2R architecture with every weight randomly initialised, same budget;
- ``t2r-transfer``: swap, attention transfer, then finetune;
- ``t2r-k8``, ``t2r-k16``, ``t2r-k64`` (with ``t2r`` as k=32): the feature-size sweep;
- ``hedgehog``, ``t2r-window``, ``hedgehog-window`` and each ``...-transfer`` (LoLCATs' stage 1
  first): the quality variants (docs/quality.md); the window rows keep the last ``window`` keys
  exact. Hedgehog's k = 32 gives 64 features (softmax over ±Wx), so its S and z are twice T2R's;
- ``t2r-distill``, ``hedgehog-window-decay``, ``hedgehog-window-decay-distill``: the window's
  linear part forgetting (``--decay``), and finetuning on KL to the teacher (``--distill``).

All are scored on one fixed token stream: the first ``test_tokens`` of the stdlib test split,
made with the teacher's tokenizer. ``run_paper_experiment`` runs them sequentially, records each
finished run in ``OUT/partial.json`` (a rerun skips those) and rewrites ``OUT/results.json`` and
``OUT/results.md`` atomically after every run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from t2r_export.atomic import atomic_write_text, check_writable
from t2r_export.data.corpus import stdlib_token_stream
from t2r_export.machine import cpu_model
from t2r_export.data.tokenizer import load_tokenizer
from t2r_export.models import attention_dims, load_causal_lm, swap_summary
from t2r_export.models.swap import attention_modules, check_window
from t2r_export.train.evaluate import perplexity
from t2r_export.train.finetune import FinetuneConfig, bundled_teacher, finetune

logger = logging.getLogger(__name__)

Progress = Callable[[dict], None]
PARTIAL_FILE = "partial.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
MODELS_DIR = "models"


@dataclass(frozen=True)
class Budget:
    # optimizer steps of every training run; the transfer run splits them into transfer + finetune
    steps: int
    transfer_steps: int
    batch_size: int
    block_size: int
    # a fixed prefix of the stdlib test split, the same for every run
    test_tokens: int
    # the validation perplexity the trainer logs at the end (informative; the table uses test)
    valid_tokens: int

    @property
    def tokens_per_run(self) -> int:
        return self.steps * self.batch_size * self.block_size


BUDGETS = {
    # minutes in all on 2 busy CPU cores: a smoke run of the whole table, not a result
    "quick": Budget(steps=24, transfer_steps=6, batch_size=4, block_size=256, test_tokens=65_536, valid_tokens=8_192),
    # half the full budget (5% of the teacher's pretraining tokens)
    "medium": Budget(steps=55, transfer_steps=15, batch_size=8, block_size=256, test_tokens=200_000,
                     valid_tokens=16_384),
    # 225,280 tokens per run = 10% of the teacher's 2.25M pretraining tokens; ~1-1.5 h on 2 cores.
    # 30 transfer steps: what moved the transfer MSE at all in trials (0.54 -> 0.48), not more
    "full": Budget(steps=110, transfer_steps=30, batch_size=8, block_size=256, test_tokens=200_000,
                   valid_tokens=32_768),
}


@dataclass(frozen=True)
class RunSpec:
    name: str
    # teacher | swap | scratch | transfer (the keys of RUN_KINDS)
    kind: str
    feature_map: str = "t2r"
    feature_dim: int = 32
    # True: the sliding-window hybrid with the experiment's ``window``
    windowed: bool = False
    # the window's linear part forgets (a learned gamma per KV head)
    decay: bool = False
    # finetune on KL to the teacher's next-token distribution instead of the observed token
    distill: bool = False


PAPER_RUNS = (
    RunSpec("teacher", "teacher", "softmax"),
    RunSpec("t2r", "swap"),
    RunSpec("elu", "swap", "elu"),
    RunSpec("rfa", "swap", "rfa"),
    RunSpec("t2r-scratch", "scratch"),
    RunSpec("t2r-transfer", "transfer"),
    RunSpec("t2r-k8", "swap", feature_dim=8),
    RunSpec("t2r-k16", "swap", feature_dim=16),
    RunSpec("t2r-k64", "swap", feature_dim=64),
    RunSpec("hedgehog", "swap", "hedgehog"),
    RunSpec("hedgehog-transfer", "transfer", "hedgehog"),
    RunSpec("t2r-window", "swap", windowed=True),
    RunSpec("t2r-window-transfer", "transfer", windowed=True),
    RunSpec("hedgehog-window", "swap", "hedgehog", windowed=True),
    RunSpec("hedgehog-window-transfer", "transfer", "hedgehog", windowed=True),
    RunSpec("t2r-distill", "swap", distill=True),
    RunSpec("hedgehog-window-decay", "swap", "hedgehog", windowed=True, decay=True),
    RunSpec("hedgehog-window-decay-distill", "swap", "hedgehog", windowed=True, decay=True, distill=True),
)


@dataclass
class ExperimentConfig:
    out_dir: Path = Path("runs/experiment-paper")
    budget_name: str = "full"
    budget: Budget = BUDGETS["full"]
    # None = the bundled softmax teacher
    teacher: Path | None = None
    # peak lr of every run that starts from the teacher: at ~100 steps 1e-3 recovered more than
    # the finetune default 5e-4 in trials; one value for all feature maps keeps the comparison fair
    lr: float = 1e-3
    # random weights need a pretraining lr, not a finetuning one: the teacher's own peak lr
    scratch_lr: float = 2e-3
    # phi alone, from a random start, against a smooth MSE target (the finetune default)
    transfer_lr: float = 1e-2
    # one seed for every run: same swap seeds, same batches in the same order
    seed: int = 0
    # the window rows' W: LoLCATs' 64, a quarter of the teacher's 256-token context
    window: int = 64
    # None = every run of PAPER_RUNS; the teacher always runs (every ratio needs it)
    runs: tuple[str, ...] | None = None
    # model directories are deleted after evaluation unless kept
    keep_models: bool = False
    # the teacher's decode state is its KV cache, which grows with the context: priced at this length
    kv_context: int = 2048
    num_threads: int | None = None
    eval_batch_size: int = 8
    # None = every stdlib file of a split; small values make test runs take seconds
    max_files: int | None = None
    cache_dir: Path | None = None


@dataclass
class RunContext:
    cfg: ExperimentConfig
    teacher: Path
    test_stream: np.ndarray
    models_dir: Path
    command: str
    progress: Progress | None


def check_experiment_config(cfg: ExperimentConfig) -> list[RunSpec]:
    """One ``ValueError`` line for settings that cannot work; returns the runs to do, in order."""
    b = cfg.budget
    for name in ("steps", "batch_size", "block_size", "valid_tokens"):
        if getattr(b, name) <= 0:
            raise ValueError(f"{name.replace('_', ' ')} must be a positive integer, got {getattr(b, name)}")
    if b.test_tokens < 2:
        raise ValueError(f"test tokens must be at least 2, got {b.test_tokens}")
    names = [spec.name for spec in PAPER_RUNS]
    wanted = set(cfg.runs or names) | {"teacher"}
    unknown = sorted(wanted - set(names))
    if unknown:
        raise ValueError(f"unknown run(s) {', '.join(unknown)}; expected some of {', '.join(names)}")
    specs = [spec for spec in PAPER_RUNS if spec.name in wanted]
    if any(s.kind == "transfer" for s in specs) and not 0 < b.transfer_steps < b.steps:
        raise ValueError(f"transfer steps must be between 1 and steps - 1 ({b.steps - 1}), got {b.transfer_steps}")
    if min(cfg.lr, cfg.scratch_lr, cfg.transfer_lr) <= 0:
        raise ValueError("learning rates must be > 0")
    if any(s.windowed for s in specs) and cfg.window <= 0:
        raise ValueError(f"window must be a positive integer for the window runs, got {cfg.window}")
    if cfg.kv_context <= 0:
        raise ValueError(f"kv context must be a positive integer, got {cfg.kv_context}")
    teacher = Path(cfg.teacher) if cfg.teacher is not None else bundled_teacher()
    if not (teacher / "config.json").is_file():
        raise ValueError(f"teacher {teacher} is not a model directory (no config.json)")
    if any(s.windowed for s in specs):
        from transformers import AutoConfig

        check_window(AutoConfig.from_pretrained(teacher), cfg.window)
    check_writable(Path(cfg.out_dir))
    return specs


# --- one function per run kind ----------------------------------------------------------------

def run_teacher(spec: RunSpec, ctx: RunContext) -> dict:
    """The softmax teacher on the test tokens; its decode state is the KV cache at ``kv_context``."""
    start = clock()
    model = load_causal_lm(ctx.teacher)
    score = evaluate_test(model, ctx)
    _, kv_heads, head_dim = attention_dims(model.config)
    # keys and values, every layer, fp32
    per_token = 2 * len(attention_modules(model)) * kv_heads * head_dim * 4
    return run_record(spec, score, start, feature_dim=None, init="pretrained", lr=None, tokens=(0, 0),
                      parameters=sum(p.numel() for p in model.parameters()),
                      state_bytes=per_token * ctx.cfg.kv_context,
                      state_note=f"KV cache, fp32, at {ctx.cfg.kv_context} tokens ({per_token:,} bytes per token)")


def run_swap_finetune(spec: RunSpec, ctx: RunContext) -> dict:
    """Swap the teacher's attention for ``spec.feature_map``, finetune every weight for the whole budget."""
    return finetune_and_evaluate(spec, ctx, ctx.teacher, transfer_steps=0, lr=ctx.cfg.lr, init="pretrained")


def run_attention_transfer(spec: RunSpec, ctx: RunContext) -> dict:
    """Swap, ``transfer_steps`` of attention transfer, then finetune for the rest of the budget."""
    return finetune_and_evaluate(spec, ctx, ctx.teacher, transfer_steps=ctx.cfg.budget.transfer_steps,
                                 lr=ctx.cfg.lr, init="pretrained")


def run_scratch(spec: RunSpec, ctx: RunContext) -> dict:
    """The teacher's architecture with every weight random, swapped and trained for the same budget."""
    init_dir = ctx.models_dir / f".{spec.name}-init"
    save_random_init(ctx.teacher, init_dir, ctx.cfg.seed)
    try:
        return finetune_and_evaluate(spec, ctx, init_dir, transfer_steps=0, lr=ctx.cfg.scratch_lr, init="scratch")
    finally:
        shutil.rmtree(init_dir, ignore_errors=True)


RUN_KINDS = {"teacher": run_teacher, "swap": run_swap_finetune, "transfer": run_attention_transfer,
             "scratch": run_scratch}


def save_random_init(teacher: Path, out: Path, seed: int) -> None:
    """A softmax model with the teacher's config and tokenizer but freshly initialised weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(teacher, trust_remote_code=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(teacher).save_pretrained(out)


def finetune_and_evaluate(spec: RunSpec, ctx: RunContext, source: Path, transfer_steps: int, lr: float,
                          init: str) -> dict:
    start = clock()
    cfg, budget = ctx.cfg, ctx.cfg.budget
    out = ctx.models_dir / spec.name
    # a run killed midway leaves its directory; its result is not recorded, so it starts over
    shutil.rmtree(out, ignore_errors=True)
    relay = None if ctx.progress is None else (lambda event: ctx.progress({**event, "run": spec.name}))
    record = finetune(FinetuneConfig(
        model=source, out_dir=out, steps=budget.steps - transfer_steps, attention_transfer_steps=transfer_steps,
        lr=lr, attention_transfer_lr=cfg.transfer_lr, batch_size=budget.batch_size, block_size=budget.block_size,
        feature_map=spec.feature_map, feature_dim=spec.feature_dim, window=cfg.window if spec.windowed else 0,
        decay=spec.decay, distill=spec.distill, seed=cfg.seed, save_every=0, eval_every=0,
        eval_max_tokens=budget.valid_tokens, eval_batch_size=cfg.eval_batch_size, num_threads=cfg.num_threads,
        max_files=cfg.max_files, cache_dir=cfg.cache_dir), progress=relay, command=ctx.command)
    model = load_causal_lm(out)
    score = evaluate_test(model, ctx)
    summary = swap_summary(model)
    if not cfg.keep_models:
        shutil.rmtree(out, ignore_errors=True)
    tokens = (record["tokens_seen"]["transfer"], record["tokens_seen"]["finetune"])
    return run_record(spec, score, start, feature_dim=summary["feature_dim"], init=init, lr=lr, tokens=tokens,
                      parameters=summary["parameters_total"], state_bytes=summary["state_bytes_per_sequence"],
                      state_note=("S, z and the window's keys and values, fp32, any context length"
                                  if summary["window"] else "S and z, fp32, any context length"),
                      window=summary["window"],
                      train_time_s=record["wall_time_s"], valid_perplexity=record["final_valid_perplexity"],
                      final_train_loss=record["losses"]["finetune"][-1])


def evaluate_test(model, ctx: RunContext) -> dict:
    relay = None if ctx.progress is None else (lambda event: ctx.progress({**event, "phase": "test"}))
    budget = ctx.cfg.budget
    return perplexity(model, ctx.test_stream, budget.block_size, ctx.cfg.eval_batch_size, None, relay)


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds: on a shared machine the two differ, and the CPU time is the comparable one."""
    return time.perf_counter(), time.process_time()


def run_record(spec: RunSpec, score: dict, start: tuple[float, float], *, feature_dim: int | None, init: str,
               lr: float | None, tokens: tuple[int, int], parameters: int, state_bytes: int, state_note: str,
               **extra) -> dict:
    return {"run": spec.name, "kind": spec.kind, "feature_map": spec.feature_map, "feature_dim": feature_dim,
            "init": init, "lr": lr, "transfer_tokens": tokens[0], "finetune_tokens": tokens[1],
            "total_tokens": sum(tokens), "test_loss": score["loss"], "test_perplexity": score["perplexity"],
            "test_tokens": score["tokens"], "parameters": parameters, "state_bytes_per_sequence": state_bytes,
            "state_note": state_note, **extra, "wall_time_s": round(time.perf_counter() - start[0], 1),
            "cpu_time_s": round(time.process_time() - start[1], 1)}


# --- the runner -------------------------------------------------------------------------------

def plan_record(cfg: ExperimentConfig, teacher: Path) -> dict:
    """What makes results comparable: a partial.json from another plan must not be mixed in."""
    return {"experiment": "paper", "teacher": str(teacher.resolve()), "budget_name": cfg.budget_name,
            "budget": dataclasses.asdict(cfg.budget), "lr": cfg.lr, "scratch_lr": cfg.scratch_lr,
            "transfer_lr": cfg.transfer_lr, "seed": cfg.seed, "window": cfg.window, "kv_context": cfg.kv_context,
            "eval_batch_size": cfg.eval_batch_size, "max_files": cfg.max_files}


def read_partial(out_dir: Path, plan: dict) -> dict:
    path = out_dir / PARTIAL_FILE
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ValueError(f"{path} is not valid JSON; delete it to start the experiment over") from None
    if saved.get("plan") != plan:
        changed = sorted(k for k in plan if saved.get("plan", {}).get(k) != plan[k])
        raise ValueError(f"{path} holds runs of a different plan (changed: {', '.join(changed)}); "
                         "choose another --out or delete it to start over")
    return saved.get("runs", {})


def run_paper_experiment(cfg: ExperimentConfig, progress: Progress | None = None, command: str = "") -> dict:
    """Run (or resume) every run of the plan; returns the results written to ``OUT/results.json``.

    ``progress`` gets ``{"phase": "run" | "skip" | "done", "run", "index", "total"}`` around each
    run, the trainer's events with a ``run`` key, and ``{"phase": "test", "tokens", "total"}``.
    Bad input raises ``ValueError`` before any run starts.
    """
    specs = check_experiment_config(cfg)
    out_dir = Path(cfg.out_dir)
    teacher = Path(cfg.teacher) if cfg.teacher is not None else bundled_teacher()
    plan = plan_record(cfg, teacher)
    done = read_partial(out_dir, plan)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    tokenizer = load_tokenizer(teacher)
    test_stream = stdlib_token_stream(tokenizer, "test", cfg.cache_dir, cfg.max_files)[: cfg.budget.test_tokens]
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(cfg, teacher, test_stream, out_dir / MODELS_DIR, command, progress)
    machine = machine_record(cfg.num_threads)
    for index, spec in enumerate(specs):
        event = {"run": spec.name, "index": index, "total": len(specs)}
        if spec.name in done:
            _notify(progress, {"phase": "skip", **event})
            continue
        _notify(progress, {"phase": "run", **event})
        logger.info("run %d/%d: %s", index + 1, len(specs), spec.name)
        torch.manual_seed(cfg.seed)
        # resumed or extended experiments mix invocations: each run keeps its own command
        done[spec.name] = {**RUN_KINDS[spec.kind](spec, ctx), "command": command}
        atomic_write_text(out_dir / PARTIAL_FILE, json.dumps({"plan": plan, "runs": done}, indent=2) + "\n")
        write_results(out_dir, plan, done, command, machine)
        _notify(progress, {"phase": "done", **event, "record": done[spec.name]})
    return write_results(out_dir, plan, done, command, machine)


def _notify(progress: Progress | None, event: dict) -> None:
    if progress is not None:
        progress(event)


def machine_record(num_threads: int | None) -> dict:
    import transformers

    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": num_threads or torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


# --- the table --------------------------------------------------------------------------------

def results_rows(done: dict) -> list[dict]:
    """Every finished run of the plan (earlier --runs subsets included), in PAPER_RUNS order, each
    with its perplexity ratio to the measured teacher."""
    teacher_ppl = done["teacher"]["test_perplexity"] if "teacher" in done else None
    rows = []
    for spec in PAPER_RUNS:
        if spec.name in done:
            row = dict(done[spec.name])
            row["ratio_to_teacher"] = None if teacher_ppl is None else row["test_perplexity"] / teacher_ppl
            rows.append(row)
    return rows


# (claim, better run, worse run): the paper's expectations, checked on the measured perplexities
EXPECTATIONS = (
    ("pretrained T2R beats ELU at equal budget", "t2r", "elu"),
    ("pretrained T2R beats random features (RFA) at equal budget", "t2r", "rfa"),
    ("pretrained T2R beats T2R trained from scratch", "t2r", "t2r-scratch"),
)


def expectation_checks(rows: list[dict]) -> list[dict]:
    ppl = {row["run"]: row["test_perplexity"] for row in rows}
    return [{"claim": claim, "better": a, "worse": b, "holds": ppl[a] < ppl[b]}
            for claim, a, b in EXPECTATIONS if a in ppl and b in ppl]


def write_results(out_dir: Path, plan: dict, done: dict, command: str, machine: dict) -> dict:
    """results.json and results.md from every run in partial.json; complete once all of PAPER_RUNS are."""
    rows = results_rows(done)
    results = {"experiment": "paper", "complete": len(rows) == len(PAPER_RUNS), "command": command, "machine": machine,
               "plan": plan, "rows": rows, "expectations": expectation_checks(rows)}
    atomic_write_text(out_dir / RESULTS_JSON, json.dumps(results, indent=2) + "\n")
    atomic_write_text(out_dir / RESULTS_MD, render_markdown(results))
    return results


def _fmt(value, spec: str = ",") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _command_lines(results: dict) -> list[str]:
    """The command, or every command when --runs subsets filled the table in several invocations."""
    commands = list(dict.fromkeys(row.get("command") or results["command"] for row in results["rows"]))
    if len(commands) <= 1:
        return [f"- command: `{commands[0] if commands else results['command']}`"]
    return ["- commands (one invocation per `--runs` subset; each run's own is in results.json):",
            *[f"  - `{c}`" for c in commands]]


def render_markdown(results: dict) -> str:
    plan, budget, machine = results["plan"], results["plan"]["budget"], results["machine"]
    tokens = budget["steps"] * budget["batch_size"] * budget["block_size"]
    lines = [
        f"# T2R paper comparison: {plan['budget_name']} budget" + ("" if results["complete"] else " (incomplete)"),
        "",
        *_command_lines(results),
        (f"- machine: {machine['cpu']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} torch thread(s); "
         f"Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}"),
        f"- teacher: `{plan['teacher']}`",
        (f"- budget per training run: {budget['steps']} steps x {budget['batch_size']} blocks x "
         f"{budget['block_size']} tokens = {tokens:,} tokens; `t2r-transfer` spends {budget['transfer_steps']} "
         f"of its steps on attention transfer (lr {plan['transfer_lr']:g}); finetune lr {plan['lr']:g} from the "
         f"teacher, {plan['scratch_lr']:g} from scratch; seed {plan['seed']}"),
        (f"- test: the first {budget['test_tokens']:,} tokens of the stdlib test split (teacher tokenizer), "
         f"blocks of {budget['block_size']}; ratio = test perplexity / the teacher's, both measured here"),
        (f"- decode state: T2R keeps S and z (fp32) whatever the context, the window rows also the last "
         f"{plan.get('window', 0)} keys and values; the teacher's KV cache (fp32) is priced at "
         f"{plan['kv_context']:,} tokens of context"),
        ("- times: wall and CPU seconds of each whole run (load, swap, train, validate, save, test); on a "
         "shared machine the CPU time is the comparable one"),
        "",
        ("| run | feature map | feature dim | init | transfer tokens | finetune tokens | test ppl | ratio | "
         "wall (s) | CPU (s) | decode state (bytes/seq) |"),
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        lines.append(f"| {row['run']} | {row['feature_map']} | {_fmt(row['feature_dim'])} | {row['init']} | "
                     f"{row['transfer_tokens']:,} | {row['finetune_tokens']:,} | {row['test_perplexity']:.2f} | "
                     f"{_fmt(row['ratio_to_teacher'], '.3f')} | {row['wall_time_s']:.0f} | "
                     f"{_fmt(row.get('cpu_time_s'), '.0f')} | "
                     f"{row['state_bytes_per_sequence']:,} |")
    sweep = sorted((r for r in results["rows"] if r["kind"] == "swap" and r["feature_map"] == "t2r"
                    and not r.get("window")),
                   key=lambda r: r["feature_dim"])
    if len(sweep) > 1:
        lines += ["", "Feature size (pretrained `t2r`, swap + finetune; `t2r` is k = 32):", "",
                  "| k | test ppl | ratio | decode state (bytes/seq) |", "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['feature_dim']} | {r['test_perplexity']:.2f} | {_fmt(r['ratio_to_teacher'], '.3f')} | "
                  f"{r['state_bytes_per_sequence']:,} |" for r in sweep]
    if results["expectations"]:
        lines += ["", "The paper's expectations, on these numbers:", ""]
        lines += [f"- {c['claim']}: {'holds' if c['holds'] else 'does NOT hold'}" for c in results["expectations"]]
    return "\n".join(lines) + "\n"
