"""The bundled T2R model exported and served (slow: the export takes most of a minute)."""

from __future__ import annotations

import numpy as np
import pytest

from t2r_export.runtime import OrtDecoder, SamplingParams, load_bundle
from t2r_export.runtime.resume import feed_row, generate_resumed
from t2r_export.runtime.state import bundle_identity, load_state, save_state
from t2r_export.tolerances import TOLERANCES

from hostile_helpers import invoke

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled") / "t2r"
    result = invoke(["onnx", "-o", out])
    assert result.exit_code == 0, result.output
    return load_bundle(out)


def test_batched_logits_equal_single_row_logits_at_batch_64(bundle):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, bundle.config.vocab_size, rng.integers(4, 30)) for _ in range(64)]
    with OrtDecoder(bundle, threads=1) as batched, OrtDecoder(bundle, threads=1) as single:
        batched.reset(64)
        single.reset(1)
        for row, ids in enumerate(prompts):
            feed_row(batched, row, ids, 0, fresh=True)
        for t in range(5):
            before = [batched.read_row(row) for row in range(64)]
            tokens = rng.integers(3, bundle.config.vocab_size, (64, 1))
            positions = np.array([[len(p) + t] for p in prompts])
            logits = batched.step(tokens, positions).copy()
            for row in range(64):
                single.write_row(0, before[row])
                alone = single.step(tokens[row:row + 1], positions[row:row + 1])
                np.testing.assert_allclose(logits[row:row + 1], alone, rtol=0,
                                           atol=TOLERANCES[("ort-batched-row", "fp32")])


def test_a_saved_stream_of_the_bundled_model_continues_token_identical(bundle, tmp_path):
    tokenizer, identity = bundle.load_tokenizer(), bundle_identity(bundle)
    ids = tokenizer.encode("def main(").ids
    sampling = SamplingParams(temperature=0.8, seed=3)
    with OrtDecoder(bundle, threads=1) as decoder:
        whole, _, _ = generate_resumed(decoder, tokenizer, ids, identity, None, 100, sampling)
        first, _, state = generate_resumed(decoder, tokenizer, ids, identity, None, 40, sampling)
        save_state(tmp_path / "s.safetensors", state)
        rest, _, _ = generate_resumed(decoder, tokenizer, [], identity,
                                      load_state(tmp_path / "s.safetensors", bundle.config, identity), 60, sampling)
    assert first.token_ids + rest.token_ids == whole.token_ids
