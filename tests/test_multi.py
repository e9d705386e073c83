"""Many adapters: padding, stacking with per-example routing, combining."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from tests.fixtures import random_deltas
from tests.helpers import dense_merge, randomize_b


@pytest.fixture(scope="module")
def llama(llama):
    """The shared tiny scanned Llama as ``(apply, params, tokens)``."""
    config, model, params = llama
    tokens = jax.random.randint(jax.random.key(0), (5, 12), 0, config.vocab_size)
    apply = lambda p, t: model.apply({"params": p}, t)
    return apply, params, tokens


def _deltas(params, n, key):
    ranks, alphas = [2 + i for i in range(n)], [4.0 + i for i in range(n)]
    return random_deltas(params, ranks, alphas, key, b_key=100)


@pytest.mark.slow
def test_mixed_batch_equals_each_adapter_alone(llama, key):
    apply, params, tokens = llama
    base, deltas = _deltas(params, 3, key)
    stacked = jaxlora.stack(deltas)
    ids = jnp.array([2, 0, -1, 1, 2])
    f = jax.jit(jaxlora.lora_apply(apply, strict=True))
    mixed = f(base, stacked, tokens, adapter_ids=ids)
    for row, i in enumerate(np.asarray(ids)):
        expected = apply(params, tokens) if i < 0 else f(base, deltas[i], tokens)
        np.testing.assert_allclose(mixed[row], expected[row], rtol=1e-5, atol=1e-5)
    # the adapters really differ, so the routing is observable
    assert not np.allclose(f(base, deltas[0], tokens), f(base, deltas[1], tokens), atol=1e-3)


@pytest.mark.slow
def test_pad_rank_is_exact_and_swaps_do_not_recompile(llama, key):
    apply, params, tokens = llama
    base, deltas = _deltas(params, 3, key)
    padded = [jaxlora.pad_rank(d, 4) for d in deltas]
    f = jax.jit(jaxlora.lora_apply(apply))
    for d, p in zip(deltas, padded, strict=True):
        np.testing.assert_allclose(f(base, p, tokens), f(base, d, tokens), rtol=1e-5, atol=1e-5)
    g = jax.jit(jaxlora.lora_apply(apply))
    for p in padded:  # different values, ranks padded equal, different scales
        g(base, p, tokens)
    assert g._cache_size() == 1


def test_stacked_id_batches_do_not_recompile(llama, key):
    apply, params, tokens = llama
    base, deltas = _deltas(params, 2, key)
    stacked = jaxlora.stack(deltas)
    f = jax.jit(jaxlora.lora_apply(apply))
    for ids in ([0, 0, 0, 0, 0], [1, 0, 1, -1, 0], [-1] * 5):
        f(base, stacked, tokens, adapter_ids=jnp.array(ids))
    assert f._cache_size() == 1


def test_multi_adapter_errors(llama, key):
    apply, params, tokens = llama
    base, deltas = _deltas(params, 2, key)
    stacked = jaxlora.stack(deltas)
    f = jaxlora.lora_apply(apply)
    with pytest.raises(ValueError, match="pass adapter_ids="):
        f(base, stacked, tokens)
    with pytest.raises(ValueError, match=r"needs a delta from jaxlora\.stack"):
        f(base, deltas[0], tokens, adapter_ids=jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="1-D integer array"):
        f(base, stacked, tokens, adapter_ids=jnp.zeros((5, 1), jnp.int32))
    with pytest.raises(ValueError, match="has 5 entries, not 3"):
        f(base, stacked, tokens, adapter_ids=jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="use-site strategy"):
        jaxlora.lora_apply(apply, strategy="merge")(
            base, stacked, tokens, adapter_ids=jnp.zeros(5, jnp.int32)
        )
    other = jaxlora.split(
        params, jaxlora.LoraConfig(rank=2, targets="q_proj", stacked_axes=1), key=key
    )[1]
    with pytest.raises(ValueError, match="adapts other paths"):
        jaxlora.stack([deltas[0], other])
    with pytest.raises(ValueError, match="more than the requested rank"):
        jaxlora.pad_rank(deltas[1], 1)


def _dense_sum(params, deltas, weights):
    total = 0.0
    for d, w in zip(deltas, weights, strict=True):
        total = total + w * (dense_merge(params["w"], d["w"]) - np.asarray(params["w"], np.float64))
    return total


@pytest.fixture
def three(key):
    params = {"w": jax.random.normal(key, (12, 10))}
    deltas = []
    for i, rank in enumerate((2, 3, 2)):
        config = jaxlora.LoraConfig(rank=rank, targets="w", alpha=2.0 + i)
        base, d = jaxlora.split(params, config, key=jax.random.fold_in(key, i))
        deltas.append(randomize_b(d, jax.random.fold_in(key, 10 + i)))
    return params, base, deltas


def test_combine_cat_is_exact(three):
    params, base, deltas = three
    weights = [0.5, -1.0, 2.0]
    combined = jaxlora.combine_adapters(deltas, weights, method="cat")
    assert combined["w"].rank == 7
    got = np.asarray(jaxlora.merge(base, combined)["w"], np.float64) - np.asarray(params["w"])
    np.testing.assert_allclose(got, _dense_sum(params, deltas, weights), atol=1e-5)


def test_combine_svd_is_the_best_low_rank_approximation(three):
    params, base, deltas = three
    weights = [0.5, -1.0, 2.0]
    dense = _dense_sum(params, deltas, weights)
    u, s, vt = np.linalg.svd(dense)
    best3 = (u[:, :3] * s[:3]) @ vt[:3]
    combined = jaxlora.combine_adapters(deltas, weights, method="svd", rank=3)
    got = np.asarray(jaxlora.merge(base, combined)["w"], np.float64) - np.asarray(params["w"])
    np.testing.assert_allclose(got, best3, atol=1e-4)
    exact = jaxlora.combine_adapters(deltas, weights, method="svd", rank=7)
    got = np.asarray(jaxlora.merge(base, exact)["w"], np.float64) - np.asarray(params["w"])
    np.testing.assert_allclose(got, dense, atol=1e-4)


def test_combine_linear_has_cross_terms(three):
    params, base, deltas = three
    weights = [0.5, 1.0, 2.0]
    combined = jaxlora.combine_adapters(deltas, weights, method="linear")
    got = np.asarray(jaxlora.merge(base, combined)["w"], np.float64) - np.asarray(params["w"])
    # its own formula: (Σ sqrt(c_i) a_i)(Σ sqrt(c_i) b_i) with ranks padded
    padded = [jaxlora.pad_rank(d, 3, fold_scale=False)["w"] for d in deltas]
    c = [w * float(n.scale) for w, n in zip(weights, padded, strict=True)]
    a = sum(np.sqrt(ci) * np.asarray(n.a, np.float64) for ci, n in zip(c, padded, strict=True))
    b = sum(np.sqrt(ci) * np.asarray(n.b, np.float64) for ci, n in zip(c, padded, strict=True))
    np.testing.assert_allclose(got, a @ b, atol=1e-4)
    assert not np.allclose(got, _dense_sum(params, deltas, weights), atol=1e-2)


def test_combine_errors(three):
    _, _, deltas = three
    with pytest.raises(ValueError, match="method must be"):
        jaxlora.combine_adapters(deltas, [1, 1, 1], method="ties")
    with pytest.raises(ValueError, match="one weight per delta"):
        jaxlora.combine_adapters(deltas, [1, 1])


def test_select_round_trips(three):
    _, _, deltas = three
    stacked = jaxlora.stack(deltas)
    chex.assert_trees_all_close(jaxlora.multi.select(stacked, 1), jaxlora.pad_rank(deltas[1], 3))
