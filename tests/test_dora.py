"""DoRA (``LoraConfig(use_dora=True)``) against dense float64 references."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxlora
from jaxlora import LoraNode
from jaxlora._paths import Layout
from jaxlora.variants import DoraNode
from tests.test_variants import heads, normal, perturb, stack


def dense_dora(weight, node):
    """``m · (W + s·a@b) / ||W + s·a@b||`` in float64 numpy, in the weight's shape."""
    layout = node.layout
    w = np.asarray(weight, np.float64).reshape(layout.matrix_shape)
    delta = float(node.scale) * np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)
    v = w + delta
    norm = np.sqrt(np.sum(v * v, axis=-2, keepdims=True))
    return (np.asarray(node.m, np.float64)[..., None, :] * v / norm).reshape(layout.shape)


def _split(params, key, rank=2, **kw):
    config = jaxlora.LoraConfig(rank=rank, targets="kernel", use_dora=True, **kw)
    base, delta = jaxlora.split(params, config, key=key)
    return base, perturb(delta, jax.random.fold_in(key, 1), scale=0.2)


def test_split_builds_dora_nodes_with_magnitudes_at_the_column_norms(key):
    params, _, _ = heads()  # query: (6, 2, 4): m has one entry per (head, head_dim)
    _, delta = jaxlora.split(
        params,
        jaxlora.LoraConfig(rank=2, targets="kernel", use_dora=True, input_axes={"out/": 2}),
        key=key,
    )
    node = delta["query"]["kernel"]
    assert isinstance(node, DoraNode)
    chex.assert_shape(node.m, (8,))
    w = np.asarray(params["query"]["kernel"], np.float64).reshape(6, 8)
    np.testing.assert_allclose(node.m, np.linalg.norm(w, axis=0), rtol=1e-6)
    np.testing.assert_allclose(node.base_norm.value, np.linalg.norm(w, axis=0), rtol=1e-6)
    assert node.m.dtype == jnp.float32
    chex.assert_shape(delta["out"]["kernel"].m, (6,))  # out: (2, 4, 6) reads (in=8, out=6)


@pytest.mark.parametrize("path", ["query", "out"])
def test_forward_matches_the_dense_formula(key, path):
    params, x, apply = heads()
    base, delta = _split(params, key, input_axes={"out/": 2})
    node = delta[path]["kernel"]
    expected = dense_dora(base[path]["kernel"], node)
    np.testing.assert_allclose(jaxlora.merge(base, delta)[path]["kernel"], expected, rtol=2e-5)
    # the use-site program computes the same model as the dense weights
    dense = jax.tree.map(lambda w: w, base)
    for p in ("query", "out"):
        dense[p]["kernel"] = jnp.asarray(dense_dora(base[p]["kernel"], delta[p]["kernel"]))
    out = jax.jit(jaxlora.lora_apply(apply))(base, delta, x)
    np.testing.assert_allclose(out, apply(dense, x), rtol=2e-5, atol=2e-6)


