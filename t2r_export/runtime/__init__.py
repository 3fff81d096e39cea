"""The torch-free decode runtime: numpy + onnxruntime + tokenizers (TensorRT later), nothing else.

    from t2r_export.runtime import OrtDecoder, SamplingParams, generate, load_bundle

    bundle = load_bundle("bundle/")
    with OrtDecoder(bundle, provider="cpu") as decoder:
        result = generate(decoder, bundle.load_tokenizer(), ["def main(", "import "], max_new_tokens=32)
    print(result.texts, result.timing.tokens_per_s)

This package must never import torch, transformers or ``t2r_export.models`` (a test enforces it),
so it installs on a Jetson with the base ``pip install t2r-export``.
"""

from .bundle import Bundle, BundleError, RuntimeConfig, TensorInfo, inspect_bundle, load_bundle
from .generate import (Decoder, GenerationError, GenerationResult, NonFiniteLogitsError, RowOutput, Timing,
                       check_prompts, generate, generate_ids)
from .ort_backend import PROVIDERS, OrtDecoder, ProviderError, resolve_providers
from .sampling import Sampler, SamplingParams, sample_row

__all__ = [
    "Bundle", "BundleError", "Decoder", "GenerationError", "GenerationResult", "NonFiniteLogitsError",
    "OrtDecoder", "PROVIDERS", "ProviderError", "RowOutput", "RuntimeConfig", "Sampler", "SamplingParams",
    "TensorInfo", "Timing", "check_prompts", "generate", "generate_ids", "inspect_bundle", "load_bundle",
    "resolve_providers", "sample_row",
]
