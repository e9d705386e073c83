"""Many adapters at once: routing (gather, grouped, auto), multi-tenant training, serving pools.

References: every routed output is checked row by row against the dense
model with that row's adapter merged in (``jaxlora.merge``); multi-tenant
training against training each adapter alone with plain optax.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora.models.generate import generate
from jaxlora.multi import _pool
from tests.fixtures import random_deltas

ROUTINGS = ("auto", "gather", "grouped")
TOL = dict(rtol=2e-5, atol=2e-5)


def _deltas(params, n, *, key=0, ranks=None, alphas=None):
    """``n`` adapters of all-linear weights with random a and b, of different ranks and alphas."""
    ranks = ranks or [1 + i % 3 for i in range(n)]
    alphas = alphas or [2.0 + i for i in range(n)]
    return random_deltas(params, ranks[:n], alphas[:n], jax.random.key(key))


def _dense(model, params, delta, tokens):
    """The reference: the model with ``delta`` merged into its weights (``None``: the base)."""
    p = params if delta is None else jaxlora.merge(params, delta)
    return _jitted_apply(model)(p, tokens)


@functools.cache
def _jitted_apply(model):
    return jax.jit(lambda p, t: model.apply({"params": p}, t))


# --- routing -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize(
    ("seq", "ids"),
    [
        (6, [0, 0, 0, 0]),  # one adapter: the smallest grouped bucket
        (6, [2, -1, 0, 2, 1]),  # three and the bare base
        (6, [5, 4, 3, 2, 1, 0, -1]),  # six: past auto's prefill crossover, the gather
        (1, [*range(18), -1]),  # one token each, 18 adapters: past the decode crossover
    ],
)
def test_every_routing_gives_each_example_its_own_adapter(llama, routing, seq, ids):
    config, model, params = llama
    n = max(ids) + 1
    base, deltas = _deltas(params, n)
    tokens = jax.random.randint(jax.random.key(seq), (len(ids), seq), 0, config.vocab_size)
    f = jax.jit(jaxlora.lora_apply(lambda p, t: model.apply({"params": p}, t), routing=routing))
    want = {i: _dense(model, params, None if i < 0 else deltas[i], tokens) for i in set(ids)}
    for fold in (False, True):
        out = f(base, jaxlora.stack(deltas, fold_scales=fold), tokens, adapter_ids=jnp.array(ids))
        for row, i in enumerate(ids):
            np.testing.assert_allclose(out[row], want[i][row], **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("routing", ROUTINGS)
def test_routed_gradients_are_each_adapters_own(llama, routing):
    config, model, params = llama
    base, deltas = _deltas(params, 3)
    tokens = jax.random.randint(jax.random.key(1), (5, 6), 0, config.vocab_size)
    ids = jnp.array([2, 0, 2, -1, 0])
    f = jaxlora.lora_apply(lambda p, t: model.apply({"params": p}, t), routing=routing)

    def loss(stacked):
        out = f(base, stacked, tokens, adapter_ids=ids)
        return jaxlora.multi.per_adapter_loss((out**2).mean(axis=(1, 2)), ids, 3)[0]

    grads = jaxlora.multi.unstack(jax.grad(loss)(jaxlora.stack(deltas, fold_scales=False)))
    for i, delta in enumerate(deltas):
        rows = np.flatnonzero(np.asarray(ids) == i)
        alone = lambda d, rows=rows: (
            (_dense(model, params, d, tokens[rows]) ** 2).mean(axis=(1, 2)).mean()
        )
        want = jax.grad(alone)(delta) if rows.size else jax.tree.map(jnp.zeros_like, delta)
        for g, w in zip(jax.tree.leaves(grads[i]), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_routing_is_checked():
    with pytest.raises(ValueError, match=r"routing must be one of \('auto', 'gather', 'grouped'\)"):
        jaxlora.lora_apply(lambda p, x: x, routing="ragged")


# --- training many adapters in one step ----------------------------------------------------------


def _train_alone(model, base, delta, tokens, targets, tx, steps):
    f = jaxlora.lora_apply(lambda p, t: model.apply({"params": p}, t))

    def loss(d):
        logits = f(base, d, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def step(delta, state):
        updates, state = tx.update(jax.grad(loss)(delta), state, delta)
        return optax.apply_updates(delta, updates), state

    state = tx.init(delta)
    for _ in range(steps):
        delta, state = step(delta, state)
    return delta


@pytest.mark.slow
def test_one_step_trains_each_adapter_as_if_alone(llama):
    config, model, params = llama
    ranks, alphas, rates = (2, 4, 3), (4.0, 8.0, 3.0), (1e-2, 3e-2, 5e-3)
    base, deltas = _deltas(params, 3, ranks=ranks, alphas=alphas)
    key = jax.random.key(7)
    tokens = jax.random.randint(key, (9, 5), 0, config.vocab_size)
    targets = jax.random.randint(jax.random.fold_in(key, 1), (9, 5), 0, config.vocab_size)
    ids = jnp.array([0, 1, 2, 1, 1, 0, 2, 1, -1])  # uneven shares, one example for no adapter
    f = jaxlora.lora_apply(lambda p, t: model.apply({"params": p}, t))
    # clipping inside: per adapter, it must see that adapter's gradients only
    one = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1.0, weight_decay=0.1))
    tx = jaxlora.multi.per_adapter(one, learning_rates=rates)

    @jax.jit
    def step(stacked, state):
        def loss(s):
            logits = f(base, s, tokens, adapter_ids=ids)
            per = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(axis=1)
            return jaxlora.multi.per_adapter_loss(per, ids, 3)

        (_, each), grads = jax.value_and_grad(loss, has_aux=True)(stacked)
        updates, state = tx.update(grads, state, stacked)
        return optax.apply_updates(stacked, updates), state, each

    stacked = jaxlora.stack(deltas, fold_scales=False)
    state = tx.init(stacked)
    for _ in range(4):
        stacked, state, each = step(stacked, state)
    assert step._cache_size() == 1 and each.shape == (3,)
    # the padded rank components never moved
    is_stack = lambda x: isinstance(x, jaxlora.multi.StackedNode)
    for node in jax.tree.leaves(stacked, is_leaf=is_stack):
        for i, r in enumerate(ranks):
            assert not np.asarray(node.inner.a[i, ..., r:]).any()
            assert not np.asarray(node.inner.b[i, ..., r:, :]).any()
    trained = jaxlora.multi.unstack(stacked)
    for i, (delta, trained_i) in enumerate(zip(deltas, trained, strict=True)):
        rows = np.flatnonzero(np.asarray(ids) == i)
        alone_tx = optax.chain(
            optax.clip_by_global_norm(0.5), optax.adamw(rates[i], weight_decay=0.1)
        )
        want = _train_alone(model, base, delta, tokens[rows], targets[rows], alone_tx, 4)
        assert jax.tree.structure(trained_i) == jax.tree.structure(delta)  # rank and scale back
        for g, w, d0 in zip(*(jax.tree.leaves(t) for t in (trained_i, want, delta)), strict=True):
            # Adam divides by sqrt(v): float32 summation-order differences (the routed batch vs
            # the adapter's own rows) move an element by ~1e-5 where its gradient is tiny, well
            # under 1% of the distance the training moved it
            moved = np.abs(np.asarray(w) - np.asarray(d0)).max()
            assert moved > 1e-3  # it trained
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=3e-3 * moved)


def test_unstacked_adapters_save_and_load_each_with_its_config(llama, tmp_path):
    _, _, params = llama
    _, deltas = _deltas(params, 2, ranks=(2, 3), alphas=(4.0, 9.0))
    back = jaxlora.multi.unstack(jaxlora.stack(deltas, fold_scales=False))
    for i, d in enumerate(back):
        cfg = jaxlora.LoraConfig(rank=(2, 3)[i], alpha=(4.0, 9.0)[i], targets="all-linear",
                                 stacked_axes=1)  # fmt: skip
        jaxlora.save_adapter(tmp_path / str(i), d, config=cfg)
        loaded, loaded_cfg = jaxlora.load_adapter(tmp_path / str(i))
        assert loaded_cfg == cfg
        for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(deltas[i]), strict=True):
            np.testing.assert_array_equal(x, y)


def test_a_stack_is_saved_adapter_by_adapter(llama, tmp_path):
    _, _, params = llama
    _, deltas = _deltas(params, 2, ranks=(1, 3))
    config = jaxlora.LoraConfig(rank=3, targets="all-linear", stacked_axes=1)
    with pytest.raises(TypeError, match=r"save each adapter on its own \(jaxlora\.multi\.unstack"):
        jaxlora.save_adapter(tmp_path / "s", jaxlora.stack(deltas), config=config)


def test_schedules_as_learning_rates():
    params = {"w": jnp.ones((4, 3))}
    _, d = jaxlora.split(params, jaxlora.LoraConfig(rank=1, targets="w"), key=jax.random.key(0))
    stacked = jaxlora.stack([d, d], fold_scales=False)
    tx = jaxlora.multi.per_adapter(optax.sgd(1.0), learning_rates=[0.5, lambda t: 0.1 * (t + 1)])
    state = tx.init(stacked)
    grads = jax.tree.map(jnp.ones_like, stacked)
    seen = []
    for _ in range(2):
        updates, state = tx.update(grads, state, stacked)
        seen.append(np.asarray(updates["w"].inner.a[:, 0, 0]))
    np.testing.assert_allclose(seen, [[-0.5, -0.1], [-0.5, -0.2]], rtol=1e-6)


def test_per_adapter_loss_is_the_sum_of_each_adapters_mean():
    losses = jnp.array([1.0, 2.0, 6.0, 4.0, 100.0])
    ids = jnp.array([0, 0, 2, 2, -1])
    total, each = jaxlora.multi.per_adapter_loss(losses, ids, 3)
    np.testing.assert_allclose(each, [1.5, 0.0, 5.0])
    assert float(total) == 6.5
    with pytest.raises(ValueError, match=r"both be \(batch,\)"):
        jaxlora.multi.per_adapter_loss(losses, ids[:3], 3)
    with pytest.raises(ValueError, match="n_adapters must be an int >= 1"):
        jaxlora.multi.per_adapter_loss(losses, ids, 0)


def test_per_adapter_errors():
    params = {"w": jnp.ones((4, 3))}
    _, d = jaxlora.split(params, jaxlora.LoraConfig(rank=1, targets="w"), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"needs a stacked delta from jaxlora\.stack.*LoraNode"):
        jaxlora.multi.per_adapter(optax.adam(1.0)).init(d)
    stacked = jaxlora.stack([d, d])
    with pytest.raises(ValueError, match="got 3 learning rates for a stack of 2 adapters"):
        jaxlora.multi.per_adapter(optax.adam(1.0), learning_rates=[1, 2, 3]).init(stacked)
    tx = jaxlora.multi.per_adapter(optax.adam(1.0))
    with pytest.raises(ValueError, match="needs params="):
        tx.update(stacked, tx.init(stacked))
    with pytest.raises(ValueError, match="unstack needs a stacked delta"):
        jaxlora.multi.unstack(d)


# --- serving pools -------------------------------------------------------------------------------


@pytest.mark.slow
def test_pool_slots_fill_replace_and_clear_without_recompiling(llama):
    config, model, params = llama
    base, deltas = _deltas(params, 3, ranks=(1, 2, 4), alphas=(3.0, 8.0, 5.0))
    tokens = jax.random.randint(jax.random.key(2), (4, 5), 0, config.vocab_size)
    f = jax.jit(jaxlora.lora_apply(lambda p, t: model.apply({"params": p}, t)))
    pool = jaxlora.multi.adapter_pool(deltas[0], capacity=5, rank=4)
    pool = jaxlora.multi.put(pool, 3, deltas[0])
    pool = jaxlora.multi.put(pool, 0, deltas[1])
    ids = jnp.array([3, 0, -1, 1])  # slot 1 is empty: the bare model
    out = f(base, pool, tokens, adapter_ids=ids)
    for row, d in enumerate([deltas[0], deltas[1], None, None]):
        np.testing.assert_allclose(
            out[row], _dense(model, params, d, tokens[row : row + 1])[0], **TOL
        )
    pool = jaxlora.multi.clear(jaxlora.multi.put(pool, 0, deltas[2]), 3)  # replace and clear
    out = f(base, pool, tokens, adapter_ids=ids)
    for row, d in enumerate([None, deltas[2], None, None]):
        np.testing.assert_allclose(
            out[row], _dense(model, params, d, tokens[row : row + 1])[0], **TOL
        )
    assert f._cache_size() == 1  # the server step compiled once
    assert _pool._write._cache_size() == 1  # every put and clear: one compiled write


@pytest.mark.slow
def test_decoding_from_a_pool_equals_decoding_with_each_adapter(llama):
    config, model, params = llama
    base, deltas = _deltas(params, 2, ranks=(2, 3))
    lora = jaxlora.lora_apply(lambda p, t, **kw: model.apply({"params": p}, t, **kw))
    pool = jaxlora.multi.adapter_pool(deltas[0], capacity=4, rank=4)
    pool = jaxlora.multi.put(jaxlora.multi.put(pool, 1, deltas[0]), 2, deltas[1])
    prompts = [[5, 9, 2, 7], [3, 1], [8, 8, 4]]
    kwargs = dict(config=config, max_new_tokens=5, eos_id=-1)

    def served(p, tokens, **kw):
        base, pool, ids = p
        return lora(base, pool, tokens, adapter_ids=ids, **kw)

    mixed = generate(served, (base, pool, jnp.array([2, -1, 1])), prompts, **kwargs)
    plain = lambda p, t, **kw: model.apply({"params": p}, t, **kw)
    alone = [
        generate(plain, jaxlora.merge(params, deltas[1]), prompts, **kwargs).tokens[0],
        generate(plain, params, prompts, **kwargs).tokens[1],
        generate(plain, jaxlora.merge(params, deltas[0]), prompts, **kwargs).tokens[2],
    ]
    np.testing.assert_array_equal(mixed.tokens, np.stack(alone))


def test_pool_errors(llama):
    _, _, params = llama
    _, (d,) = _deltas(params, 1, ranks=(3,))
    pool = jaxlora.multi.adapter_pool(d, capacity=2, rank=2)
    with pytest.raises(ValueError, match="rank 3, more than the pool's rank 2"):
        jaxlora.multi.put(pool, 0, d)
    with pytest.raises(ValueError, match=r"slot must be in \[0, 2\)"):
        jaxlora.multi.put(pool, 2, d)
    with pytest.raises(TypeError, match="slot must be an int"):
        jaxlora.multi.clear(pool, 1.0)
    _, attention = jaxlora.split(
        params,
        jaxlora.LoraConfig(rank=1, targets="attention", stacked_axes=1),
        key=jax.random.key(0),
    )
    with pytest.raises(ValueError, match="is adapted in the pool only"):
        jaxlora.multi.put(pool, 0, attention)
    _, dora = jaxlora.split(
        params,
        jaxlora.LoraConfig(rank=1, targets="all-linear", stacked_axes=1, use_dora=True),
        key=jax.random.key(0),
    )
    with pytest.raises(ValueError, match="rescales the whole weight"):
        jaxlora.multi.put(pool, 0, dora)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        jaxlora.multi.adapter_pool(d, capacity=0, rank=2)
    with pytest.raises(ValueError, match=r"pass a pool from jaxlora\.multi\.adapter_pool"):
        jaxlora.multi.put(d, 0, d)
