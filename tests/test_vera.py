"""VeRA (``VeraConfig``) against dense float64 references."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.variants import VeraConfig, VeraNode, VeraProjection
from tests.test_variants import mlp, perturb, stack


def dense_vera(weight, node):
    """``W + (A[:n_in]·diag(d)) @ (B[:, :n_out]·diag(b))`` in float64 numpy."""
    a, b = (np.asarray(x, np.float64) for x in node.projection.matrices())
    layout = node.layout
    d = np.asarray(node.d, np.float64)
    bv = np.asarray(node.b, np.float64)
    delta = (a[: layout.n_in] * d[..., None, :]) @ (b[:, : layout.n_out] * bv[..., None, :])
    return np.asarray(weight, np.float64) + delta.reshape(layout.shape)


def test_shared_projection_is_sized_to_the_largest_target(key):
    params, _, _ = mlp()  # up: (7, 12), down: (12, 5)
    _, delta = jaxlora.split(params, VeraConfig(rank=16, targets="kernel"), key=key)
    up, down = delta["up"]["kernel"], delta["down"]["kernel"]
    assert up.projection == down.projection == VeraProjection(0, 16, 12, 12, None)
    chex.assert_shape([up.d, up.b, down.d, down.b], [(16,), (12,), (16,), (5,)])
    np.testing.assert_array_equal(up.d, np.float32(0.1))
    np.testing.assert_array_equal(up.b, 0.0)
    # both slice the same matrices: the first 7 rows of down's A are up's A
    a_up, _ = up.factors()
    a_down, _ = down.factors()
    np.testing.assert_allclose(a_up / up.d, (a_down / down.d)[:7], rtol=1e-6)


def test_forward_matches_the_dense_formula(key):
    params, x, apply = mlp()
    base, delta = jaxlora.split(params, VeraConfig(rank=16, targets="kernel"), key=key)
    delta = perturb(delta, key)
    dense = jax.tree.map(lambda w: w, base)
    for p in ("up", "down"):
        want = dense_vera(base[p]["kernel"], delta[p]["kernel"])
        np.testing.assert_allclose(jaxlora.merge(base, delta)[p]["kernel"], want, rtol=1e-5)
        dense[p]["kernel"] = jnp.asarray(want, jnp.float32)
    out = jax.jit(jaxlora.lora_apply(apply))(base, delta, x)
    np.testing.assert_allclose(out, apply(dense, x), rtol=1e-5, atol=1e-6)


def test_stacked_layers_have_their_own_vectors(key):
    params, _, _ = stack()  # (3, 8, 8)
    config = VeraConfig(rank=4, targets="kernel", stacked_axes=1)
    base, delta = jaxlora.split(params, config, key=key)
    delta = perturb(delta, key)
    node = delta["layers"]["proj"]["kernel"]
    chex.assert_shape([node.d, node.b], [(3, 4), (3, 8)])
    want = dense_vera(base["layers"]["proj"]["kernel"], node)
    got = jaxlora.merge(base, delta)
    np.testing.assert_allclose(got["layers"]["proj"]["kernel"], want, rtol=1e-5, atol=1e-6)
    assert jaxlora.count_parameters(base, delta).trainable == 3 * (8 + 4)


def test_projections_are_kaiming_uniform_and_keyed():
    p = VeraProjection(seed=3, rank=64, max_in=256, max_out=128)
    a, b = p.matrices()
    bound_a, bound_b = math.sqrt(6 / 256), math.sqrt(6 / 64)
    assert float(jnp.abs(a).max()) <= bound_a and float(jnp.abs(a).max()) > 0.95 * bound_a
    assert float(jnp.abs(b).max()) <= bound_b and float(jnp.abs(b).max()) > 0.95 * bound_b
    np.testing.assert_allclose(float(jnp.std(a)), bound_a / math.sqrt(3), rtol=0.05)
    np.testing.assert_array_equal(a, p.matrices()[0])  # regenerated identically
    other = VeraProjection(seed=4, rank=64, max_in=256, max_out=128).matrices()[0]
    assert not np.allclose(a, other)


def test_projection_key_selects_the_matrices(key):
    params, x, apply = mlp()
    outs = []
    for seed in (0, 0, 1):
        base, delta = jaxlora.split(
            params, VeraConfig(rank=8, targets="kernel", projection_key=seed), key=key
        )
        outs.append(jaxlora.lora_apply(apply)(base, perturb(delta, key), x))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.allclose(outs[0], outs[2])


def test_rank_may_exceed_the_weight_dimensions(key):
    params, _, _ = mlp()
    base, delta = jaxlora.split(params, VeraConfig(rank=64, targets="kernel"), key=key)
    assert delta["down"]["kernel"].rank == 64  # down is (12, 5)
    assert jaxlora.count_parameters(base, delta).trainable == (12 + 64) + (5 + 64)


def test_shared_matrices_are_no_leaves_of_the_delta(key):
    params, _, _ = mlp()
    _, delta = jaxlora.split(params, VeraConfig(rank=256, targets="kernel"), key=key)
    assert jaxlora.adapter_nbytes(delta) == 4 * ((12 + 256) + (5 + 256))
    assert isinstance(delta["up"]["kernel"], VeraNode)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(rank=0), ValueError, "rank must be >= 1"),
        (dict(rank=2.5), TypeError, "rank must be an int"),
        (dict(d_initial=0.0), ValueError, "d_initial must be a finite nonzero"),
        (dict(d_initial=float("nan")), ValueError, "d_initial"),
        (dict(projection_key=jax.random.key(0)), TypeError, "projection_key must be an int"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(targets=5), TypeError, "targets must be"),
        (dict(targets="(unclosed"), ValueError, "not a valid regular expression"),
    ],
)
def test_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        VeraConfig(**kwargs)


def test_config_is_hashable_with_mapping_fields():
    config = VeraConfig(rank=4, targets=["q", "v"], stacked_axes={"layers/": 1})
    assert hash(config) == hash(VeraConfig(rank=4, targets=("q", "v"), stacked_axes={"layers/": 1}))
