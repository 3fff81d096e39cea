"""The decode paths `bench` times, each implementing the :class:`DecodePath` protocol.

Every path decodes batch 1 and offers:
    prefill(ids)     continue over ids [T] from the current position (cheaply: one call or chunks)
    step(token)      one single-token decode step
    sync()           wait for queued device work (a no-op on the CPU paths), so timings are honest
    mark()/rewind()  remember the current position and cache, and go back to it
    reset()          start again from an empty cache / zero state
    close()          release sessions and buffers
    position         tokens consumed so far
Paths:
- ``T2ROrtPath`` (a): the bundle through the project's torch-free ``OrtDecoder`` (IO binding);
- ``SoftmaxOrtPath`` (b): the softmax KV-cache graph from the same emitter (IO binding);
- ``GenaiPath`` (b2): onnxruntime-genai with its own model builder (fp32, CPU): a preallocated
  KV cache updated in place (GroupQueryAttention), the strongest softmax peer that runs here;
- ``TransformersPath`` (c): the softmax teacher in torch with transformers' DynamicCache;
- ``T2RTorchPath`` (d): the T2R model's recurrent step in torch (``decode_step``); on CUDA the
  step is captured once in a CUDA graph and replayed;
- ``FloorPath`` (e): the dense-matmul floor graph (no cache).
A path that cannot run raises ``PathUnavailable`` with the one-line reason the report prints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

logger = logging.getLogger(__name__)

GENAI_BUILD_TIMEOUT_S = 900
# KV prefill chunk when reaching a position: bounds the scores to [chunk, P+chunk] per head
KV_PREFILL_CHUNK = 1024


class PathUnavailable(RuntimeError):
    """This decode path cannot run here; the message says why, in one line."""


@runtime_checkable
class DecodePath(Protocol):
    """One way of decoding batch 1 that the bench times; every peer implements all of it."""

    position: int

    def prefill(self, ids: np.ndarray) -> np.ndarray | None:
        """Continue over ``ids [T]`` from the current position; the last logits where the path has them."""

    def step(self, token: int) -> np.ndarray | None:
        """One single-token step; its logits where the path returns them."""

    def sync(self) -> None:
        """Wait until queued device work is done."""

    def mark(self) -> None:
        """Remember the current position and cache."""

    def rewind(self) -> None:
        """Go back to the marked position and cache."""

    def reset(self) -> None:
        """Start again from an empty cache / zero state."""

    def close(self) -> None:
        """Release what the path holds."""


def _one_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "no message")[:limit]


# -- ONNX Runtime: the T2R bundle, the softmax KV graph, the floor ------------------------------

class T2ROrtPath:
    """The bundle through the project's torch-free OrtDecoder (IO binding; one state set where the graphs allow it)."""

    # the prefill graph's running sums are [T, H_kv, K, d] per layer: past ~1k tokens they fall out
    # of the last-level cache and long prompts get slower per token (8k: 5.4k tokens/s in 1k calls,
    # 4.8k in 4k calls, 3.5k in one call on the 2-core EPYC)
    def __init__(self, bundle, threads: int, prefill_chunk: int = 1024):
        from ..runtime import OrtDecoder

        self.decoder = OrtDecoder(bundle, provider="cpu", threads=threads)
        self.decoder.reset(1)
        self.prefill_chunk = prefill_chunk
        self.position = 0
        self._ids = np.zeros((1, 1), np.int64)
        self._pos = np.zeros((1, 1), np.int64)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        logits = None
        for start in range(0, len(ids), self.prefill_chunk):
            part = np.asarray(ids[start:start + self.prefill_chunk], dtype=np.int64)[None]
            positions = np.arange(self.position, self.position + part.shape[1], dtype=np.int64)[None]
            logits = self.decoder.prefill(part, positions)
            self.position += part.shape[1]
        return logits

    def step(self, token: int) -> np.ndarray:
        self._ids[0, 0] = token
        self._pos[0, 0] = self.position
        self.position += 1
        return self.decoder.step(self._ids, self._pos)

    def reset(self) -> None:
        self.decoder.reset(1)
        self.position = 0

    def state_nbytes(self) -> int:
        return self.decoder.state_nbytes()

    def sync(self) -> None:
        pass

    def mark(self) -> None:
        pass

    def rewind(self) -> None:
        pass

    def close(self) -> None:
        self.decoder.close()


class FloorPrefillPath:
    """The floor's prefill form, for the prefill table: one run over the whole prompt. It holds the
    floor's runner (its weights and sessions), so the floor's decode path can close."""

    def __init__(self, runner):
        self.runner = runner

    def reset(self) -> None:
        pass

    def prefill(self, ids) -> None:
        self.runner.prefill(ids)

    def sync(self) -> None:
        pass

    def close(self) -> None:
        self.runner = None


