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
])
def test_bad_arguments_are_one_clear_error(kwargs, message):
    kwargs = {"num_kv_heads": 2, "head_dim": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        FeatureMap(**kwargs)
