"""Real model sizes: random-init checkpoints with public models' configs through the whole pipeline.

For each model: build the checkpoint (random weights, the real config written below), then run
``swap`` -> ``onnx`` (per precision) -> ``generate`` -> ``check --trt`` as separate processes, each
timed and measured for its own peak RSS (``wait4``), and compare the bundle with the checkpoint:

    rows = run_sizes(["gpt2-124m"], ["fp32"], work=Path("/tmp/sizes"))

Nothing is downloaded: the configs are written here, the tokenizer is the bundled teacher's (its
ids are far below every vocabulary here). Random weights are enough for sizes, memory and timing;
they say nothing about quality.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import contract

# the plans a user ships (fp16-all only demonstrates the overflow)
PRECISIONS = tuple(p for p in contract.PRECISIONS if p != "fp16-all")
BYTES_PER_PARAM = {"fp32": 4, "fp16": 2}
MB = 1_000_000


def _configs() -> dict:
    """model name -> (transformers config class name, its keyword arguments), from the public config.json files."""
    llama32_rope = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    return {
        "gpt2-124m": ("GPT2Config", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                         activation_function="gelu_new", bos_token_id=50256, eos_token_id=50256,
                                         tie_word_embeddings=True)),
        "pythia-160m": ("GPTNeoXConfig", dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12,
                                              num_attention_heads=12, intermediate_size=3072, rotary_pct=0.25,
                                              rotary_emb_base=10000, max_position_embeddings=2048,
                                              use_parallel_residual=True, hidden_act="gelu", layer_norm_eps=1e-5,
                                              tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)),
        "smollm2-135m": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                             num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                             max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                                             hidden_act="silu", tie_word_embeddings=True, bos_token_id=0,
                                             eos_token_id=0)),
        "qwen2.5-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                             num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                             max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                             hidden_act="silu", tie_word_embeddings=True, use_sliding_window=False,
                                             bos_token_id=151643, eos_token_id=151643)),
        "llama-3.2-1b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                             num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                             head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                             rope_theta=500000.0, rope_scaling=llama32_rope, hidden_act="silu",
                                             tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)),
    }


CONFIGS = _configs()
MODELS = tuple(CONFIGS)


def build_checkpoint(name: str, out: Path, seed: int = 0, spec: tuple | None = None) -> int:
    """A random-init softmax checkpoint of ``name`` in ``out`` (safetensors, fp32) with a tokenizer; returns
    its parameter count. ``spec``: ``CONFIGS[name]`` as read by a parent process (a child reads its own)."""
    import torch
    import transformers

    from ..teacher import bundled_model_dir

    if spec is None and name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    config_class, kwargs = spec or CONFIGS[name]
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(bundled_model_dir("softmax") / file, Path(out) / file)
    return sum(p.numel() for p in model.parameters())


@dataclass
class Stage:
    seconds: float
    peak_rss: int            # bytes
    ok: bool
    message: str = ""


# Linux carries a process's peak RSS across exec, and subprocess starts children with vfork: a child
# of this (large) process would report this process's peak as its own. A small launcher forks the
# command from its own small memory image and reports that grandchild's peak from wait4.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_process(argv: list[str], log: Path) -> Stage:
    """One process, output appended to ``log``: wall time, its own peak RSS, success."""
    peak_file = Path(log).with_name(Path(log).name + ".peak")
    peak_file.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log, "ab") as out:
        out.write(("$ " + " ".join(argv) + "\n").encode())
        out.flush()
        code = subprocess.run([sys.executable, "-c", _LAUNCHER, str(peak_file), *argv], stdout=out,
                              stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    peak = int(peak_file.read_text()) if peak_file.is_file() else 0
    peak_file.unlink(missing_ok=True)
    text = log.read_text(errors="replace").strip().splitlines()
    return Stage(seconds, peak, code == 0, "" if code == 0 else (text[-1] if text else f"exit {code}"))


def run_stage(args: list[str], log: Path) -> Stage:
    """One ``t2r-export`` command in its own process."""
    return run_process([sys.executable, "-c", "from t2r_export.cli import main; main()", *args], log)


def _build_stage(name: str, out: Path, log: Path) -> tuple[Stage, int]:
    code = ("import sys; from pathlib import Path; from t2r_export.bench.sizes import build_checkpoint; "
            "print('parameters', build_checkpoint(sys.argv[1], Path(sys.argv[2])))")
    stage = run_process([sys.executable, "-c", code, name, str(out)], log)
    if not stage.ok:
        return stage, 0
    line = next(line for line in reversed(log.read_text().splitlines()) if line.startswith("parameters "))
    return stage, int(line.split()[1])


def folder_bytes(path: Path, suffixes: tuple[str, ...] | None = None) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*")
               if f.is_file() and (suffixes is None or f.suffix in suffixes))


@dataclass
class SizeRow:
    model: str
    params: int
    precision: str
    checkpoint_bytes: int        # the T2R checkpoint's weights at this precision (int8: at fp32)
    swap: Stage | None
    export: Stage
    bundle_bytes: int            # graphs + weight file (no tokenizer)
    weights_bytes: int           # weights.bin
    state_bytes: int
    generate: Stage | None
    check: Stage | None

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.params

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> SizeRow:
        stages = {key: None if raw[key] is None else Stage(**raw[key]) for key in ("swap", "export", "generate", "check")}
        return cls(**{**raw, **stages})


def run_sizes(models: list[str], precisions: list[str], work: Path, threads: int = 0, verify: bool = True,
              keep: bool = False, progress=print, on_row=None) -> list[SizeRow]:
    """Build, swap, export, generate and check each model; one row per (model, precision), each also
    handed to ``on_row`` as soon as it is measured (a long run keeps what it finished)."""
    rows = []
    for name in models:
        root = Path(work) / name
        root.mkdir(parents=True, exist_ok=True)
        log = root / "log.txt"
        progress(f"{name}: building the random-init checkpoint")
        build, params = _build_stage(name, root / "softmax", log)
        if not build.ok:
            raise RuntimeError(f"{name}: building the checkpoint failed; see {log}")
        progress(f"{name}: swap ({params / 1e6:.0f}M parameters)")
        swap = run_stage(["swap", str(root / "softmax"), "-o", str(root / "t2r")], log)
        if not swap.ok:
            raise RuntimeError(f"{name}: swap failed: {swap.message}")
        shutil.rmtree(root / "softmax", ignore_errors=True)
        t2r_params = _safetensors_params(root / "t2r")
        for precision in precisions:
            bundle = root / f"bundle-{precision}"
            progress(f"{name}: onnx --precision {precision}")
            args = ["onnx", str(root / "t2r"), "-o", str(bundle), "--precision", precision]
            export = run_stage(args + ([] if verify else ["--no-verify"]), log)
            row = SizeRow(name, t2r_params, precision, t2r_params * BYTES_PER_PARAM.get(precision, 4), swap, export,
                          0, 0, 0, None, None)
            if export.ok:
                row.bundle_bytes = folder_bytes(bundle, (".onnx", ".bin", ".data"))
                row.weights_bytes = folder_bytes(bundle, (".bin",))
                row.state_bytes = contract.RuntimeConfig.read(bundle / contract.RUNTIME_JSON).state_bytes_per_sequence or 0
                progress(f"{name}: generate ({precision})")
                row.generate = run_stage(["generate", str(bundle), "--prompt", "def main():", "--max-new-tokens",
                                          "16", "--threads", str(threads)], log)
                progress(f"{name}: check --trt ({precision})")
                row.check = run_stage(["check", str(bundle), "--trt"], log)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if not keep:
                shutil.rmtree(bundle, ignore_errors=True)
        if not keep:
            shutil.rmtree(root / "t2r", ignore_errors=True)
    return rows


def _safetensors_params(folder: Path) -> int:
    """Parameters stored in a folder's safetensors files, read from their headers."""
    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for key, entry in header.items():
            if key != "__metadata__":
                count = 1
                for n in entry["shape"]:
                    count *= n
                total += count
    return total


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def _stage_cell(stage: Stage | None, what: str = "time") -> str:
    if stage is None:
        return "-"
    if not stage.ok:
        return "FAIL"
    return f"{stage.seconds:.0f}" if what == "time" else _gb(stage.peak_rss)