class FloorPath:
    """The floor graph: it has no cache, so prefill/mark/rewind only move the position."""

    def __init__(self, dec, threads: int):
        from .softmax_graph import FloorRunner

        self.runner = FloorRunner(dec, threads)
        self.position = 0

    def prefill(self, ids) -> None:
        self.position += len(ids)

    def reset(self) -> None:
        self.position = 0

    def step(self, token: int):
        self.position += 1
        return self.runner.step(token)

    def sync(self) -> None:
        pass

    def mark(self) -> None:
        pass

    def rewind(self) -> None:
        pass

    def close(self) -> None:
        self.runner = None


class SoftmaxOrtPath:
    def __init__(self, dec, threads: int):
        from .softmax_graph import KVCacheDecoder

        self.decoder = KVCacheDecoder(dec, threads)

    @property
    def position(self) -> int:
        return self.decoder.position

    def prefill(self, ids, chunk: int = KV_PREFILL_CHUNK):
        return self.decoder.prefill(ids, chunk=chunk)

    def step(self, token: int):
        return self.decoder.step(token)

    def sync(self) -> None:
        pass

    def mark(self) -> None:
        self.decoder.mark()

    def rewind(self) -> None:
        self.decoder.rewind()

    def reset(self) -> None:
        self.decoder.reset()

    def close(self) -> None:
        self.decoder = None


# -- onnxruntime-genai ---------------------------------------------------------------------------

def genai_version() -> str:
    try:
        import onnxruntime_genai as og
    except ImportError as err:
        raise PathUnavailable(f"onnxruntime-genai is not installed (pip install onnxruntime-genai): {err}") from None
    return og.__version__


def _genai_key(model_dir: Path, context: int, version: str) -> str:
    h = hashlib.sha256(f"{version}:{context}".encode())
    for name in sorted(p.name for p in model_dir.iterdir() if p.suffix in (".json", ".safetensors")):
        h.update(name.encode())
        with open(model_dir / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def build_genai_model(model_dir: Path, context: int, cache_root: Path) -> Path:
    """Run onnxruntime-genai's model builder (fp32, cpu) on a local HF model dir; cached by content.

    RoPE models carry their cos/sin tables up to ``max_position_embeddings``: the builder gets a
    copy of the config with that raised to ``context`` when the benchmark goes further (RoPE has
    no learned table, so the weights are the same model).
    """
    version = genai_version()
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise PathUnavailable(f"onnxruntime-genai's builder needs tokenizer.json beside the model ({model_dir})")
    out = Path(cache_root) / "bench-genai" / _genai_key(model_dir, context, version)
    if (out / "genai_config.json").is_file():
        return out
    config = json.loads((model_dir / "config.json").read_text())
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    src = work / "hf"
    src.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            os.symlink(f.resolve(), src / f.name)
    if config.get("max_position_embeddings", context) < context:
        config["max_position_embeddings"] = context
    (src / "config.json").write_text(json.dumps(config, indent=2))
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(work / "model"),
           "-p", "fp32", "-e", "cpu", "-c", str(work / "cache")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=GENAI_BUILD_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        shutil.rmtree(work, ignore_errors=True)
        raise PathUnavailable(f"onnxruntime-genai's builder ran past {GENAI_BUILD_TIMEOUT_S} s") from None
    if done.returncode != 0 or not (work / "model" / "genai_config.json").is_file():
        shutil.rmtree(work, ignore_errors=True)
        raise PathUnavailable(f"onnxruntime-genai's builder failed: {_one_line(done.stderr or done.stdout)}")
    os.replace(work / "model", out)
    shutil.rmtree(work, ignore_errors=True)
    return out


class GenaiPath:
    """onnxruntime-genai's generator: one sequence, KV cache preallocated to ``max_length``."""

    def __init__(self, model_path: Path, max_length: int, threads: int):
        import onnxruntime_genai as og

        config = og.Config(str(model_path))
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.max_length = max_length
        self.reset()

    def reset(self) -> None:
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        # greedy, no early stop on EOS: random-token contexts must not end the sequence
        params.set_search_options(max_length=self.max_length, batch_size=1, do_sample=False, min_length=self.max_length)
        self.generator = og.Generator(self.model, params)
        self.position = 0
        self._marked = 0

    def prefill(self, ids: np.ndarray) -> None:
        self.generator.append_tokens(np.ascontiguousarray(ids, dtype=np.int32))
        self.position += len(ids)

    def step(self, token: int) -> None:
        # one token in, one model run on it: generate_next_token() after append_tokens() only samples
        # from logits already computed, so timing it would count one model run too few
        self.generator.append_tokens(np.array([token], dtype=np.int32))
        self.position += 1

    def sync(self) -> None:
        pass

    def mark(self) -> None:
        self._marked = self.position

    def rewind(self) -> None:
        self.generator.rewind_to(self._marked)
        self.position = self._marked

    def close(self) -> None:
        self.generator = None
        self.model = None


# -- transformers --------------------------------------------------------------------------------

def _cache_kwarg(model) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache`` in forward()."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TransformersPath:
    """The softmax teacher in torch, transformers' DynamicCache (grown by concatenation)."""

    def __init__(self, model, device: str = "cpu", prefill_chunk: int = 1024):
        import torch

        self.torch = torch
        self.model = model.to(device).eval()
        self.device = device
        self.prefill_chunk = prefill_chunk
        self.cache_arg = _cache_kwarg(self.model)
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.position = 0
        self._marked = 0

    def _forward(self, ids) -> None:
        torch = self.torch
        t = ids.shape[1]
        positions = torch.arange(self.position, self.position + t, device=self.device)[None]
        with torch.inference_mode():
            self.model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                       **{self.cache_arg: self.cache})
        self.position += t

    def prefill(self, ids: np.ndarray) -> None:
        ids = self.torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)[None]
        for start in range(0, ids.shape[1], self.prefill_chunk):
            self._forward(ids[:, start:start + self.prefill_chunk])
        self.sync()

    def step(self, token: int) -> None:
        self._forward(self.torch.full((1, 1), int(token), dtype=self.torch.long, device=self.device))

    def sync(self) -> None:
        if self.device != "cpu":
            self.torch.cuda.synchronize()

    def mark(self) -> None:
        self._marked = self.position

    def rewind(self) -> None:
        extra = self.cache.get_seq_length() - self._marked
        if extra > 0:
            self.cache.crop(-extra)
        self.position = self._marked

    def close(self) -> None:
        self.cache = None


