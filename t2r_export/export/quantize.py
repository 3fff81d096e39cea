"""int8 plan: explicit Q/DQ on the weight matmuls, calibrated on decode states recorded from real prompts.

    export_int8_bundle("bundles/fp32", "bundles/int8")      # the packaged prompts and recipe

1. record: the fp32 bundle's step graph runs in ONNX Runtime over every prompt of
   the packaged ``calibration/prompts.txt`` (teacher-forced through the prompt, then greedy for a few steps); the
   feeds of those steps, with their real ``past_state`` tensors and positions, are the step graph's
   calibration data. The prefill graph gets each prompt's first half from a zero state (how a fresh
   prompt is prefilled) and its second half from the state the first half left.
2. select: MatMul nodes whose second input is an initializer (a weight), minus the fp32 island
   recorded in the graph's metadata and the scopes in the recipe's ``exclude_scopes`` (the state core
   always; the feature map by default).
3. quantize: ``onnxruntime.quantization.quantize_static``, QDQ format, int8 symmetric activations
   (TensorRT needs zero points of 0) and per-channel int8 weights, MinMax or Percentile calibration;
   matmul outputs stay float. Q/DQ nodes are renamed into the scope of the matmul they feed.
The result runs in ONNX Runtime on a CPU and parses in TensorRT (explicit quantization).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..atomic import atomic_dir
from ..cache import cache_root
from .. import contract
from .weight_file import WEIGHTS_FILE, repack_graphs

logger = logging.getLogger(__name__)

# the recipe and prompts ship inside the package (calibration/ at the repository root, mapped to
# t2r_export.calibration by pyproject.toml); read them as package resources, never beside the source
CALIBRATION_PACKAGE = "t2r_export.calibration"


def calibration_resource(name: str):
    """A packaged calibration file (an importlib.resources Traversable)."""
    from importlib import resources

    return resources.files(CALIBRATION_PACKAGE).joinpath(name)


def calibration_cache_dir() -> Path:
    """Recorded calibration feeds, under the package's one cache root; never the install tree."""
    return cache_root() / "calibration"


