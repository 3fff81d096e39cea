"""Finetune a swapped T2R model: optional attention transfer, then next-token training.

One explicit file: setup (model, tokenizer, swap, data) / train (one loop, two stages) /
save_checkpoint / load_checkpoint / save the final model. The same code runs on one CPU,
under ``torchrun --nproc_per_node N`` (gloo on CPU, nccl on GPUs) and under ``accelerate launch``::

    t2r-export finetune --out runs/t2r --steps 500
    torchrun --nproc_per_node 2 -m t2r_export finetune --out runs/t2r --batch-size 4

Stages (docs/design.md#training):
1. ``transfer`` (``attention_transfer_steps`` > 0): only the feature maps train; each layer's
   linear-attention output is pulled towards its softmax output (MSE, LoLCATs stage 1).
   The loss lives in ``t2r_export.train.transfer``.
2. ``finetune`` (``steps``): next-token loss on ``all`` parameters, the ``attention`` modules
   only, or ``lora`` adapters on the attention projections (merged before saving).

A global batch is ``batch_size × world_size × grad_accum`` blocks; every rank takes a disjoint slice
of it, so N processes and one process with the same global batch follow the same loss trajectory.
Checkpoints (``out/checkpoint``) restore model, optimizer, scheduler, RNG and data position, so a
resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as torch_dist

from t2r_export.atomic import check_replaceable, check_writable
from t2r_export.data.corpus import iter_blocks, read_text_files, stdlib_token_stream, tokenize_documents
from t2r_export.models import T2RConfig, is_t2r_model, load_causal_lm, swap_attention
from t2r_export.models.swap import attention_modules
from t2r_export.preflight import check_model_and_tokenizer
from t2r_export.train.checkpoint import (ADAPTER_DIR, CHECKPOINT_DIR, DAMAGED_HINT, STATE_FILE, load_optimizer_state,
                                         read_checkpoint_state, save_checkpoint, save_final, set_rng_state)
from t2r_export.train.distributed import (Distributed, clip_gradients, feature_map_parameters, gather_model_state,
                                          global_mean, gradient_sync, init_distributed, micro_batches, reshard,
                                          shard_fsdp, sync_feature_map_grads, wrap_ddp)
from t2r_export.train.evaluate import perplexity
from t2r_export.train.losses import distillation_loss, next_token_loss
from t2r_export.train.schedule import warmup_cosine
from t2r_export.train.transfer import attention_transfer_loss, freeze_for_transfer, transfer_report

logger = logging.getLogger(__name__)

Progress = Callable[[dict], None]
TRAIN_MODES = ("all", "attention", "lora")
RECORD_FILE = "finetune.json"
# the settings a checkpoint must share with the run resuming it, or the trajectory would change
# (the global batch must match too; how it splits over ranks and micro-steps may change)
RESUME_KEYS = ("steps", "attention_transfer_steps", "train", "lr", "attention_transfer_lr", "block_size", "seed",
               "warmup_fraction", "min_lr_ratio", "weight_decay", "lora_r", "lora_alpha", "data", "dataset")


def bundled_teacher() -> Path:
    from t2r_export.teacher import bundled_model_dir

    return bundled_model_dir("softmax")


@dataclass
class FinetuneConfig:
    # None = the bundled softmax teacher (docs/design.md#bundled-teacher), so a bare run works offline
    model: Path | None = None
    # None = the model folder's own tokenizer; else a tokenizer.json (or a folder holding one)
    tokenizer: Path | None = None
    # outside the package by default, so a casual run never overwrites anything bundled
    out_dir: Path = Path("runs/t2r")
    # None = the stdlib corpus (train/valid splits); else local .txt/.py/.md/.jsonl files or dirs
    data: list[Path] | None = None
    # a Hugging Face `datasets` name ("name" or "name:config", column "text"); needs the package and a hub
    dataset: str | None = None
    # next-token steps: enough to recover most of the swap's loss on the bundled teacher in minutes on CPU
    steps: int = 500
    # 0 = skip; a few hundred steps give phi a softmax-like start before next-token training (LoLCATs)
    attention_transfer_steps: int = 0
    # "all" recovers the most; "attention" and "lora" touch fewer weights (cheaper, less forgetting)
    train: str = "all"
    # a quarter of the teacher's pretraining lr: the weights start trained, only attention changed
    lr: float = 5e-4
    # only phi trains in transfer, from a random start, against a smooth MSE target: a high lr is safe
    # (no warmup; the same cosine decay to min_lr_ratio)
    attention_transfer_lr: float = 1e-2
    # ~5% of the run: Adam's second moments settle before the full lr hits
    warmup_fraction: float = 0.05
    # cosine decays to lr/10, the usual floor
    min_lr_ratio: float = 0.1
    # no decay by default: finetuning for few steps, decaying towards zero would only fight the teacher
    weight_decay: float = 0.0
    # beta2 0.95 rather than 0.999: adapts faster, steadier at high lr (GPT-3, Llama)
    beta1: float = 0.9
    beta2: float = 0.95
    # clipping guards against the loss spikes of a freshly swapped attention
    grad_clip: float = 1.0
    # blocks per rank per micro-step; the global batch is batch_size x world_size x grad_accum
    batch_size: int = 8
    # the teacher's training context: the positions it knows
    block_size: int = 256
    # raise to grow the global batch without more memory
    grad_accum: int = 1
    # T2R swap settings (docs/design.md#feature-maps); ignored when the model is already a T2R model
    feature_map: str = "t2r"
    feature_dim: int = 32
    init: str = "default"
    # 0 = off; W > 0 = LoLCATs' sliding-window + linear hybrid over the last W keys
    window: int = 0
    # with a window: the linear part decays by a learned gamma per KV head (T2RConfig.decay)
    decay: bool = False
    # finetune on KL to the softmax source model's next-token distribution instead of the observed token
    distill: bool = False
    # seeds the swap, the data order and the LoRA init: any fixed value makes runs repeatable
    seed: int = 0
    # LoRA rank 8 / alpha 16 on q, k, v, o: the common peft starting point (LoLCATs uses the same)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # checkpoint often enough to lose little on a crash, rarely enough not to slow the run (0 = never)
    save_every: int = 200
    # validation perplexity every this many steps (0 = only at the end)
    eval_every: int = 200
    # a fixed, capped slice of the valid stream: comparable across evals, a few seconds on CPU
    eval_max_tokens: int = 32768
    eval_batch_size: int = 8
    log_every: int = 10
    # continue from out_dir/checkpoint with the same data order
    resume: bool = False
    # shard parameters, gradients and optimizer state over ranks (FSDP2) for models too big to
    # replicate on each GPU; off = DDP (every rank holds the whole model), simpler and as fast when it fits
    fsdp: bool = False
    # None = torch's default thread count
    num_threads: int | None = None
    # None = every stdlib file of a split; a small number makes test runs take seconds
    max_files: int | None = None
    # None = the package cache root ($T2R_EXPORT_CACHE, else $XDG_CACHE_HOME or ~/.cache, /t2r_export)
    cache_dir: Path | None = None
    trust_remote_code: bool = False


def check_config(cfg: FinetuneConfig) -> None:
    """One clear ``ValueError`` line for settings that cannot work."""
    if cfg.steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {cfg.steps}")
    # the swap settings, checked before any model is loaded
    T2RConfig(feature_map=cfg.feature_map, feature_dim=cfg.feature_dim, init=cfg.init, window=cfg.window,
              decay=cfg.decay)
    if cfg.attention_transfer_steps < 0:
        raise ValueError(f"attention transfer steps must be >= 0, got {cfg.attention_transfer_steps}")
    if cfg.train not in TRAIN_MODES:
        raise ValueError(f"unknown train mode {cfg.train!r}; expected one of {', '.join(TRAIN_MODES)}")
    for name in ("batch_size", "block_size", "grad_accum", "eval_batch_size", "log_every", "lora_r"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name.replace('_', ' ')} must be a positive integer, got {getattr(cfg, name)}")
    for name in ("save_every", "eval_every"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name.replace('_', ' ')} must be >= 0 (0 = never), got {getattr(cfg, name)}")
    if cfg.lr <= 0 or cfg.attention_transfer_lr <= 0:
        raise ValueError(f"learning rates must be > 0, got lr={cfg.lr}, attention transfer lr={cfg.attention_transfer_lr}")
    if not 0 <= cfg.warmup_fraction < 1 or not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"expected 0 <= warmup fraction < 1 and 0 <= min lr ratio <= 1, got "
                         f"{cfg.warmup_fraction}, {cfg.min_lr_ratio}")
    if cfg.data and cfg.dataset:
        raise ValueError("pass either local data files or a datasets name, not both")
    if cfg.fsdp and cfg.train == "lora":
        raise ValueError("FSDP does not support --train lora (adapters are small: use DDP, the default)")
    for path in cfg.data or []:
        if not Path(path).exists():
            raise ValueError(f"data path {path} does not exist: expected a file or directory of .txt/.py/.md/.jsonl")
    if cfg.eval_max_tokens < 2:
        raise ValueError(f"eval max tokens must be at least 2, got {cfg.eval_max_tokens}")
    checkpoint = Path(cfg.out_dir) / CHECKPOINT_DIR
    if cfg.resume and not (checkpoint / STATE_FILE).is_file():
        raise ValueError(f"nothing to resume: no checkpoint at {checkpoint}; run without --resume to start")
    if not cfg.resume and checkpoint.exists():
        raise ValueError(f"{checkpoint} holds an unfinished run; pass --resume to continue it or choose another --out")
    check_output_dir(Path(cfg.out_dir))


def check_output_dir(out: Path) -> None:
    """Before training, not after: the final save replaces ``out``, which only a folder of ours may be."""
    check_writable(out, "output directory")
    check_replaceable(out, overwrite=True)


# --- setup ------------------------------------------------------------------------------------

def load_teacher(source: Path, cfg: FinetuneConfig, dist: Distributed):
    """The softmax source model, frozen, for ``--distill``; one clear error when the source is a T2R model."""
    teacher = load_causal_lm(source, trust_remote_code=cfg.trust_remote_code)
    if is_t2r_model(teacher):
        raise ValueError(f"--distill needs a softmax teacher, but {source} is already a T2R model")
    teacher.requires_grad_(False)
    return teacher.eval().to(dist.device)


def load_model_and_tokenizer(path: Path, cfg: FinetuneConfig):
    """The causal LM at ``path`` (swapped to T2R unless it already is) and its tokenizer."""
    from t2r_export.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer or path, trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(path, trust_remote_code=cfg.trust_remote_code)
    if is_t2r_model(model) and cfg.window != model.config.t2r.get("window", 0):
        raise ValueError(f"{path} is already a T2R model with window {model.config.t2r.get('window', 0)}; "
                         f"--window {cfg.window} applies to a softmax model (pass the T2R model's own window)")
    if not is_t2r_model(model):
        swap_attention(model, T2RConfig(feature_map=cfg.feature_map, feature_dim=cfg.feature_dim,
                                        init=cfg.init, seed=cfg.seed, window=cfg.window, decay=cfg.decay))
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions is not None and cfg.block_size > positions:
        raise ValueError(f"block size {cfg.block_size} exceeds the model's {positions} positions; lower --block-size")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ValueError(f"the tokenizer in {path} has {len(tokenizer)} tokens but the model only "
                         f"{model.get_input_embeddings().num_embeddings} embeddings")
    model.config.use_cache = False
    return model, tokenizer


def _hub_dataset_documents(name: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"dataset {name!r} needs the `datasets` package (pip install datasets); "
                         "or pass local files with --data") from None
    repo, _, subset = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, subset or None, split="train")
    # datasets raises many types (connection, file-not-found, config errors); all mean "cannot load"
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"cannot load dataset {name!r} ({str(err).splitlines()[0]}); offline? "
                         "pass local files with --data") from None
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return [text for text in ds["text"] if text]


def load_token_streams(cfg: FinetuneConfig, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) token streams: stdlib splits, or user documents with the last 5% held out."""
    if not cfg.data and not cfg.dataset:
        train = stdlib_token_stream(tokenizer, "train", cfg.cache_dir, cfg.max_files)
        valid = stdlib_token_stream(tokenizer, "valid", cfg.cache_dir, cfg.max_files)
    else:
        docs = read_text_files(cfg.data) if cfg.data else _hub_dataset_documents(cfg.dataset)
        stream = tokenize_documents(tokenizer, docs)
        held_out = max(2, len(stream) // 20)
        train, valid = stream[:-held_out], stream[-held_out:]
    needed = cfg.batch_size * cfg.block_size + 1
    if len(train) < needed:
        raise ValueError(f"the training corpus has {len(train)} tokens, too few for one batch of "
                         f"{cfg.batch_size} blocks of {cfg.block_size}: expected at least {needed}")
    return train, valid


def lora_target_modules(model) -> list[str]:
    """Full names of the linear layers inside each attention module (q/k/v/o, or fused qkv)."""
    attn_ids = {id(m) for m in attention_modules(model)}
    targets = []
    for name, module in model.named_modules():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if parent and id(model.get_submodule(parent)) in attn_ids and _is_linear(module):
            targets.append(name)
    if not targets:
        raise ValueError(f"found no linear projections inside the attention modules of {type(model).__name__}")
    return targets


def _is_linear(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def prepare_trainable(model, mode: str, cfg: FinetuneConfig, adapter_dir: Path | None = None):
    """Set ``requires_grad`` for a stage ("transfer" or a train mode); returns the model to train."""
    model.requires_grad_(False)
    if mode == "transfer":
        freeze_for_transfer(model, cfg.feature_map)
    elif mode == "all":
        model.requires_grad_(True)
    elif mode == "attention":
        for attn in attention_modules(model):
            attn.requires_grad_(True)
    else:
        from peft import LoraConfig, PeftModel, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=lora_target_modules(model), bias="none")
        if adapter_dir is None:
            model = get_peft_model(model, lora)
        else:
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
        # phi is new: it always trains, beside the adapters
        for p in feature_map_parameters(model):
            p.requires_grad_(True)
    return model


def build_optimizer(model, lr: float, cfg: FinetuneConfig, steps: int, warmup: bool = True):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    warmup_steps = math.ceil(cfg.warmup_fraction * steps) if warmup else 0

    # linear warmup, then cosine to min_lr_ratio at the last step
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, steps, warmup_steps, 1.0, cfg.min_lr_ratio))
    return optimizer, scheduler


