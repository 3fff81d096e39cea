"""The T2R settings a swapped model carries in its HF config (``config.t2r``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..ops.feature_maps import FEATURE_MAPS, INITS
from ..ops.linear_attention import DEFAULT_CHUNK, DEFAULT_EPS


@dataclass
class T2RConfig:
    # the paper's learned map; "elu" and "rfa" are its fixed-map baselines
    feature_map: str = "t2r"
    # k: the paper's default; state per layer is H_kv·k·(d_v+1) floats whatever the context
    feature_dim: int = 32
    # "default" = nn.Linear's init for t2r (the official code), the identity for hedgehog (LoLCATs);
    # "identity" = W = eye(k, d), b = 0 for both
    init: str = "default"
    # denominator clamp, as in the official code (fp32)
    eps: float = DEFAULT_EPS
    # chunk of the parallel form: quadratic work inside a chunk, linear memory overall
    chunk_size: int = DEFAULT_CHUNK
    # seeds the random features of "rfa" (and nothing else)
    seed: int = 0
    # 0 = off (the paper's T2R); W > 0 = LoLCATs' hybrid: exact softmax terms over the last W keys,
    # phi terms over the older ones, one normalisation; the state grows by W keys and values per layer
    window: int = 0
    # with a window: the linear part forgets, S and z are multiplied by a learned gamma per KV head
    # every step, so the model behaves alike at any length (docs/design.md#sliding-window-hybrid)
    decay: bool = False

    def __post_init__(self):
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map {self.feature_map!r}; expected one of {', '.join(FEATURE_MAPS)}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; expected one of {', '.join(INITS)}")
        if int(self.feature_dim) <= 0:
            raise ValueError(f"feature dim must be a positive integer, got {self.feature_dim}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if int(self.window) < 0:
            raise ValueError(f"window must be >= 0 (0 = off), got {self.window}")
        if self.decay and not int(self.window):
            raise ValueError("a decay needs the sliding window (window > 0): it applies to the keys that left it")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk size must be > 0, got {self.chunk_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "T2RConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
