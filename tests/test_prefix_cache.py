"""The prefix cache: a hit reproduces the uncached run, the byte bound holds, LRU order (runtime/prefix_cache.py)."""

from __future__ import annotations

import numpy as np
import pytest

from t2r_export.runtime import OrtDecoder, load_bundle
from t2r_export.runtime.prefix_cache import PrefixCache, prefill_cached, prefill_many
from t2r_export.runtime.state import bundle_identity
from t2r_export.tolerances import TOLERANCES

from toy_bundle import build_toy_bundle

PREFILL_TOL = TOLERANCES[("ort-prefill", "fp32")]
SYSTEM = "You are a helpful assistant. Answer in Python.\n"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(build_toy_bundle(tmp_path_factory.mktemp("cache") / "bundle", max_position=512))


@pytest.fixture(scope="module")
def decoder(bundle):
    with OrtDecoder(bundle, threads=1) as dec:
        dec.reset(2)
        yield dec


def _greedy(decoder, row, logits, position, steps=20):
    tokens = []
    for t in range(steps):
        tokens.append(int(np.argmax(logits[0])))
        ids = np.full((decoder.batch, 1), 3, np.int64)
        ids[row, 0] = tokens[-1]
        positions = np.zeros((decoder.batch, 1), np.int64)
        positions[row, 0] = position + t
        logits = decoder.step(ids, positions)[row:row + 1]
    return tokens


def test_a_hit_gives_the_tokens_and_logits_of_no_cache(bundle, decoder):
    tokenizer, identity = bundle.load_tokenizer(), bundle_identity(bundle)
    system = tokenizer.encode(SYSTEM).ids
    first = system + tokenizer.encode("def main():", add_special_tokens=False).ids
    second = system + tokenizer.encode("import os", add_special_tokens=False).ids
    cache = PrefixCache()
    _, reused = prefill_cached(decoder, 0, first, cache, identity, cache_points=[len(system)])
    assert reused == 0 and len(cache) == 2
    cached_logits, reused = prefill_cached(decoder, 1, second, cache, identity)
    assert reused == len(system) and cache.hits == 1
    cached_tokens = _greedy(decoder, 1, cached_logits, len(second))
    plain_logits, reused = prefill_cached(decoder, 1, second, None, identity)
    assert reused == 0
    np.testing.assert_allclose(cached_logits, plain_logits, rtol=PREFILL_TOL, atol=PREFILL_TOL)
    assert cached_tokens == _greedy(decoder, 1, plain_logits, len(second))
    assert len(set(cached_tokens)) > 1


def test_an_exact_hit_runs_no_graph(bundle, decoder):
    identity = bundle_identity(bundle)
    ids = bundle.load_tokenizer().encode("for i in range(10):").ids
    cache = PrefixCache()
    logits, _ = prefill_cached(decoder, 0, ids, cache, identity)
    state = decoder.read_row(0)
    calls = []
    real = decoder.prefill_row
    decoder.prefill_row = lambda *a: calls.append(a) or real(*a)
    try:
        again, reused = prefill_cached(decoder, 1, ids, cache, identity)
    finally:
        del decoder.prefill_row
    assert reused == len(ids) and calls == []
    np.testing.assert_array_equal(again, logits)
    for name, value in decoder.read_row(1).items():
        np.testing.assert_array_equal(value, state[name])


def test_eviction_respects_the_byte_bound_least_recently_used_first(bundle, decoder):
    identity = bundle_identity(bundle)
    decoder.reset(2)
    tensors, logits = decoder.read_row(0), np.zeros((1, bundle.config.vocab_size), np.float32)
    size = sum(a.nbytes for a in tensors.values()) + logits.nbytes
    cache = PrefixCache(max_bytes=int(2.5 * size))
    for ids in ([5], [5, 6], [7]):
        assert cache.put(identity, ids, tensors, logits)
        if ids == [5, 6]:
            # touch [5]: [5, 6] is now the least recently used
            assert cache.longest(identity, [5, 9])[0] == 1
        assert cache.nbytes <= cache.max_bytes
    assert [key[1] for key in cache.keys()] == [(5,), (7,)]
    assert cache.nbytes == 2 * size
    # one entry larger than the bound is refused, not stored over the bound
    assert not PrefixCache(max_bytes=size - 1).put(identity, [1], tensors, logits)