# --- checkpoints --------------------------------------------------------------------------------

def resume_state(out_dir: Path, cfg: FinetuneConfig, global_batch: int) -> dict:
    """The checkpoint's recipe state, after checking that this run may continue it."""
    state = read_checkpoint_state(out_dir / CHECKPOINT_DIR)
    check_trainer_state(state, out_dir / CHECKPOINT_DIR / STATE_FILE)
    saved = state["config"]
    changed = [k for k in RESUME_KEYS if saved.get(k) != _config_record(cfg).get(k)]
    if changed:
        raise ValueError(f"cannot resume with changed settings ({', '.join(changed)}); the checkpoint has "
                         + ", ".join(f"{k}={saved.get(k)}" for k in changed))
    if cfg.fsdp != saved.get("fsdp", False):
        raise ValueError(f"cannot resume: the checkpoint was written {'with' if saved.get('fsdp') else 'without'} "
                         "--fsdp; resume the same way (the optimizer state layouts differ)")
    if global_batch != state["global_batch"]:
        raise ValueError(f"cannot resume: the checkpoint's global batch is {state['global_batch']} blocks, this "
                         f"run's is {global_batch} (batch size x processes x grad accum); keep the product equal")
    return state


# what resuming reads from trainer_state.json, and the type each must have
STATE_KEYS = {"config": dict, "global_batch": int, "stage": str, "step": int, "rng": dict, "tokens": dict,
              "losses": dict, "valid": list}
