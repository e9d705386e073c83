"""``allocate_ranks`` on problems whose answer is known."""

import dataclasses
import json

import jax.numpy as jnp
import pytest

import jaxlora
from jaxlora.variants import allocate_ranks
from tests.test_variants import normal


def _problem(key, change_rank=3):
    """Three independent regressions; only ``l1`` must move, by a rank-``change_rank`` change.

    The gradient is exactly zero at ``l0`` and ``l2`` and has rank ``change_rank`` at ``l1``.
    """
    params = {
        "l0": {"kernel": normal(10, 6, seed=0), "bias": jnp.zeros(6)},
        "l1": {"kernel": normal(8, 12, seed=1)},
        "l2": {"kernel": normal(12, 8, seed=2)},
    }
    change = normal(8, change_rank, seed=3) @ normal(change_rank, 12, seed=4)
    targets = {
        "l0": params["l0"]["kernel"],
        "l1": params["l1"]["kernel"] + change,
        "l2": params["l2"]["kernel"],
    }

    def loss_fn(p, batch):
        return sum(
            jnp.mean((batch[name] @ p[name]["kernel"] - batch[name] @ targets[name]) ** 2)
            for name in ("l0", "l1", "l2")
        )

    batches = [
        {
            name: normal(32, w["kernel"].shape[0], seed=100 + 3 * i + j)
            for j, (name, w) in enumerate(params.items())
        }
        for i in range(3)
    ]
    return params, loss_fn, batches


CONFIG = jaxlora.LoraConfig(targets="kernel")
COST = {"l0": 16, "l1": 20, "l2": 20}  # n_in + n_out


def test_the_layer_that_must_change_gets_the_rank(key):
    params, loss_fn, batches = _problem(key, change_rank=8)
    budget = sum(COST.values()) + 5 * COST["l1"]
    pattern = allocate_ranks(loss_fn, params, batches, CONFIG, budget=budget)
    assert pattern == {"^l0/kernel$": 1, "^l1/kernel$": 6, "^l2/kernel$": 1}
    # within the budget, and the pattern is what split uses
    config = dataclasses.replace(CONFIG, rank_pattern=json.loads(json.dumps(pattern)))
    base, delta = jaxlora.split(params, config, key=key)
    assert delta["l1"]["kernel"].rank == 6 and delta["l0"]["kernel"].rank == 1
    assert jaxlora.count_parameters(base, delta).trainable <= budget


def test_rank_beyond_the_gradient_rank_is_not_spent(key):
    params, loss_fn, batches = _problem(key, change_rank=2)
    # plenty of budget: l1 takes what its gradient needs and no more
    pattern = allocate_ranks(loss_fn, params, batches, CONFIG, budget=10_000)
    assert pattern == {"^l0/kernel$": 1, "^l1/kernel$": 2, "^l2/kernel$": 1}


def test_ranks_follow_the_size_of_the_change(key):
    """Two layers that must both move: the larger change gets rank first, per parameter."""
    params = {"a": {"kernel": normal(8, 8, seed=0)}, "b": {"kernel": jnp.eye(8)}}
    u = normal(8, 4, seed=1)
    big = u @ jnp.diag(jnp.array([8.0, 4.0, 2.0, 1.0])) @ normal(4, 8, seed=2)
    small = 0.1 * normal(8, 8, seed=3)

    def loss_fn(p, x):
        return jnp.sum((x @ p["a"]["kernel"] - x @ (params["a"]["kernel"] + big)) ** 2) + jnp.sum(
            (x @ p["b"]["kernel"] - x @ (params["b"]["kernel"] + small)) ** 2
        )

    batches = [jnp.eye(8)]  # the gradient is the change itself (times -2)
    pattern = allocate_ranks(loss_fn, params, batches, CONFIG, budget=16 * 6)
    assert pattern["^a/kernel$"] > pattern["^b/kernel$"]
    assert sum(pattern.values()) == 6


def test_stacked_weights_pool_their_layers(key):
    w = normal(3, 6, 6, seed=0)
    change = jnp.zeros((3, 6, 6)).at[1].set(normal(6, 6, seed=1))
    params = {"layers": {"kernel": w}, "head": {"kernel": normal(6, 6, seed=2)}}

    def loss_fn(p, x):
        moved = jnp.sum((jnp.einsum("bi,lio->lbo", x, p["layers"]["kernel"] - w - change)) ** 2)
        return moved + jnp.sum((x @ (p["head"]["kernel"] - params["head"]["kernel"])) ** 2)

    config = jaxlora.LoraConfig(targets="kernel", stacked_axes={"layers/": 1})
    batches = [normal(16, 6, seed=i) for i in range(2)]
    # a stacked rank costs 3 layers x 12; the head's costs 12
    pattern = allocate_ranks(loss_fn, params, batches, config, budget=36 + 12 + 36 * 2)
    assert pattern == {"^layers/kernel$": 3, "^head/kernel$": 1}


def test_paths_are_escaped_exactly(key):
    params = {"a.b": {"kernel": normal(4, 4)}, "axb": {"kernel": jnp.eye(4)}}
    loss_fn = lambda p, x: jnp.sum(x @ p["a.b"]["kernel"]) + jnp.sum(x @ p["axb"]["kernel"])
    pattern = allocate_ranks(loss_fn, params, [jnp.ones((2, 4))], CONFIG, budget=100)
    assert set(pattern) == {r"^a\.b/kernel$", "^axb/kernel$"}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(budget=10), ValueError, "cannot give each of the 3 targeted weights"),
        (dict(budget=0), ValueError, "budget must be >= 1"),
        (dict(budget=1.5), TypeError, "budget must be an int"),
        (dict(budget=1000, min_rank=7), ValueError, "min_rank=7 exceeds min"),
        (dict(budget=1000, batches=[]), ValueError, "batches is empty"),
        (dict(budget=1000, config=jaxlora.LoraConfig(targets="nothing")), ValueError, "matched"),
        (dict(budget=1000, config={"targets": "kernel"}), TypeError, "LoraConfig"),
    ],
)
def test_errors(key, kwargs, error, match):
    params, loss_fn, batches = _problem(key)
    kwargs = {"batches": batches, "config": CONFIG, **kwargs}
    batches, config = kwargs.pop("batches"), kwargs.pop("config")
    with pytest.raises(error, match=match):
        allocate_ranks(loss_fn, params, batches, config, **kwargs)
