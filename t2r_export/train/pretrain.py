"""Pretrain the bundled softmax teacher: a small Llama on the CPython standard library source.

One explicit file: setup (tokenizer, token streams, model, optimizer) / train / evaluate / save.
Rerun the bundled teacher with the command recorded in its ``training.json``, e.g.::

    t2r-export pretrain --out t2r_export/teacher/softmax --steps 550 --batch-size 16 \
        --warmup-steps 50 --num-threads 1 --seed 1337

The run is deterministic for a given seed, machine and library versions: the tokenizer, the file
split, the block order (``iter_blocks``) and the initialization are all seeded or hash-based.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from t2r_export.data.corpus import iter_blocks, read_split, stdlib_token_stream
from t2r_export.data.tokenizer import train_bpe_tokenizer
from t2r_export.atomic import atomic_dir
from t2r_export.train.checkpoint import save_weights
from t2r_export.train.evaluate import perplexity
from t2r_export.train.losses import next_token_loss
from t2r_export.train.schedule import warmup_cosine

logger = logging.getLogger(__name__)

Progress = Callable[[dict], None]
SAVE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class PretrainConfig:
    # outside the package by default, so a casual run never overwrites the bundled teacher
    out_dir: Path = Path("runs/teacher")
    # any fixed value makes runs repeatable; this one is nanoGPT's
    seed: int = 1337
    # the bundled teacher's recipe: 2.25M tokens, about half an hour on one core of a shared
    # 2-core CPU (see t2r_export/teacher/README.md); more steps keep improving it
    steps: int = 550
    # 16 x 256 = 4k tokens per step: at a CPU's budget, more small steps beat fewer big ones
    batch_size: int = 16
    # long enough for useful context in code, short enough for cheap attention on CPU
    block_size: int = 256
    # small models tolerate (and need) a high lr to learn in few steps
    lr: float = 2e-3
    # None = lr / 10: cosine decays to a tenth, the usual Chinchilla/nanoGPT floor
    min_lr: float | None = None
    # ~10% of the run: Adam's second moments settle before the full lr hits
    warmup_steps: int = 50
    # decoupled decay on matrices only (norm gains are not decayed)
    weight_decay: float = 0.1
    # beta2 0.95 rather than 0.999: adapts faster, steadier at high lr (GPT-3, Llama)
    beta1: float = 0.9
    beta2: float = 0.95
    # clipping guards against rare loss spikes at the high lr
    grad_clip: float = 1.0
    # 4096 byte-level BPE tokens: compresses code ~3.5 bytes/token and keeps the embedding 1M params
    vocab_size: int = 4096
    # 256 wide x 6 deep: ~5.7M params, trainable in half an hour on a laptop CPU
    hidden_size: int = 256
    num_layers: int = 6
    # 4 heads of 64: head_dim 64 is the common Llama-family value the exporters are tested on
    num_heads: int = 4
    head_dim: int = 64
    # 2 KV heads: grouped-query attention, so GQA paths (state per KV head) are exercised
    num_kv_heads: int = 2
    # 3x hidden for the SwiGLU MLP (~8/3 x hidden, rounded to a multiple of 256)
    intermediate_size: int = 768
    # RoPE extrapolates; 2048 positions covers long decode tests without retraining
    max_position_embeddings: int = 2048
    # the original RoPE base; ample for 2048 positions
    rope_theta: float = 10000.0
    # often enough to watch the loss, rarely enough not to slow the run
    log_every: int = 20
    # the first 200k tokens of valid and of test (~40% of each split): a minute or two on a shared
    # 2-core CPU instead of several; None evaluates whole splits
    eval_max_tokens: int | None = 200_000
    # eval needs no gradients, so bigger batches are cheap
    eval_batch_size: int = 16
    # None = every CPU core (os.cpu_count()); on a CPU shared with other jobs 1 thread can be faster,
    # since a preempted OpenMP thread stalls the others at every barrier
    num_threads: int | None = None
    # None = every file of a split; a small number makes test runs take seconds
    max_files: int | None = None
    # None = the package cache root ($T2R_EXPORT_CACHE, else $XDG_CACHE_HOME or ~/.cache, /t2r_export)
    cache_dir: Path | None = None
    # weights are stored in float16 (half the package size); config.json still says float32, so
    # from_pretrained computes in fp32. Valid/test are evaluated on these rounded weights.
    save_dtype: str = "float16"


def _check_config(cfg: PretrainConfig) -> None:
    for name in ("steps", "batch_size", "block_size", "vocab_size", "log_every", "eval_batch_size"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or not 0 <= final_lr(cfg) <= cfg.lr:
        raise ValueError(f"expected 0 <= min_lr <= lr and lr > 0, got lr={cfg.lr}, min_lr={cfg.min_lr}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.num_heads % cfg.num_kv_heads != 0:
        raise ValueError(f"num_heads ({cfg.num_heads}) must be a multiple of num_kv_heads ({cfg.num_kv_heads})")
    if cfg.save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {cfg.save_dtype!r}")
    if cfg.block_size > cfg.max_position_embeddings:
        raise ValueError(f"block_size ({cfg.block_size}) must not exceed max_position_embeddings ({cfg.max_position_embeddings})")


def build_model(cfg: PretrainConfig, vocab_size: int, special_id: int) -> LlamaForCausalLM:
    """A randomly initialized Llama (RoPE, GQA, tied embeddings) of the configured size."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=special_id,
        eos_token_id=special_id,
        pad_token_id=special_id,
    )
    return LlamaForCausalLM(config)


