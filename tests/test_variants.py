"""The contract every LoRA-family variant keeps: split, lora_apply, merge, unmerge, masks.

Variant-specific tests live in ``test_dora.py``, ``test_vera.py``,
``test_adalora.py``, ``test_allocate.py`` and ``test_loraplus.py``; the helpers
here are shared with them.
"""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.variants import AdaLoraConfig, AdaLoraNode, DoraNode, VeraConfig, VeraNode
from tests.fixtures import Stack
from tests.helpers import normal as normal  # re-exported: the variant tests import it

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- models


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(12, name="up")(x))
        return nn.Dense(5, name="down")(x)


class Heads(nn.Module):
    """DenseGeneral kernels with two output axes (query) and two input axes (out)."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 4), name="query")(x)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(jnp.tanh(q))


def _model(module, shape):
    """``(params, x, apply)`` for ``module``, built once per test session (they are read-only)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    params = jax.jit(module.init)(jax.random.key(0), x)["params"]
    return params, x, lambda p, x: module.apply({"params": p}, x)


@functools.cache
def mlp():
    return _model(MLP(), (3, 7))


@functools.cache
def heads():
    return _model(Heads(), (2, 5, 6))


@functools.cache
def stack():
    return _model(Stack(), (4, 8))


# ---------------------------------------------------------------- configs


def configs(targets="kernel", **layout):
    """One config per variant, each small enough for the test models."""
    return {
        "lora": jaxlora.LoraConfig(rank=2, targets=targets, **layout),
        "rslora": jaxlora.LoraConfig(rank=2, alpha=3.0, rslora=True, targets=targets, **layout),
        "dora": jaxlora.LoraConfig(rank=2, targets=targets, use_dora=True, **layout),
        "vera": VeraConfig(rank=16, targets=targets, **layout),
        "adalora": AdaLoraConfig(
            init_rank=3, target_rank=2, total_step=10, targets=targets, **layout
        ),
    }


VARIANTS = list(configs())
# Plain LoRA's paths are covered by test_split.py and test_engine.py; these add node types.
NEW_NODES = ["dora", "vera", "adalora"]


def is_node(x):
    return isinstance(x, jaxlora.LoraNode | DoraNode | VeraNode | AdaLoraNode)


def perturb(delta, key, scale=0.2):
    """``delta`` with every trainable leaf moved randomly (zero-init leaves included).

    The noise comes from numpy (seeded by ``key``): no program to compile per shape.
    """
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    mask = jaxlora.trainable_mask(delta)
    leaves, treedef = jax.tree.flatten(delta)
    flags = jax.tree.leaves(mask)
    out = []
    for x, m in zip(leaves, flags, strict=True):
        if m:
            noise = scale * rng.standard_normal(x.shape)
            x = jnp.asarray(np.asarray(x, np.float64) + noise, x.dtype)
        out.append(x)
    return treedef.unflatten(out)


def split_perturbed(params, config, key):
    base, delta = jaxlora.split(params, config, key=key)
    return base, perturb(delta, jax.random.fold_in(key, 7))


def assert_use_site_equals_merge(apply, base, delta, *args):
    """Outputs and gradients w.r.t. the trainable leaves agree between the strategies.

    One jitted ``value_and_grad`` per strategy (the output rides along as aux).
    """
    mask = jaxlora.trainable_mask(delta)

    def run(strategy):
        f = jaxlora.lora_apply(apply, strategy=strategy, strict=True)

        def g(delta):
            out = f(base, delta, *args)
            return jnp.sum(jnp.sin(out)), out

        return jax.jit(jax.grad(g, has_aux=True))(delta)

    (g_u, out_u), (g_m, out_m) = run("use-site"), run("merge")
    chex.assert_trees_all_close(out_u, out_m, **TOL)
    flags = jax.tree.leaves(mask)
    trainable = lambda g: [x for x, m in zip(jax.tree.leaves(g), flags, strict=True) if m]
    chex.assert_trees_all_close(trainable(g_u), trainable(g_m), rtol=1e-4, atol=1e-4)
    assert max(float(jnp.abs(x).max()) for x in trainable(g_u)) > 0


# ---------------------------------------------------------------- the contract