def test_stacked_forward_matches_the_dense_formula(key):
    params, x, apply = stack()
    base, delta = _split(params, key, stacked_axes=1)
    node = delta["layers"]["proj"]["kernel"]
    chex.assert_shape(node.m, (3, 8))
    dense = {"layers": {"proj": dict(base["layers"]["proj"])}}
    dense["layers"]["proj"]["kernel"] = jnp.asarray(
        dense_dora(base["layers"]["proj"]["kernel"], node), jnp.float32
    )
    out = jax.jit(jaxlora.lora_apply(apply))(base, delta, x)
    np.testing.assert_allclose(out, apply(dense, x), rtol=2e-5, atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("groups", [1, 4])
def test_dora_on_convolutions_and_embeddings_is_factored_and_matches_the_dense_formula(key, groups):
    """A conv kernel (kh, kw, in/groups, out) and an embedding table: no weight merged at use."""
    params = {
        "conv": {"kernel": normal(3, 3, 4 // groups, 8, seed=1)},
        "embed": {"kernel": normal(10, 8, seed=2)},
    }

    def apply(p, x, ids):
        y = jax.lax.conv_general_dilated(
            x,
            p["conv"]["kernel"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )
        return y.mean((1, 2)) + jnp.take(p["embed"]["kernel"], ids, axis=0)

    base, delta = _split(params, key, input_axes={"conv/": 3})
    dense = {p: {"kernel": jnp.asarray(dense_dora(base[p]["kernel"], delta[p]["kernel"]),
                                       jnp.float32)} for p in params}  # fmt: skip
    x, ids = normal(2, 5, 5, 4, seed=3), jnp.array([1, 7])
    f = jaxlora.lora_apply(apply, strict=True)
    np.testing.assert_allclose(jax.jit(f)(base, delta, x, ids), apply(dense, x, ids),
                               rtol=2e-5, atol=2e-5)  # fmt: skip
    loss = lambda d, strategy: jnp.sum(
        jnp.sin(jaxlora.lora_apply(apply, strategy=strategy)(base, d, x, ids))
    )
    got, ref = jax.grad(loss)(delta, "use-site"), jax.grad(loss)(delta, "merge")
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


# Shapes come from small sets so that the jitted checks compile a few times, not per example.
_dims = st.sampled_from([1, 3, 5])


@functools.partial(jax.jit, static_argnums=3)
def _norms(w, a, b, scale):
    stacked = w.shape[:-2]
    layout = Layout(stacked, w.shape[-2:-1], w.shape[-1:])
    node = DoraNode(a, b, jnp.ones(w.shape[:-2] + w.shape[-1:]), scale=scale, layout=layout)
    return node.weight_norm(w)


@settings(max_examples=12, deadline=None)
@given(_dims, _dims, st.sampled_from([1, 2]), st.sampled_from([(), (2,)]), st.integers(0, 2**16))
def test_weight_norm_without_the_merged_weight_equals_the_direct_norm(n_in, n_out, r, s, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((*s, n_in, n_out)).astype(np.float32)
    a = rng.standard_normal((*s, n_in, r)).astype(np.float32)
    b = rng.standard_normal((*s, r, n_out)).astype(np.float32)
    full = w.astype(np.float64) + 0.7 * a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(
        _norms(w, a, b, 0.7), np.linalg.norm(full, axis=-2), rtol=1e-4, atol=1e-5
    )


def test_norm_is_a_constant_in_the_backward_pass(key):
    w = normal(5, 4)
    base, delta = _split({"kernel": w}, key)
    node = delta["kernel"]
    x = normal(3, 5, seed=3)
    f = jaxlora.lora_apply(lambda p, x: x @ p["kernel"])

    def by_hand(a, b, m, stop):
        v = w + node.scale * a @ b
        n = jnp.linalg.norm(v, axis=0)
        n = jax.lax.stop_gradient(n) if stop else n
        return jnp.sum(jnp.sin(x @ (m * v / n)))

    def use_site(a, b, m):
        new = dataclasses.replace(node, a=a, b=b, m=m)
        return jnp.sum(jnp.sin(f(base, {"kernel": new}, x)))

    args = (node.a, node.b, node.m)
    got = jax.grad(use_site, argnums=(0, 1, 2))(*args)
    want = jax.grad(by_hand, argnums=(0, 1, 2))(*args, True)
    full = jax.grad(by_hand, argnums=(0, 1, 2))(*args, False)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got[0], full[0], rtol=1e-3)  # not the full derivative


def _round_trip(w, a, b):
    layout = Layout((), w.shape[:1], w.shape[1:])
    # made eagerly: the base norm is a constant of the node, which tracing cannot give
    node = DoraNode.from_lora(LoraNode(a, b, scale=0.5, layout=layout), w)
    return _merge_unmerge(w, dataclasses.replace(node, m=node.m * 1.3))  # a trained magnitude


@jax.jit
def _merge_unmerge(w, node):
    merged = jaxlora.merge({"w": w}, {"w": node})
    back = jaxlora.unmerge(merged, {"w": node})
    again = jaxlora.merge(back, {"w": node})
    return node.delta_weight(), merged["w"], back["w"], again["w"]


@settings(max_examples=12, deadline=None)
@given(_dims, _dims, st.sampled_from([0.1, 0.5, 2.0]), st.integers(0, 2**16))
def test_unmerge_recovers_the_base_exactly(n_in, n_out, size, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    a = (size * rng.standard_normal((n_in, 1))).astype(np.float32)
    b = (size * rng.standard_normal((1, n_out))).astype(np.float32)
    delta, merged, back, again = _round_trip(w, a, b)
    # exact in the documented regime: W·(W + Δ) >= 0 for every column
    ok = np.sum(w * (w + np.asarray(delta)), axis=0) > 0
    np.testing.assert_allclose(np.asarray(back)[:, ok], w[:, ok], rtol=1e-4, atol=1e-5)
    # in every regime, unmerge returns a weight that merges to the same merged weight
    np.testing.assert_allclose(again, merged, rtol=1e-4, atol=1e-5)


def test_unmerge_without_base_norm_raises(key):
    base, delta = _split({"kernel": normal(5, 4)}, key)
    bare = {"kernel": dataclasses.replace(delta["kernel"], base_norm=None)}
    merged = jaxlora.merge(base, bare)  # merging needs no base norm
    with pytest.raises(ValueError, match="cannot be recovered"):
        jaxlora.unmerge(merged, bare)


def test_split_under_tracing_has_no_base_norm(key):
    """Under jit the column norms have no concrete value: the node merges but does not unmerge."""
    config = jaxlora.LoraConfig(rank=2, targets="kernel", use_dora=True)
    params = {"kernel": normal(5, 4)}
    eager = jaxlora.split(params, config, key=key)[1]["kernel"]
    np.testing.assert_allclose(
        eager.base_norm.value, np.linalg.norm(params["kernel"], axis=0), rtol=1e-6
    )
    traced = jax.eval_shape(lambda p: jaxlora.split(p, config, key=key)[1], params)["kernel"]
    assert traced.base_norm is None


def test_a_jit_split_adapter_restored_with_its_base_unmerges_exactly(key, tmp_path):
    """jit(split) keeps no base norms; load_adapter(base=...) recomputes them from the base, so
    the restored node unmerges to the base and has the eager split's tree structure."""
    config = jaxlora.LoraConfig(rank=2, targets="kernel", use_dora=True)
    params = {"kernel": normal(5, 4)}
    base, eager = jaxlora.split(params, config, key=key)
    _, traced = jax.jit(lambda p: jaxlora.split(p, config, key=key))(params)
    trained = jax.tree.map(lambda x: x + 0.1 * jnp.ones_like(x), traced)  # b != 0, m moved
    with pytest.raises(ValueError, match=r"no base_norm .*jaxlora.load_adapter\(path, base=base\)"):
        jaxlora.unmerge(jaxlora.merge(base, trained), trained)
    path = jaxlora.save_adapter(tmp_path / "a", trained, config=config)
    restored, _ = jaxlora.load_adapter(path, base=base)
    assert jax.tree.structure(restored) == jax.tree.structure(eager)
    np.testing.assert_allclose(
        restored["kernel"].base_norm.value, np.linalg.norm(params["kernel"], axis=0), rtol=1e-6
    )
    merged = jaxlora.merge(base, restored)
    np.testing.assert_allclose(
        jaxlora.unmerge(merged, restored)["kernel"], params["kernel"], rtol=1e-5, atol=1e-6
    )
    assert jaxlora.load_adapter(path)[0]["kernel"].base_norm is None  # no base: nothing to read
    with pytest.raises(ValueError, match=r"static 'base_norm'.*one was split under jax.jit"):
        jaxlora.stack([eager, trained])
    assert jaxlora.stack([eager, restored])["kernel"].n_adapters == 2


def test_a_zero_column_stays_zero_without_nans(key):
    w = normal(5, 4).at[:, 2].set(0.0)
    base, delta = jaxlora.split(
        {"kernel": w}, jaxlora.LoraConfig(rank=2, targets="kernel", use_dora=True), key=key
    )
    x = normal(3, 5)
    f = jaxlora.lora_apply(lambda p, x: x @ p["kernel"])
    out = f(base, delta, x)
    chex.assert_tree_all_finite(out)
    np.testing.assert_array_equal(out[:, 2], 0.0)
    chex.assert_tree_all_finite(jax.grad(lambda d: jnp.sum(f(base, d, x)))(delta))


def test_pissa_init_with_dora_starts_at_the_base(key):
    w = normal(8, 6)
    config = jaxlora.LoraConfig(rank=2, targets="kernel", init="pissa", use_dora=True)
    base, delta = jaxlora.split({"kernel": w}, config, key=key)
    assert not np.allclose(base["kernel"], w)  # the base lost its top singular directions
    np.testing.assert_allclose(jaxlora.merge(base, delta)["kernel"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(delta["kernel"].m, np.linalg.norm(w, axis=0), rtol=1e-5)


def test_use_dora_must_be_a_bool():
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        jaxlora.LoraConfig(use_dora="yes")