def final_lr(cfg: PretrainConfig) -> float:
    """The lr the cosine decay ends at: ``min_lr``, or ``lr / 10`` when unset."""
    return cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps``."""
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr, final_lr(cfg))


def build_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only, not on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _notify(progress: Progress | None, event: dict) -> None:
    if progress is not None:
        progress(event)


def train(model, stream: np.ndarray, cfg: PretrainConfig, progress: Progress | None = None) -> dict:
    """Run ``cfg.steps`` optimizer steps on random blocks of ``stream``; returns the last logged loss."""
    optimizer = build_optimizer(model, cfg)
    batches = iter_blocks(stream, cfg.block_size, cfg.batch_size, seed=cfg.seed)
    model.train()
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    last_loss = float("nan")
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = next_token_loss(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"loss became {loss.item()} at step {step}: lower --lr or raise --warmup-steps")
        window_loss += loss.item()
        window_steps += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            elapsed = time.perf_counter() - window_start
            last_loss = window_loss / window_steps
            tokens_per_s = window_steps * cfg.batch_size * cfg.block_size / elapsed
            logger.info("step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s", step + 1, cfg.steps, last_loss, lr, tokens_per_s)
            _notify(progress, {"phase": "train", "step": step + 1, "steps": cfg.steps, "loss": last_loss, "lr": lr, "tokens_per_s": tokens_per_s})
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    return {"final_train_loss": last_loss}


def round_weights_(model: torch.nn.Module, save_dtype: str) -> None:
    """Round fp32 weights in place to what storing them as ``save_dtype`` keeps (still fp32 tensors)."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(getattr(torch, save_dtype)).float())


def save_atomically(model, tokenizer, out_dir: Path, record: dict, save_dtype: str = "float32") -> None:
    """Write model, tokenizer and training.json beside ``out_dir``, then swap the directory into place."""
    # the command checked --out (and --force) before training: a previous teacher here is ours to replace
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        save_weights(model, tmp, save_dtype)
        tokenizer.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def _config_record(cfg: PretrainConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def pretrain_teacher(cfg: PretrainConfig, progress: Progress | None = None, command: str | None = None) -> dict:
    """Train tokenizer and model on the stdlib train split, evaluate valid/test, save to ``cfg.out_dir``.

    ``progress`` receives dicts with a ``phase`` key: ``tokenizer``, ``tokenize``, ``train``
    (step, steps, loss, lr, tokens_per_s), ``eval`` (split, tokens, total) and ``save``.
    Returns the record written to ``training.json``.
    """
    _check_config(cfg)
    start = time.perf_counter()
    torch.set_num_threads(cfg.num_threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)

    _notify(progress, {"phase": "tokenizer"})
    tokenizer = train_bpe_tokenizer(read_split("train", cfg.max_files), cfg.vocab_size, cfg.max_position_embeddings)
    _notify(progress, {"phase": "tokenize"})
    streams = {split: stdlib_token_stream(tokenizer, split, cfg.cache_dir, cfg.max_files) for split in ("train", "valid", "test")}

    model = build_model(cfg, len(tokenizer), tokenizer.eos_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %d parameters; train stream %d tokens", n_params, len(streams["train"]))
    train_start = time.perf_counter()
    train_result = train(model, streams["train"], cfg, progress)
    train_time = time.perf_counter() - train_start
    round_weights_(model, cfg.save_dtype)

    scores = {}
    for split in ("valid", "test"):
        relay = None if progress is None else (lambda event, split=split: progress({**event, "split": split}))
        scores[split] = perplexity(model, streams[split], cfg.block_size, cfg.eval_batch_size, cfg.eval_max_tokens, relay)

    _notify(progress, {"phase": "save"})
    record = {
        "command": command if command is not None else shlex.join(sys.argv),
        "config": _config_record(cfg),
        "seed": cfg.seed,
        "steps": cfg.steps,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.block_size,
        "train_stream_tokens": int(len(streams["train"])),
        "parameters": n_params,
        "final_train_loss": train_result["final_train_loss"],
        "valid": scores["valid"],
        "test": scores["test"],
        "eval_max_tokens": cfg.eval_max_tokens,
        "train_time_s": round(train_time, 1),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
    }
    save_atomically(model, tokenizer, cfg.out_dir, record, cfg.save_dtype)
    logger.info("saved teacher to %s (valid ppl %.3f, test ppl %.3f)", cfg.out_dir, scores["valid"]["perplexity"], scores["test"]["perplexity"])
    return record
