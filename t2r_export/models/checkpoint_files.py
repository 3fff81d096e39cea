"""Checks on a model folder's files before transformers reads them, so a damaged file is one line.

A safetensors file is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
range of every tensor) and the tensor bytes; reading only the header finds truncated, empty and
garbage files without loading a weight. Dimension mismatches between config.json and the weights
are named tensor by tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# bytes per element of the safetensors dtypes
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# a header larger than this is garbage, not a model (safetensors itself refuses above 100 MB)
MAX_HEADER_BYTES = 100_000_000


def read_safetensors_header(path: Path) -> dict:
    """The tensor table of ``path``; ValueError naming the file when it is not a complete safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file: {size} bytes, too short for a header "
                             "(empty or truncated download?)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{path} is not a safetensors file: its header claims {length:,} bytes but the file "
                             f"has {size:,} (truncated or not safetensors)")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a tensor table")
    data_bytes = size - 8 - length
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    for name, info in tensors.items():
        _check_entry(path, name, info, data_bytes)
    return tensors


def _check_entry(path: Path, name: str, info, data_bytes: int) -> None:
    try:
        begin, end = (int(x) for x in info["data_offsets"])
        count = 1
        for dim in info["shape"]:
            count *= int(dim)
        width = DTYPE_BYTES[info["dtype"]]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path} is damaged: the entry of tensor {name!r} is malformed") from None
    if end > data_bytes:
        raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte {end:,} of the data but the file "
                         f"holds {data_bytes:,} (re-download or re-save it)")
    if end - begin != count * width or begin < 0:
        raise ValueError(f"{path} is damaged: tensor {name!r} spans {end - begin:,} bytes, its shape and dtype "
                         f"need {count * width:,}")


def check_weight_files(folder: Path) -> list[Path]:
    """Every ``*.safetensors`` in ``folder``, each checked; ValueError when there is none or one is damaged."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no *.safetensors weights; only safetensors are loaded "
                         "(convert .bin checkpoints with safetensors first)")
    for file in files:
        read_safetensors_header(file)
    return files


def shape_mismatches(config, files: list[Path]) -> list[str]:
    """'name: file [a, b] vs config [c, d]' for every tensor whose saved shape differs from the config's model."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        expected = {k: list(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    found = []
    for file in files:
        for name, info in read_safetensors_header(file).items():
            want = expected.get(name)
            if want is not None and [int(d) for d in info["shape"]] != want:
                found.append(f"{name}: {file.name} has {list(info['shape'])}, config.json implies {want}")
    return found