RNG_KEYS = ("torch", "cuda", "python", "numpy")


def check_trainer_state(state: dict, path: Path) -> None:
    """One ValueError line naming ``path`` when the recipe state it holds is damaged."""
    for key, kind in STATE_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise ValueError(f"{path} lacks a valid {key!r} ({kind.__name__} expected); {DAMAGED_HINT}")
    missing = [key for key in RNG_KEYS if key not in state["rng"]]
    if missing or state["stage"] not in ("transfer", "finetune") or state["step"] < 0:
        raise ValueError(f"{path} has an invalid stage, step or RNG state; {DAMAGED_HINT}")


# --- training ---------------------------------------------------------------------------------



def _notify(progress: Progress | None, dist: Distributed, event: dict) -> None:
    if progress is not None and dist.is_main:
        progress(event)


def run_stage(stage: str, model, tokenizer, streams, state: dict, cfg: FinetuneConfig, dist: Distributed,
              progress: Progress | None, checkpoint: Path | None, teacher=None):
    """Train one stage from ``state["step"]`` to its end, updating ``state``; returns the trained model
    (a peft model for LoRA)."""
    steps = cfg.attention_transfer_steps if stage == "transfer" else cfg.steps
    mode = "transfer" if stage == "transfer" else cfg.train
    adapter = checkpoint / ADAPTER_DIR if checkpoint is not None and (checkpoint / ADAPTER_DIR).is_dir() else None
    reshard(model, dist)
    model = prepare_trainable(model, mode, cfg, adapter)
    lr = cfg.attention_transfer_lr if stage == "transfer" else cfg.lr
    optimizer, scheduler = build_optimizer(model, lr, cfg, steps, warmup=stage != "transfer")
    if checkpoint is not None:
        load_optimizer_state(model, optimizer, scheduler, checkpoint, dist)
        set_rng_state(state["rng"])
    if stage == "transfer":
        loss_fn = attention_transfer_loss
    else:
        loss_fn = next_token_loss if teacher is None else distillation_loss(teacher)
    ddp_model = wrap_ddp(model, dist)
    ddp_model.train()
    global_batch = state["global_batch"]
    seed = cfg.seed + (10_000 if stage == "transfer" else 0)
    batches = iter_blocks(streams[0], cfg.block_size, global_batch, seed=seed, start_step=state["step"])
    tokens_per_step = global_batch * cfg.block_size
    window_start, window_steps = time.perf_counter(), 0
    for step in range(state["step"], steps):
        current_lr = optimizer.param_groups[0]["lr"]
        loss_value = train_step(ddp_model, loss_fn, next(batches), optimizer, scheduler, cfg, dist)
        if not math.isfinite(loss_value):
            raise RuntimeError(f"{stage} loss became {loss_value} at step {step + 1}: lower the learning rate")
        state["losses"][stage].append(loss_value)
        state["tokens"][stage] += tokens_per_step
        state["step"] = step + 1
        window_steps += 1
        tokens_per_s = window_steps * tokens_per_step / max(time.perf_counter() - window_start, 1e-9)
        _notify(progress, dist, {"phase": stage, "step": step + 1, "steps": steps, "loss": loss_value,
                                 "lr": current_lr, "tokens_per_s": tokens_per_s})
        if dist.is_main and ((step + 1) % cfg.log_every == 0 or step + 1 == steps):
            logger.info("%s step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s", stage, step + 1, steps, loss_value,
                        current_lr, tokens_per_s)
            window_start, window_steps = time.perf_counter(), 0
        paused = False
        if stage == "finetune" and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < steps:
            validate(model, streams[1], state, cfg, dist, progress)
            paused = True
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
            save_checkpoint(model, tokenizer, optimizer, scheduler, state, Path(cfg.out_dir), dist)
            if dist.world_size > 1:
                torch_dist.barrier()
            paused = True
        if paused:
            # tokens/s measures training only
            window_start, window_steps = time.perf_counter(), 0
    return model