TABLE_COLUMNS = ("model", "params", "precision", "swap s", "onnx s", "onnx peak RSS GB", "fp32 ckpt GB",
                 "peak / fp32", "bundle GB", "ckpt GB (same precision)", "bundle / ckpt", "generate s",
                 "generate RSS GB", "weights + state GB", "RSS / (weights + state)", "check --trt")


def table_rows(rows: list[SizeRow]) -> list[list[str]]:
    out = []
    for r in rows:
        ok = r.export.ok
        resident = r.weights_bytes + r.state_bytes
        gen_ok = r.generate is not None and r.generate.ok
        out.append([
            r.model, f"{r.params / 1e6:.0f}M", r.precision, _stage_cell(r.swap), _stage_cell(r.export),
            _gb(r.export.peak_rss), _gb(r.fp32_bytes), f"{r.export.peak_rss / r.fp32_bytes:.2f}",
            _gb(r.bundle_bytes) if ok else "-",
            _gb(r.checkpoint_bytes) + (" (fp32)" if r.precision == "int8" else ""),
            f"{r.bundle_bytes / r.checkpoint_bytes:.3f}" if ok else "-",
            _stage_cell(r.generate), _stage_cell(r.generate, "rss"), _gb(resident) if ok else "-",
            f"{r.generate.peak_rss / resident:.2f}" if gen_ok and resident else "-",
            "-" if r.check is None else ("pass" if r.check.ok else "FAIL"),
        ])
    return out


def markdown_table(rows: list[SizeRow]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines)