@dataclass
class CalibrationRecipe:
    """calibration/recipe.json; every field has the default the README explains."""

    tool: str = "onnxruntime.quantization.quantize_static"
    quant_format: str = "QDQ"
    activation_type: str = "QInt8"          # TensorRT quantizes to signed int8 only
    weight_type: str = "QInt8"
    per_channel: bool = True                # one scale per output column of each weight
    activation_symmetric: bool = True       # TensorRT requires zero points of 0
    calibrate_method: str = "MinMax"        # MinMax | Percentile | Entropy
    percentile: float = 99.999
    # the state core is fp32 by design; phi(k) feeds the un-decayed running sums
    exclude_scopes: list = field(default_factory=lambda: ["layers.*.state", "layers.*.phi", "layers.*.rope"])
    prompts: str = "prompts.txt"
    prompt_separator: str = "====="
    max_prompt_tokens: int = 128
    greedy_steps_per_prompt: int = 32
    max_step_samples: int = 2048
    calibration_batch: int = 64

    @classmethod
    def load(cls, path: str | Path | None = None) -> CalibrationRecipe:
        """``path``, or the packaged recipe.json."""
        source = Path(path) if path else calibration_resource("recipe.json")
        if not source.is_file():
            raise ValueError(f"calibration recipe {source} is missing (expected a recipe.json like the packaged one)")
        try:
            raw = json.loads(source.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"calibration recipe {source} is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"calibration recipe {source} must hold a JSON object")
        path = source
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown recipe fields {sorted(unknown)}")
        return cls(**raw)


@dataclass
class CalibrationData:
    """Recorded feeds: ``step`` batches (rows are independent steps) and one feed per ``prefill`` call."""

    step: list[dict[str, np.ndarray]]
    prefill: list[dict[str, np.ndarray]]

    @property
    def step_samples(self) -> int:
        return sum(len(feed["input_ids"]) for feed in self.step)


def load_prompts(path: str | Path | None = None, separator: str = "=====",
                 packaged: str = "prompts.txt") -> list[str]:
    """Prompts from a text file (default: the packaged ``packaged``), separated by lines that are exactly
    ``separator``."""
    if not path and (not packaged or Path(packaged).name != packaged):
        raise ValueError(f"recipe field 'prompts' = {packaged!r} must name a packaged prompts file, e.g. prompts.txt")
    path = Path(path) if path else calibration_resource(packaged)
    if not path.is_file():
        raise ValueError(f"calibration prompts {path} are missing (expected a text file of prompts)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"calibration prompts {path} cannot be read as UTF-8 text: {err}") from None
    prompts, current = [], []
    for line in text.splitlines():
        if line.strip() == separator:
            prompts.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    prompts.append("\n".join(current).strip("\n"))
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


# ---- recording -------------------------------------------------------------------------------------

def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def record_calibration(bundle_dir: Path, prompts: list[str], recipe: CalibrationRecipe,
                       tokenizer=None) -> CalibrationData:
    """Run the fp32 step graph over the prompts and keep its feeds (real states, real positions)."""
    from ..runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    tokenizer = tokenizer or bundle.load_tokenizer()
    step = _session(bundle.graph_path(contract.STEP))
    pairs = contract.state_pairs(bundle.config.num_layers, bundle.config.state_shape.parts)
    outputs = ["logits"] + [present for _, present in pairs]
    zero = {past: np.zeros((1, *s.shape[1:]), np.float32)
            for (past, _), s in zip(pairs, contract.graph_inputs(bundle.config.state_shape)[2:])}
    encoded = [ids for ids in (tokenizer.encode(p).ids[:recipe.max_prompt_tokens] for p in prompts) if len(ids) >= 2]
    if not encoded:
        raise ValueError("no calibration prompt has two tokens or more")
    # an even, deterministic subsample of the steps keeps memory and calibration time bounded
    total = sum(len(ids) + recipe.greedy_steps_per_prompt for ids in encoded)
    stride = -(-total // max(1, recipe.max_step_samples))
    rows: list[dict] = []
    prefill: list[dict] = []
    counter = 0
    for ids in encoded:
        state, tokens = dict(zero), list(ids)
        half = len(ids) // 2
        prefill.append(_ids_feed(ids[:half], 0, zero))
        for t in range(len(ids) + recipe.greedy_steps_per_prompt):
            if t == half:
                prefill.append(_ids_feed(ids[half:], half, state))
            feed = {"input_ids": np.array([[tokens[t]]], np.int64), "position_ids": np.array([[t]], np.int64), **state}
            if counter % stride == 0:
                rows.append(feed)
            counter += 1
            values = step.run(outputs, feed)
            state = {past: v for (past, _), v in zip(pairs, values[1:])}
            if t + 1 >= len(tokens):
                tokens.append(int(np.argmax(values[0][0])))
    batch = max(1, recipe.calibration_batch)
    batches = [{name: np.concatenate([r[name] for r in rows[i:i + batch]]) for name in rows[0]}
               for i in range(0, len(rows), batch)]
    return CalibrationData(batches, prefill)


def _ids_feed(ids: list[int], start: int, state: dict) -> dict:
    return {"input_ids": np.array([ids], np.int64),
            "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None], **state}


def calibration_cache_key(bundle_dir: Path, prompts: list[str], recipe: CalibrationRecipe) -> str:
    h = hashlib.sha256()
    from ..runtime.bundle import load_bundle

    h.update(load_bundle(bundle_dir).graph_path(contract.STEP).read_bytes())
    # the graph proto holds no weights any more: two checkpoints of one shape differ only in weights.bin
    weights = Path(bundle_dir) / WEIGHTS_FILE
    if weights.is_file():
        with open(weights, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    h.update("\0".join(prompts).encode())
    recording = {k: getattr(recipe, k) for k in ("max_prompt_tokens", "greedy_steps_per_prompt", "max_step_samples",
                                                  "calibration_batch")}
    h.update(json.dumps(recording, sort_keys=True).encode())
    return h.hexdigest()[:16]


def cached_calibration(bundle_dir: Path, prompts: list[str], recipe: CalibrationRecipe,
                       cache_dir: Path | None = None) -> CalibrationData:
    """:func:`record_calibration`, stored as ``cache_dir/calib-<key>.npz`` (default :func:`calibration_cache_dir`)."""
    cache_dir = Path(cache_dir) if cache_dir else calibration_cache_dir()
    path = cache_dir / f"calib-{calibration_cache_key(bundle_dir, prompts, recipe)}.npz"
    if path.is_file():
        with np.load(path) as archive:
            return _unpack(dict(archive))
    data = record_calibration(bundle_dir, prompts, recipe)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **_pack(data))
    tmp.replace(path)
    return data


def _pack(data: CalibrationData) -> dict:
    out = {}
    for group, feeds in (("step", data.step), ("prefill", data.prefill)):
        for i, feed in enumerate(feeds):
            out.update({f"{group}/{i}/{name}": value for name, value in feed.items()})
    return out


def _unpack(arrays: dict) -> CalibrationData:
    groups: dict = {"step": {}, "prefill": {}}
    for key, value in arrays.items():
        group, index, name = key.split("/", 2)
        groups[group].setdefault(int(index), {})[name] = value
    return CalibrationData(*[[feeds[i] for i in sorted(feeds)] for feeds in (groups["step"], groups["prefill"])])


# ---- selecting and quantizing ------------------------------------------------------------------------

def island(model: onnx.ModelProto) -> set[str]:
    value = next((p.value for p in model.metadata_props if p.key == contract.ISLAND_KEY), "")
    return {name for name in value.split(",") if name}


def weight_matmul_nodes(model: onnx.ModelProto, exclude_scopes=("layers.*.state",)) -> list[str]:
    """MatMul nodes whose second input is a weight, outside the fp32 island and the excluded scopes."""
    weights = {t.name for t in model.graph.initializer}
    skip = island(model)
    selected = []
    for node in model.graph.node:
        scope = node.name.split("/")[0]
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in weights or node.name in skip:
            continue
        if any(fnmatch.fnmatchcase(scope, pattern) for pattern in exclude_scopes):
            continue
        selected.append(node.name)
    return selected


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self.index = 0

    def get_next(self):
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def rewind(self) -> None:
        self.index = 0


def quantize_graph(src: Path, dst: Path, feeds: list[dict], recipe: CalibrationRecipe) -> list[str]:
    """Q/DQ the weight matmuls of ``src`` into ``dst``; returns the quantized matmul names."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(str(src))
    nodes = weight_matmul_nodes(model, recipe.exclude_scopes)
    # a tied embedding stays fp32 and shared: quantizing its lm head would put a full-size
    # DequantizeLinear in front of the lookup's Gather, run on every call
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    nodes = [n.name for n in model.graph.node if n.name in set(nodes) and n.input[1] not in gathered]
    if not nodes:
        raise ValueError(f"{src.name} has no weight matmul to quantize")
    class Reader(_FeedReader, CalibrationDataReader):
        pass

    reader = Reader(feeds)
    options = {"ActivationSymmetric": recipe.activation_symmetric, "WeightSymmetric": True,
               "OpTypesToExcludeOutputQuantization": ["MatMul"], "DedicatedQDQPair": True}
    if recipe.calibrate_method == "Percentile":
        options["CalibPercentile"] = recipe.percentile
    # external data: a quantized graph above 2 GB is still written (repack_graphs then shares its weights)
    quantize_static(str(src), str(dst), reader, use_external_data_format=True, quant_format=getattr(QuantFormat, recipe.quant_format),
                    op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, per_channel=recipe.per_channel,
                    activation_type=getattr(QuantType, recipe.activation_type),
                    weight_type=getattr(QuantType, recipe.weight_type),
                    calibrate_method=getattr(CalibrationMethod, recipe.calibrate_method), extra_options=options)
    quantized = onnx.load(str(dst))
    _name_qdq_by_consumer(quantized)
    # quantize_static may raise the IR version; keep what TensorRT 10's parser and older runtimes read
    quantized.ir_version = model.ir_version
    onnx.helper.set_model_props(quantized, {**{p.key: p.value for p in quantized.metadata_props
                                               if p.key != "onnx.infer"}, contract.PRECISION_KEY: "int8"})
    onnx.save_model(quantized, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    onnx.checker.check_model(str(dst), full_check=True)
    return nodes


def _name_qdq_by_consumer(model: onnx.ModelProto) -> None:
    """``layers.0.mlp.in/MatMul_12/DequantizeLinear_x``: Q/DQ nodes named in the scope of the matmul they feed."""
    consumers = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0][0].op_type != "MatMul":
            continue
        matmul, index = users[0]
        role = "w" if index == 1 else "x"
        node.name = f"{matmul.name}/DequantizeLinear_{role}"
        for producer in model.graph.node:
            if producer.op_type == "QuantizeLinear" and producer.output[0] == node.input[0]:
                producer.name = f"{matmul.name}/QuantizeLinear_{role}"


# ---- the bundle ---------------------------------------------------------------------------------------

@dataclass
class Int8Result:
    out: Path
    runtime: contract.RuntimeConfig
    quantized: dict[str, list[str]]
    calibration: CalibrationData


def export_int8_bundle(fp32_bundle_dir: str | Path, out: str | Path, prompts: str | Path | list[str] | None = None,
                       recipe: str | Path | CalibrationRecipe | None = None, cache_dir: Path | None = None,
                       overwrite: bool = True, progress: Callable[[str], None] | None = None,
                       check: Callable[[Path, contract.RuntimeConfig], contract.VerificationRecord] | None = None,
                       ) -> Int8Result:
    """An int8 bundle at ``out`` from a verified fp32 bundle, written atomically.

    ``check(folder, runtime)`` verifies the assembled bundle before it is moved into place and
    returns the record runtime.json keeps; raising stops the export with nothing left at ``out``.
    """
    import onnxruntime

    from ..runtime.bundle import load_bundle

    progress = progress or (lambda message: logger.info(message))
    fp32_bundle_dir = Path(fp32_bundle_dir)
    source = load_bundle(fp32_bundle_dir)
    if source.config.precision != "fp32":
        raise ValueError(f"{fp32_bundle_dir} is a {source.config.precision} bundle; int8 is calibrated from an fp32 "
                         "bundle (`t2r-export onnx --precision fp32`)")
    recipe = recipe if isinstance(recipe, CalibrationRecipe) else CalibrationRecipe.load(recipe)
    if isinstance(prompts, list):
        prompt_list = prompts
    else:
        prompt_list = load_prompts(prompts, recipe.prompt_separator, packaged=recipe.prompts)
    progress(f"recording calibration states from {len(prompt_list)} prompts")
    data = cached_calibration(fp32_bundle_dir, prompt_list, recipe, cache_dir)
    quantized = {}
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        graphs = {}
        for kind, feeds in ((contract.STEP, data.step), (contract.PREFILL, data.prefill)):
            progress(f"quantizing {kind}.onnx on {len(feeds)} calibration feeds")
            graphs[kind] = dataclasses.replace(source.config.graphs[kind], file=f"{kind}.onnx")
            quantized[kind] = quantize_graph(source.graph_path(kind), tmp / graphs[kind].file, feeds, recipe)
        # both quantized graphs read one weights file, the way fp32 bundles do
        repack_graphs(tmp, [graphs[kind].file for kind in contract.GRAPH_KINDS])
        for name in contract.TOKENIZER_FILES:
            if source.file(name).is_file():
                shutil.copy2(source.file(name), tmp / name)
        runtime = source.config.replace(precision="int8", state_dtype=contract.STATE_DTYPES["int8"], graphs=graphs,
                                        verification=None, quantization={
            "tool": recipe.tool, "onnxruntime": onnxruntime.__version__, "recipe": asdict(recipe),
            "prompts": len(prompt_list),
            "prompts_sha256": hashlib.sha256("\0".join(prompt_list).encode()).hexdigest(),
            "step_samples": data.step_samples, "prefill_samples": len(data.prefill),
            "quantized_matmuls": {kind: len(names) for kind, names in quantized.items()},
        })
        if check is not None:
            progress("verifying the int8 bundle against the fp32 model")
            runtime = runtime.replace(verification=check(tmp, runtime))
        (tmp / contract.RUNTIME_JSON).write_text(runtime.to_json())
    logger.info("wrote int8 bundle %s", out)
    return Int8Result(Path(out), runtime, quantized, data)
