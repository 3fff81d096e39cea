"""The plain prefill graph (export/prefill_graph.py): its chunk layout against torch and against the
general emitter's [B, T] layout, for each kind of RoPE (none, full, partial) and of feature map
(phi(0) is not 0 for most of them, so the padding to whole chunks must be kept out of the sums)."""

import numpy as np
import onnx
import pytest
import torch

from conftest import make_tiny_model, prefill_in_pieces
from t2r_export import contract
from t2r_export.export.graph import DecoderEmitter, build_graph, rotate_half_blocks
from t2r_export.export.prefill_graph import CHUNK
from t2r_export.export.verify import _run, _state_feeds, ort_session
from t2r_export.export.weights import _rotate_half_matrix, extract_decoder
from t2r_export.models import T2RConfig, new_state, swap_attention
from t2r_export.tolerances import check_close

# gpt2: learned positions, elu (phi(0) = 1); gpt_neox: partial rotary (three blocks of head dims);
# qwen2: q/k/v biases; hedgehog and rfa: features that are never 0
CASES = [("llama", "t2r"), ("gpt2", "elu"), ("gpt_neox", "t2r"), ("qwen2", "hedgehog"), ("mistral", "rfa")]


def _model(arch: str, feature_map: str):
    return swap_attention(make_tiny_model(arch), T2RConfig(feature_map=feature_map, feature_dim=16)).eval()


def _random_state(model, num_layers: int, batch: int, seed: int) -> dict:
    """A partly filled state: non-negative sums, as phi >= 0 gives them."""
    rng = np.random.default_rng(seed)
    feeds = _state_feeds(new_state(model, batch), num_layers)
    return {name: rng.random(value.shape, dtype=np.float32) for name, value in feeds.items()}


@pytest.mark.parametrize("arch, feature_map", CASES)
def test_prefill_in_pieces_matches_torch(arch, feature_map, tmp_path):
    """Pieces of 5 tokens, then more, then more than a chunk (none a multiple of the chunk), batch 2,
    each from the state the piece before left: torch's logits and final state."""
    model = _model(arch, feature_map)
    dec = extract_decoder(model)
    onnx.save(build_graph(dec, contract.PREFILL), tmp_path / "prefill.onnx")
    session = ort_session(str(tmp_path / "prefill.onnx"))
    # gpt2's learned position table ends at 128
    cuts = (0, 5, 48, 127) if arch == "gpt2" else (0, 5, CHUNK + 11, 3 * CHUNK + 9)
    assert all(length % CHUNK for length in np.diff(cuts)) and cuts[-1] - cuts[-2] > CHUNK
    ids = torch.randint(0, 300, (2, cuts[-1]), generator=torch.Generator().manual_seed(3))
    got, feeds, expected, state = prefill_in_pieces(session, model, ids, cuts, len(dec.layers))
    check_close(f"{arch}/{feature_map} prefill in pieces: logits", got, expected, ("ort", "fp32"))
    for i in range(len(dec.layers)):
        for part, value in (("s", state.s[i]), ("z", state.z[i])):
            check_close(f"{arch}/{feature_map} prefill in pieces: {part}.{i}", feeds[contract.past_name(i, part)],
                        value.numpy(), ("ort-state", "fp32"), relative=True)


@pytest.mark.parametrize("arch, feature_map", [("llama", "t2r"), ("gpt_neox", "elu")])
def test_the_chunk_layout_equals_the_general_emitters_layout(arch, feature_map, tmp_path):
    """The same prompt and partly filled state through both emitters' prefill: the same logits and state."""
    model = _model(arch, feature_map)
    dec = extract_decoder(model)
    onnx.save(build_graph(dec, contract.PREFILL), tmp_path / "chunked.onnx")
    onnx.save(DecoderEmitter(dec, contract.PREFILL).build(), tmp_path / "general.onnx")
    chunked, general = ort_session(str(tmp_path / "chunked.onnx")), ort_session(str(tmp_path / "general.onnx"))
    assert len(chunked.get_inputs()) == len(general.get_inputs())
    state = _random_state(model, len(dec.layers), 2, seed=4)
    ids = np.random.default_rng(5).integers(0, 300, (2, CHUNK + 5))
    pos = np.tile(np.arange(7, 7 + CHUNK + 5, dtype=np.int64), (2, 1))
    got, got_state = _run(chunked, ids, pos, state, len(dec.layers))
    want, want_state = _run(general, ids, pos, state, len(dec.layers))
    check_close("chunk layout vs general: logits", got["logits"], want["logits"], ("ort-prefill", "fp32"))
    for name, value in want_state.items():
        check_close(f"chunk layout vs general: {name}", got_state[name], value, ("ort-prefill", "fp32"),
                    relative=True)


def test_the_prefill_moves_each_layer_into_the_chunk_layout_once():
    """Per layer one Pad and one Transpose take q|k|v into the chunk layout; the core adds v's constant-1
    channel (a Pad), the keys' and the output's Transposes and the Gather of the first T rows; RoPE
    swaps blocks of head dims (no Gather of single dims)."""
    dec = extract_decoder(_model("llama", "t2r"))
    nodes = build_graph(dec, contract.PREFILL).graph.node
    layers = len(dec.layers)
    per_layer = {op: len([n for n in nodes if n.op_type == op and n.name.startswith("layers.")]) / layers
                 for op in ("Pad", "Transpose", "Gather")}
    assert per_layer == {"Pad": 2, "Transpose": 3, "Gather": 1}
    assert not [n for n in nodes if n.op_type == "Gather" and ".rope/" in n.name]


@pytest.mark.parametrize("head_dim, rotary_dim", [(8, 8), (12, 4), (16, 6)])
def test_rotate_half_is_a_swap_of_blocks(head_dim, rotary_dim):
    rotate = _rotate_half_matrix(head_dim, rotary_dim)
    sizes, order, sign = rotate_half_blocks(rotate)
    x = np.random.default_rng(0).random((3, head_dim), dtype=np.float32)
    blocks = np.split(x, np.cumsum(sizes)[:-1], axis=-1)
    np.testing.assert_array_equal(sign * np.concatenate([blocks[j] for j in order], axis=-1), x @ rotate)
    # the rotary halves swap; pass-through dims stay one block
    assert len(sizes) == (2 if rotary_dim == head_dim else 3)


def test_a_rotation_that_is_no_signed_permutation_is_refused():
    rotate = _rotate_half_matrix(8, 8)
    rotate[0, 0] = 0.5
    with pytest.raises(ValueError, match="rotate_half is not a signed permutation"):
        rotate_half_blocks(rotate)