def train_step(ddp_model, loss_fn, batch: torch.Tensor, optimizer, scheduler, cfg: FinetuneConfig,
               dist: Distributed) -> float:
    """One optimizer step on one global batch ``[G, L+1]``; returns its loss, averaged over all ranks."""
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dist.device.type == "cuda"
                else contextlib.nullcontext())
    step_loss = torch.zeros((), device=dist.device)
    for a, micro in micro_batches(batch, dist, cfg.grad_accum):
        # only the last micro-step syncs gradients across ranks
        with gradient_sync(ddp_model, a == cfg.grad_accum - 1, dist):
            with autocast:
                loss = loss_fn(ddp_model, micro) / cfg.grad_accum
            loss.backward()
        step_loss += loss.detach()
    sync_feature_map_grads(ddp_model, dist)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    clip_gradients(trainable, cfg.grad_clip, dist)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return global_mean(step_loss, dist)


def validate(model, valid: np.ndarray, state: dict, cfg: FinetuneConfig, dist: Distributed,
             progress: Progress | None) -> dict | None:
    """Perplexity of the first ``eval_max_tokens`` valid tokens on rank 0 (on all ranks under FSDP)."""
    if not dist.is_main and not dist.fsdp:
        return None
    relay = None if progress is None or not dist.is_main else (lambda event: progress({**event, "step": state["step"]}))
    score = perplexity(model, valid, cfg.block_size, cfg.eval_batch_size, cfg.eval_max_tokens, relay)
    if not dist.is_main:
        return None
    state["valid"].append({"step": state["step"], "loss": score["loss"], "perplexity": score["perplexity"]})
    logger.info("valid at step %d: loss %.4f  perplexity %.3f", state["step"], score["loss"], score["perplexity"])
    return score