@pytest.mark.parametrize(
    ("variant", "jit"), [*((v, True) for v in NEW_NODES), ("dora", False), ("vera", False)]
)
def test_fresh_adapters_leave_the_model_unchanged(key, variant, jit):
    params, x, apply = mlp()
    base, delta = jaxlora.split(params, configs()[variant], key=key)
    f = jaxlora.lora_apply(apply)
    if jit:
        f, apply = jax.jit(f), jax.jit(apply)
    out, ref = f(base, delta, x), apply(params, x)
    if variant == "dora":  # m / ||W|| is 1 up to the rounding of two norms
        np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-7)
    else:
        np.testing.assert_array_equal(out, ref)
    merged = jaxlora.merge(base, delta)
    chex.assert_trees_all_close(merged, params, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(("variant", "model"), [*((v, mlp) for v in NEW_NODES), ("dora", heads)])
def test_use_site_equals_merge(key, variant, model):
    params, x, apply = model()
    layout = {"input_axes": {"out/": 2}} if model is heads else {}
    base, delta = split_perturbed(params, configs(**layout)[variant], key)
    assert_use_site_equals_merge(apply, base, delta, x)


@pytest.mark.parametrize("variant", ["dora", "vera"])  # AdaLoRA's scan: test_adalora.py
def test_stacked_nn_scan_layers(key, variant):
    params, x, apply = stack()
    base, delta = split_perturbed(params, configs(stacked_axes=1)[variant], key)
    node = delta["layers"]["proj"]["kernel"]
    assert all(x.shape[0] == 3 for x in jax.tree.leaves(node) if x.ndim)  # one per layer
    assert_use_site_equals_merge(apply, base, delta, x)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_unmerge_round_trip(key, variant):
    params, _, _ = heads()
    base, delta = jaxlora.split(params, configs(input_axes={"out/": 2})[variant], key=key)
    # A fine-tuning-sized delta: DoRA's unmerge is exact while W·(W + Δ) >= 0 per column.
    delta = perturb(delta, jax.random.fold_in(key, 7), scale=0.05)
    merged = jaxlora.merge(base, delta)
    assert not np.allclose(merged["query"]["kernel"], base["query"]["kernel"])
    chex.assert_trees_all_close(jaxlora.unmerge(merged, delta), base, rtol=1e-5, atol=2e-6)


_TRAINABLE = {
    "lora": {"a", "b"},
    "rslora": {"a", "b"},
    "dora": {"a", "b", "m"},
    "vera": {"d", "b"},
    "adalora": {"p", "e", "q"},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_trainable_mask_marks_exactly_the_trainable_leaves(key, variant):
    params, _, _ = mlp()
    _, delta = jaxlora.split(params, configs()[variant], key=key)
    mask = jaxlora.trainable_mask(delta)
    assert mask["up"]["bias"] is None and mask["down"]["bias"] is None
    node, node_mask = delta["up"]["kernel"], mask["up"]["kernel"]
    data = [f.name for f in dataclasses.fields(node) if not f.metadata.get("static")]
    trainable = {n for n in data if getattr(node_mask, n) is True}
    assert trainable == _TRAINABLE[variant]
    frozen = {n for n in data if getattr(node_mask, n) is False}
    assert frozen.isdisjoint(trainable)
    chex.assert_trees_all_equal_structs(mask, jax.tree.map(lambda x: True, delta))


def test_trainable_parameter_counts(key):
    params, _, _ = mlp()  # up: (7, 12), down: (12, 5)
    count = lambda config: jaxlora.count_parameters(*jaxlora.split(params, config, key=key))
    c = configs()
    assert count(c["lora"]).trainable == 2 * (7 + 12) + 2 * (12 + 5)
    assert count(c["dora"]).trainable == count(c["lora"]).trainable + 12 + 5
    assert count(c["vera"]).trainable == (12 + 16) + (5 + 16)
    assert count(c["adalora"]).trainable == 3 * (7 + 1 + 12) + 3 * (12 + 1 + 5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_summary_counts_every_variant(key, variant):
    params, _, _ = mlp()
    base, delta = jaxlora.split(params, configs()[variant], key=key)
    text = jaxlora.summary(delta)
    trainable = jaxlora.count_parameters(base, delta).trainable
    assert text.endswith(f"2 adapted weights, {trainable} trainable parameters")


def test_split_rejects_what_is_not_a_config(key):
    params, _, _ = mlp()
    with pytest.raises(TypeError, match="LoraConfig or a variant config"):
        jaxlora.split(params, {"rank": 2}, key=key)


@pytest.mark.parametrize("variant", NEW_NODES)
def test_a_delta_of_another_tree_is_rejected(key, variant):
    params, x, apply = mlp()
    other, _, _ = heads()
    _, delta = jaxlora.split(params, configs()[variant], key=key)
    base_other, _ = jaxlora.split(other, configs(input_axes={"out/": 2})[variant], key=key)
    with pytest.raises(ValueError, match="different tree structures"):
        jaxlora.merge(base_other, delta)
    with pytest.raises(ValueError, match="different tree structures"):
        jaxlora.lora_apply(apply)(base_other, delta, x)


@pytest.mark.parametrize("variant", VARIANTS)
def test_targets_matching_nothing_raise(key, variant):
    params, _, _ = mlp()
    with pytest.raises(ValueError, match="matched no adaptable parameter"):
        jaxlora.split(params, configs(targets="nothing_here")[variant], key=key)


def test_swapping_variant_values_does_not_recompile(key):
    params, x, apply = mlp()
    f = jax.jit(jaxlora.lora_apply(apply))
    for variant in ("dora", "vera", "adalora"):
        base, delta = jaxlora.split(params, configs()[variant], key=key)
        f(base, delta, x)
        before = f._cache_size()
        for i in range(2):
            f(base, perturb(delta, jax.random.key(i)), x)
        assert f._cache_size() == before