# -- T2R in torch --------------------------------------------------------------------------------

class T2RTorchPath:
    """The T2R model's recurrent step in torch; on CUDA the step replays a captured CUDA graph."""

    def __init__(self, model, device: str = "cpu", prefill_chunk: int = 2048, cuda_graph: bool = True):
        import torch

        self.torch = torch
        self.model = model.to(device).eval()
        self.device = device
        self.prefill_chunk = prefill_chunk
        self.use_graph = device != "cpu" and cuda_graph
        self.graph_note = ""
        self.reset()

    def reset(self) -> None:
        from ..models import new_state

        self.state = new_state(self.model, 1)
        self.position = 0
        self._marked = None
        self._graph = None

    def prefill(self, ids: np.ndarray) -> None:
        from ..models import prefill

        torch = self.torch
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)[None]
        for start in range(0, ids.shape[1], self.prefill_chunk):
            part = ids[:, start:start + self.prefill_chunk]
            prefill(self.model, part, self.state, position_offset=self.position)
            self.position += part.shape[1]
        self._copy_state_into_graph()
        self.sync()

    def step(self, token: int) -> None:
        from ..models import decode_step

        torch = self.torch
        if self.use_graph and self._graph is None:
            self._capture()
        if self._graph is not None:
            self._ids.fill_(int(token))
            self._pos.fill_(self.position)
            self._graph.replay()
        else:
            ids = torch.full((1, 1), int(token), dtype=torch.long, device=self.device)
            pos = torch.full((1, 1), self.position, dtype=torch.long, device=self.device)
            decode_step(self.model, ids, pos, self.state)
        self.position += 1

    def _capture(self) -> None:
        """Capture decode_step once: static ids/positions/state; the new state is copied back in the graph."""
        from ..models import decode_step

        torch = self.torch
        try:
            self._ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            self._pos = torch.full((1, 1), self.position, dtype=torch.long, device=self.device)
            static = self.state.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up on a side stream, as CUDA graph capture requires
                    work = static.clone()
                    decode_step(self.model, self._ids, self._pos, work)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            work = static.clone()
            with torch.cuda.graph(graph):
                work = static.shallow()
                decode_step(self.model, self._ids, self._pos, work)
                for dst, src in zip(static.tensors(), work.tensors(), strict=True):
                    dst.copy_(src)
            self.state, self._graph = static, graph
        except Exception as err:  # capture is best effort: eager steps stay correct
            self.use_graph, self._graph = False, None
            self.graph_note = f"CUDA graph capture failed, eager steps: {_one_line(err)}"
            logger.warning(self.graph_note)

    def _copy_state_into_graph(self) -> None:
        self._graph = None  # the state tensors changed identity: capture again on the next step

    def sync(self) -> None:
        if self.device != "cpu":
            self.torch.cuda.synchronize()

    def mark(self) -> None:
        self._marked = (self.state.clone(), self.position)

    def rewind(self) -> None:
        state, self.position = self._marked
        for dst, src in zip(self.state.tensors(), state.tensors(), strict=True):
            dst.copy_(src)

    def close(self) -> None:
        self.state = None
        self._graph = None