# --- the recipe -------------------------------------------------------------------------------

def _config_record(cfg: FinetuneConfig) -> dict:
    def plain(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def finetune(cfg: FinetuneConfig, progress: Progress | None = None, command: str | None = None) -> dict:
    """Swap (if needed), train and save a T2R model to ``cfg.out_dir``; returns the run's record.

    ``progress`` (rank 0 only) receives dicts with a ``phase`` key: ``setup``, ``transfer`` and
    ``finetune`` (step, steps, loss, lr, tokens_per_s), ``eval`` (tokens, total) and ``save``.
    Bad input raises ``ValueError`` before anything is written.
    """
    start = time.perf_counter()
    check_config(cfg)
    dist = init_distributed(cfg.fsdp)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    checkpoint = out_dir / CHECKPOINT_DIR if cfg.resume else None
    global_batch = cfg.batch_size * dist.world_size * cfg.grad_accum
    _notify(progress, dist, {"phase": "setup"})

    source = Path(cfg.model) if cfg.model is not None else bundled_teacher()
    if cfg.model is None and not source.is_dir():
        raise ValueError(f"the bundled teacher is missing at {source}; pass a model directory")
    check_model_and_tokenizer(source, cfg.tokenizer, need_fast=False)
    state = {"stage": "transfer" if cfg.attention_transfer_steps else "finetune", "step": 0,
             "world_size": dist.world_size, "global_batch": global_batch, "config": _config_record(cfg),
             "tokens": {"transfer": 0, "finetune": 0}, "losses": {"transfer": [], "finetune": []}, "valid": []}
    if checkpoint is not None:
        state = resume_state(out_dir, cfg, global_batch)
        state["world_size"] = dist.world_size
    _notify(progress, dist, {"phase": "setup", "what": f"loading {source}"})
    model, tokenizer = load_model_and_tokenizer(checkpoint or source, cfg)
    _notify(progress, dist, {"phase": "setup", "what": "tokenizing the training data (cached after the first run)"})
    streams = load_token_streams(cfg, tokenizer)
    # before any training: a source that cannot be a teacher fails first
    teacher = load_teacher(source, cfg, dist) if cfg.distill else None
    model.to(dist.device)
    if dist.fsdp:
        shard_fsdp(model, dist)
    if dist.is_main:
        logger.info("finetuning %s: %d parameters, train %d tokens, world %d, global batch %d x %d",
                    source, sum(p.numel() for p in model.parameters()), len(streams[0]), dist.world_size,
                    global_batch, cfg.block_size)

    if state["stage"] == "transfer":
        model = run_stage("transfer", model, tokenizer, streams, state, cfg, dist, progress, checkpoint)
        model.requires_grad_(False)
        # how close each layer got to its softmax output, on held-out text
        held_out = torch.as_tensor(streams[1][: cfg.block_size + 1], dtype=torch.long)[None].to(dist.device)
        state["transfer_layer_mse"] = transfer_report(model, held_out)
        state.update(stage="finetune", step=0)
        # the finetune stage starts fresh: its optimizer and adapters are not in the transfer checkpoint
        checkpoint = None
    model = run_stage("finetune", model, tokenizer, streams, state, cfg, dist, progress, checkpoint, teacher)
    del teacher

    final = validate(model, streams[1], state, cfg, dist, progress)
    full_state = gather_model_state(model, dist)
    record = {}
    if dist.is_main:
        _notify(progress, dist, {"phase": "save"})
        if hasattr(model, "peft_config"):
            model = model.merge_and_unload()
        record = {
            "command": command if command is not None else shlex.join(sys.argv),
            "source_model": str(source),
            "config": _config_record(cfg),
            "world_size": dist.world_size,
            "fsdp": dist.fsdp,
            "global_batch": global_batch,
            "tokens_seen": state["tokens"],
            "losses": state["losses"],
            "transfer_layer_mse": state.get("transfer_layer_mse"),
            "valid": state["valid"],
            "final_valid_loss": final["loss"],
            "final_valid_perplexity": final["perplexity"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "wall_time_s": round(time.perf_counter() - start, 1),
            "torch_version": torch.__version__,
        }
        save_final(model, tokenizer, record, RECORD_FILE, out_dir, full_state)
        logger.info("saved the T2R model to %s (valid perplexity %.3f)", out_dir, record["final_valid_perplexity"])
    if dist.world_size > 1:
        torch_dist.barrier()
    if dist.owns_group:
        torch_dist.destroy_process_group()
    return record