def test_entries_are_per_bundle(bundle, decoder):
    cache = PrefixCache()
    tensors, logits = decoder.read_row(0), np.zeros((1, bundle.config.vocab_size), np.float32)
    cache.put("bundle-a", [5, 6], tensors, logits)
    assert cache.longest("bundle-b", [5, 6, 7]) == (0, None)
    assert cache.longest("bundle-a", [5, 6, 7])[0] == 2
    assert cache.longest("bundle-a", [5]) == (0, None)


def test_prefill_many_groups_equal_fresh_prompts_and_equals_each_alone(bundle):
    """Fresh prompts of equal length go through one prefill call; cached and odd ones go on alone."""
    identity, rng = bundle_identity(bundle), np.random.default_rng(5)
    vocab = bundle.config.vocab_size
    head = list(rng.integers(3, vocab, 6))
    prompts = [list(rng.integers(3, vocab, 9)) for _ in range(3)] + [head + list(rng.integers(3, vocab, 4)),
                                                                     list(rng.integers(3, vocab, 5))]
    tol = TOLERANCES[("ort-batched-row", "fp32")]
    with OrtDecoder(bundle, threads=1) as together, OrtDecoder(bundle, threads=1) as alone:
        together.reset(6)
        alone.reset(6)
        cache = PrefixCache()
        # the fourth prompt starts with a cached prefix: restored, then only its rest prefilled
        prefill_cached(together, 5, head, cache, identity)
        calls = []
        original = together.prefill_rows
        together.prefill_rows = lambda first, ids, pos: calls.append((first, ids.shape)) or original(first, ids, pos)
        results = prefill_many(together, 0, prompts, cache, identity)
        assert calls == [(0, (3, 9)), (4, (1, 5))]
        assert [reused for _, reused in results] == [0, 0, 0, 6, 0]
        for row, (ids, (logits, _)) in enumerate(zip(prompts, results)):
            expected, _ = prefill_cached(alone, row, ids, None, identity)
            np.testing.assert_allclose(logits, expected, rtol=0, atol=tol)
            for name, value in alone.read_row(row).items():
                np.testing.assert_allclose(together.read_row(row)[name], value, rtol=0, atol=tol)


def test_max_tokens_bounds_every_graph_call_and_changes_no_result(bundle):
    """With ``max_tokens`` no prefill call takes more tokens (rows x length); the logits, states and cache
    entries are those of the unbounded prefill (a T2R state continues exactly across pieces)."""
    identity, rng = bundle_identity(bundle), np.random.default_rng(7)
    vocab = bundle.config.vocab_size
    head = list(rng.integers(3, vocab, 5))
    # equal lengths (split by rows), one longer than the bound (in pieces), a cached head, a cache point
    prompts = [list(rng.integers(3, vocab, 6)) for _ in range(3)] + [list(rng.integers(3, vocab, 23)),
                                                                     head + list(rng.integers(3, vocab, 9)),
                                                                     list(rng.integers(3, vocab, 14))]
    points = [(), (), (), (), (), (11,)]
    tol = TOLERANCES[("ort-prefill", "fp32")]
    with OrtDecoder(bundle, threads=1) as bounded, OrtDecoder(bundle, threads=1) as whole:
        bounded.reset(7)
        whole.reset(7)
        caches = PrefixCache(), PrefixCache()
        for dec, cache in zip((bounded, whole), caches):
            prefill_cached(dec, 6, head, cache, identity)
        tokens = []
        for name in ("prefill_rows", "extend_row"):
            original = getattr(bounded, name)
            setattr(bounded, name, lambda first, ids, pos, original=original: tokens.append(ids.size)
                    or original(first, ids, pos))
        results = prefill_many(bounded, 0, prompts, caches[0], identity, points, max_tokens=8)
        expected = prefill_many(whole, 0, prompts, caches[1], identity, points)
        assert tokens and max(tokens) == 8
        assert sum(tokens) == sum(len(p) for p in prompts) - len(head)
        assert [reused for _, reused in results] == [reused for _, reused in expected] == [0, 0, 0, 0, 5, 0]
        assert sorted(caches[0].keys()) == sorted(caches[1].keys())
        for row, ((logits, _), (want, _)) in enumerate(zip(results, expected)):
            np.testing.assert_allclose(logits, want, rtol=0, atol=tol)
            for name, value in whole.read_row(row).items():
                np.testing.assert_allclose(bounded.read_row(row)[name], value, rtol=0, atol=tol)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        prefill_many(bounded, 0, prompts[:1], None, identity, max_tokens=0)
