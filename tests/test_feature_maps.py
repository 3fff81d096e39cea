import pytest
import torch

from t2r_export.ops.feature_maps import FeatureMap


def test_t2r_map_is_per_kv_head_and_nonnegative():
    fm = FeatureMap("t2r", num_kv_heads=3, head_dim=8, feature_dim=16)
    x = torch.randn(2, 3, 4, 5, 8)
    y = fm(x)
    assert y.shape == (2, 3, 4, 5, 16) and (y >= 0).all()
    # head 1's output depends only on head 1's weights
    with torch.no_grad():
        fm.weight[0].add_(1.0)
    torch.testing.assert_close(fm(x)[:, 1:], y[:, 1:])


def test_default_init_is_nn_linear_bound_and_identity_init_is_relu_of_first_dims():
    fm = FeatureMap("t2r", 2, 8, 4, init="default")
    assert fm.weight.abs().max() <= 8 ** -0.5 and fm.bias.abs().max() <= 8 ** -0.5
    ident = FeatureMap("t2r", 2, 8, 4, init="identity")
    x = torch.randn(1, 2, 1, 3, 8)
    torch.testing.assert_close(ident(x), torch.relu(x[..., :4]))


def test_hedgehog_is_a_softmax_over_plus_and_minus_projections():
    fm = FeatureMap("hedgehog", num_kv_heads=2, head_dim=8, feature_dim=4)
    assert fm.feature_dim == 8 and fm.weight.shape == (2, 4, 8)
    # the chosen init is LoLCATs' identity: phi(x) = softmax([x[:k], -x[:k]])
    x = torch.randn(3, 2, 2, 5, 8)
    torch.testing.assert_close(fm(x), torch.softmax(torch.cat([x[..., :4], -x[..., :4]], -1), -1))
    with torch.no_grad():
        fm.weight.normal_()
        fm.bias.normal_()
    y = fm(x)
    assert (y > 0).all()
    torch.testing.assert_close(y.sum(-1), torch.ones(3, 2, 2, 5))
    proj = torch.einsum("bhgtd,hkd->bhgtk", x, fm.weight) + fm.bias[None, :, None, None]
    torch.testing.assert_close(y, torch.softmax(torch.cat([proj, -proj], -1), -1))


def test_attention_settings_are_constructor_arguments():
    fm = FeatureMap("hedgehog", 2, 8, 4, eps=1e-3, chunk_size=16, window=7)
    assert (fm.eps, fm.chunk_size, fm.window) == (1e-3, 16, 7)
    assert FeatureMap("t2r", 2, 8, 4).window == 0


def test_elu_uses_head_dim_and_is_positive():
    fm = FeatureMap("elu", 2, 8, 32)
    assert fm.feature_dim == 8 and not list(fm.parameters())
    assert (fm(torch.randn(1, 2, 1, 3, 8)) > 0).all()


def test_rfa_features_are_fixed_by_seed_and_saved():
    a, b, c = FeatureMap("rfa", 2, 8, 16, seed=3), FeatureMap("rfa", 2, 8, 16, seed=3), FeatureMap("rfa", 2, 8, 16, seed=4)
    torch.testing.assert_close(a.omega, b.omega)
    assert not torch.equal(a.omega, c.omega)
    assert "omega" in a.state_dict() and not list(a.parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="nope"), "unknown feature map"),
    (dict(kind="t2r", feature_dim=0), "feature dim must be > 0"),
    (dict(kind="rfa", feature_dim=7), "even feature dim"),
    (dict(kind="t2r", init="xavier"), "unknown feature-map init"),
    (dict(kind="hedgehog", window=-1), "window must be >= 0"),
])
def test_bad_arguments_are_one_clear_error(kwargs, message):
    kwargs = {"num_kv_heads": 2, "head_dim": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        FeatureMap(**kwargs)
