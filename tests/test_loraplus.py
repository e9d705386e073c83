"""``loraplus`` against a hand-built pair of optimizers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora.variants import AdaLoraConfig, VeraConfig, loraplus
from tests.test_variants import mlp, normal, perturb

LR, RATIO = 1e-2, 16.0


def _grads(delta, step):
    return jax.tree.map(lambda x: normal(*x.shape, seed=1000 * step + x.size), delta)


def _fields(tree, name):
    """The leaves named ``name`` of every adapter node, in tree order."""
    nodes = jax.tree.leaves(tree, is_leaf=jaxlora._node.is_node)
    return [getattr(n, name) for n in nodes if jaxlora._node.is_node(n)]


@pytest.mark.parametrize("factory", [optax.adam, lambda lr: optax.adamw(lr, weight_decay=0.1)])
def test_updates_match_two_hand_built_optimizers(key, factory):
    params, _, _ = mlp()
    _, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="kernel"), key=key)
    delta = perturb(delta, key)
    tx = loraplus(factory, LR, ratio=RATIO)
    slow, fast = factory(LR), factory(RATIO * LR)
    state = tx.init(delta)
    a, b = _fields(delta, "a"), _fields(delta, "b")
    s_slow, s_fast = slow.init(a), fast.init(b)
    update, update_slow, update_fast = (
        jax.jit(tx.update),
        jax.jit(slow.update),
        jax.jit(fast.update),
    )
    for step in range(3):
        grads = _grads(delta, step)
        updates, state = update(grads, state, delta)
        u_a, s_slow = update_slow(_fields(grads, "a"), s_slow, a)
        u_b, s_fast = update_fast(_fields(grads, "b"), s_fast, b)
        chex.assert_trees_all_close(_fields(updates, "a"), u_a, rtol=1e-6)
        chex.assert_trees_all_close(_fields(updates, "b"), u_b, rtol=1e-6)
        delta = optax.apply_updates(delta, updates)
        a, b = optax.apply_updates(a, u_a), optax.apply_updates(b, u_b)


def test_frozen_leaves_have_no_state(key):
    params, _, _ = mlp()
    _, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="kernel"), key=key)
    state = loraplus(optax.adam, LR).init(delta)
    sizes = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim)
    ab = sum(x.size for name in ("a", "b") for x in _fields(delta, name))
    assert sizes == 2 * ab  # adam's two moments of a and b, nothing else


def test_schedules_are_scaled_too(key):
    params, _, _ = mlp()
    _, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="kernel"), key=key)
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    tx = loraplus(optax.sgd, schedule, ratio=4.0)
    state = tx.init(delta)
    grads = jax.tree.map(jnp.ones_like, delta)
    for step in range(3):
        updates, state = tx.update(grads, state, delta)
        lr = float(schedule(step))
        np.testing.assert_allclose(_fields(updates, "a")[0], -lr, rtol=1e-6)
        np.testing.assert_allclose(_fields(updates, "b")[0], -4.0 * lr, rtol=1e-6)


@pytest.mark.parametrize(
    ("config", "fast", "slow"),
    [
        (jaxlora.LoraConfig(rank=2, targets="kernel", use_dora=True), ["b"], ["a", "m"]),
        (VeraConfig(rank=8, targets="kernel"), ["b"], ["d"]),
        (
            AdaLoraConfig(init_rank=2, total_step=5, target_rank=1, targets="kernel"),
            ["q"],
            ["p", "e"],
        ),
    ],
)
def test_variant_roles(key, config, fast, slow):
    params, _, _ = mlp()
    _, delta = jaxlora.split(params, config, key=key)
    tx = loraplus(optax.sgd, 1.0, ratio=RATIO)
    grads = jax.tree.map(jnp.ones_like, delta)
    updates, _ = tx.update(grads, tx.init(delta), delta)
    for name in fast:
        np.testing.assert_array_equal(_fields(updates, name)[0], -RATIO)
    for name in slow:
        np.testing.assert_array_equal(_fields(updates, name)[0], -1.0)


def test_errors():
    with pytest.raises(ValueError, match="ratio must be a finite positive number"):
        loraplus(optax.adam, 1e-3, ratio=0)
    with pytest.raises(TypeError, match="optimizer_factory must be a callable"):
        loraplus(optax.adam(1e-3), 1e-3)
