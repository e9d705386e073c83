"""AdaLoRA: SVD-form nodes, the budget schedule, masking, orthogonality and export."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora.variants import AdaLoraConfig, AdaLoraNode, adalora, orthogonality_loss, to_lora
from tests.test_variants import mlp, normal, perturb

# ---------------------------------------------------------------- a small model with a stack


def _apply(p, x):
    h = jnp.tanh(x @ p["inp"]["kernel"])
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["layers"]["kernel"])
    return h @ p["head"]["kernel"]


def _problem(key):
    params = {
        "inp": {"kernel": normal(8, 6, seed=0) / 3},
        "layers": {"kernel": normal(2, 6, 6, seed=1) / 3},
        "head": {"kernel": normal(6, 4, seed=2) / 3},
    }
    x = normal(16, 8, seed=3)
    y = normal(16, 4, seed=4)
    return params, x, y


CONFIG = AdaLoraConfig(
    init_rank=4,
    target_rank=2,
    tinit=2,
    tfinal=3,
    delta_t=2,
    total_step=14,
    targets="kernel",
    stacked_axes={"layers/": 1},
)
N_MATRICES = 4  # inp, two stacked layers, head


def _train(key, config=CONFIG):
    """Trains with ``adalora``; returns the base, every (delta, state) and the compiled step."""
    params, x, y = _problem(key)
    base, delta = jaxlora.split(params, config, key=key)
    f = jaxlora.lora_apply(_apply, strict=True)

    def loss(delta):
        fit = jnp.mean((f(base, delta, x) - y) ** 2)
        return fit + config.orth_reg_weight * orthogonality_loss(delta)

    tx = adalora(config, optax.masked(optax.adam(3e-2), jaxlora.trainable_mask(delta)))

    @jax.jit
    def step(delta, state):
        updates, state = tx.update(jax.grad(loss)(delta), state, delta)
        return optax.apply_updates(delta, updates), state

    state = tx.init(delta)
    history = [(delta, state)]
    for _ in range(config.total_step + 2):
        delta, state = step(delta, state)
        history.append((delta, state))
    return base, history, step


@functools.cache
def _trained():
    """One training run shared by the tests that read it (it is read-only)."""
    return _train(jax.random.key(0))


def _nodes(delta):
    return [n for n in jax.tree.leaves(delta, is_leaf=jaxlora._node.is_node) if n is not None]


def _alive(delta):
    return sum(int(jnp.sum(n.e != 0)) for n in _nodes(delta))


# ---------------------------------------------------------------- nodes


def test_split_builds_svd_form_nodes(key):
    params, _, _ = _problem(key)
    base, delta = jaxlora.split(params, CONFIG, key=key)
    node = delta["layers"]["kernel"]
    assert isinstance(node, AdaLoraNode)
    chex.assert_shape([node.p, node.e, node.q], [(2, 6, 4), (2, 4), (2, 4, 6)])
    np.testing.assert_array_equal(node.e, 0.0)
    np.testing.assert_allclose(float(jnp.std(node.p)), 0.02, rtol=0.3)
    assert float(node.scale) == 2.0
    assert float(AdaLoraConfig(total_step=5, alpha=8).scale) == pytest.approx(8 / 12)
    assert (
        jaxlora.count_parameters(base, delta).trainable
        == (8 + 1 + 6) * 4 + 2 * (6 + 1 + 6) * 4 + (6 + 1 + 4) * 4
    )


def test_forward_matches_the_dense_formula(key):
    params, x, apply = mlp()
    config = AdaLoraConfig(init_rank=3, target_rank=2, total_step=10, targets="kernel")
    base, delta = jaxlora.split(params, config, key=key)
    delta = perturb(delta, key)
    dense = jax.tree.map(lambda w: w, base)
    for path in ("up", "down"):
        n = delta[path]["kernel"]
        p, e, q = (np.asarray(v, np.float64) for v in (n.p, n.e, n.q))
        want = np.asarray(base[path]["kernel"], np.float64) + float(n.scale) * (p * e) @ q
        np.testing.assert_allclose(jaxlora.merge(base, delta)[path]["kernel"], want, rtol=1e-5)
        dense[path]["kernel"] = jnp.asarray(want, jnp.float32)
    out = jax.jit(jaxlora.lora_apply(apply))(base, delta, x)
    np.testing.assert_allclose(out, apply(dense, x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- schedule


def test_schedule_is_peft_cubic_budget():
    c = CONFIG
    init, target = 4 * N_MATRICES, 2 * N_MATRICES
    final = c.total_step - c.tfinal
    for t in range(c.total_step + 3):
        budget, allocate = c.schedule(t, n_matrices=N_MATRICES)
        if t <= c.tinit:
            assert (budget, allocate) == (init, False)
        elif t > final:
            assert (budget, allocate) == (target, True)
        else:
            frac = 1 - (t - c.tinit) / (final - c.tinit)
            assert budget == int((init - target) * frac**3 + target)
            assert allocate == (t % c.delta_t == 0)
    budgets = [c.schedule(t, n_matrices=N_MATRICES)[0] for t in range(c.total_step)]
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] == target


def test_total_rank_follows_the_budget_without_recompiling():
    _, history, step = _trained()
    c = CONFIG
    final = c.total_step - c.tfinal
    masks_before = None
    for t, (delta, state) in enumerate(history[1:]):
        budget, allocate = c.schedule(t, n_matrices=N_MATRICES)
        kept = sum(int(jnp.sum(m)) for m in state.mask)
        if (t < final and allocate) or t == final:
            assert kept == budget == int(state.budget), t
            assert _alive(delta) == budget, t  # pruned E are exactly zero, kept ones are not
        elif t > final:
            assert kept == 2 * N_MATRICES
            chex.assert_trees_all_equal([np.asarray(m) for m in state.mask], masks_before)
            assert _alive(delta) == 2 * N_MATRICES  # the fixed mask is applied every step
        masks_before = [np.asarray(m) for m in state.mask]
    assert _alive(history[-1][0]) == c.target_rank * N_MATRICES
    assert step._cache_size() == 1  # one program for every allocation step


def test_masked_triplets_contribute_exactly_zero(key):
    base, history, _ = _trained()
    delta = history[-1][0]
    _, x, _ = _problem(key)

    def garbage(node, i):
        dead = node.e == 0
        noise = lambda s, k: 1e3 * normal(*s, seed=k)
        p = jnp.where(dead[..., None, :], noise(node.p.shape, 2 * i), node.p)
        q = jnp.where(dead[..., :, None], noise(node.q.shape, 2 * i + 1), node.q)
        return dataclasses.replace(node, p=p, q=q)

    leaves, treedef = jax.tree.flatten(delta, is_leaf=jaxlora._node.is_node)
    spoiled = treedef.unflatten([garbage(n, i) for i, n in enumerate(leaves)])
    f = jax.jit(jaxlora.lora_apply(_apply))
    np.testing.assert_array_equal(f(base, spoiled, x), f(base, delta, x))
    chex.assert_trees_all_equal(jaxlora.merge(base, spoiled), jaxlora.merge(base, delta))


def test_pruned_triplets_may_come_back(key):
    params = {"w": normal(6, 6)}
    config = AdaLoraConfig(init_rank=4, target_rank=2, delta_t=2, total_step=20, targets="w")
    _, delta = jaxlora.split(params, config, key=key)
    delta = perturb(delta, key)
    tx = adalora(config, optax.sgd(0.1))
    update = jax.jit(tx.update)
    grads = lambda t: jax.tree.map(lambda x: normal(*x.shape, seed=t), delta)
    state = tx.init(delta)
    for t in range(3):  # steps 0, 1 (no allocation) and 2 (budget 3 of 4)
        updates, state = update(grads(t), state, delta)
        delta = optax.apply_updates(delta, updates)
    (mask,) = state.mask
    assert int(jnp.sum(mask)) == 3
    dead = int(jnp.argmin(mask))
    assert float(delta["w"].e[dead]) == 0.0
    updates, state = update(grads(3), state, delta)  # step 3: no allocation
    assert float(updates["w"].e[dead]) != 0.0  # the pruned E trains on
    # make the pruned triplet the most important one; step 4 allocates again
    (ipt_p, ipt_e, ipt_q), (unc_p, unc_e, unc_q) = state.ipt[0], state.unc[0]
    state = state._replace(
        ipt=((ipt_p, ipt_e.at[dead].set(1e3), ipt_q),),
        unc=((unc_p, unc_e.at[dead].set(1e3), unc_q),),
    )
    delta = optax.apply_updates(delta, updates)
    updates, state = update(grads(4), state, delta)
    assert bool(state.mask[0][dead]) and int(jnp.sum(state.mask[0])) == 3


# ---------------------------------------------------------------- regularizer and export


def test_orthogonality_loss_matches_numpy(key):
    params, _, _ = _problem(key)
    _, delta = jaxlora.split(params, CONFIG, key=key)
    delta = perturb(delta, key)
    terms = []
    for node in _nodes(delta):
        p = np.asarray(node.p, np.float64).reshape(-1, *node.p.shape[-2:])
        q = np.asarray(node.q, np.float64).reshape(-1, *node.q.shape[-2:])
        eye = np.eye(node.rank)
        terms += [np.linalg.norm(pi.T @ pi - eye) for pi in p]
        terms += [np.linalg.norm(qi @ qi.T - eye) for qi in q]
    assert len(terms) == 2 * N_MATRICES
    np.testing.assert_allclose(orthogonality_loss(delta), np.mean(terms), rtol=1e-5)


def test_orthogonality_loss_is_zero_with_finite_gradient_when_orthonormal(key):
    q, _ = jnp.linalg.qr(normal(6, 6))
    layout = jaxlora._paths.Layout((), (6,), (6,))
    node = AdaLoraNode(q[:, :3], jnp.ones(3), q[:, :3].T, scale=1.0, layout=layout)
    value, grad = jax.value_and_grad(orthogonality_loss)({"w": node})
    assert float(value) < 1e-5
    chex.assert_tree_all_finite(grad)


def test_to_lora_exports_the_surviving_ranks():
    base, history, _ = _trained()
    delta = history[-1][0]
    lora = to_lora(delta)
    for path in ("inp", "layers", "head"):
        node = lora[path]["kernel"]
        assert type(node) is jaxlora.LoraNode
        alive = np.asarray(delta[path]["kernel"].e != 0).reshape(-1, 4).sum(-1)
        assert node.rank == alive.max()
    chex.assert_trees_all_close(jaxlora.merge(base, lora), jaxlora.merge(base, delta), atol=1e-6)


def test_to_lora_pads_stacked_layers_and_drops_empty_nodes(key):
    params, _, _ = _problem(key)
    _, delta = jaxlora.split(params, CONFIG, key=key)
    delta = perturb(delta, key)
    e = jnp.array([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 3.0, 0.0]])
    delta["layers"]["kernel"] = dataclasses.replace(delta["layers"]["kernel"], e=e)
    delta["head"]["kernel"] = dataclasses.replace(delta["head"]["kernel"], e=jnp.zeros(4))
    lora = to_lora(delta)
    assert lora["head"]["kernel"] is None
    node = lora["layers"]["kernel"]
    assert node.rank == 2
    np.testing.assert_allclose(
        node.delta_weight(), delta["layers"]["kernel"].delta_weight(), atol=1e-6
    )


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(target_rank=13), ValueError, "AdaLoRA only prunes"),
        (dict(init_rank=0), ValueError, "init_rank must be >= 1"),
        (dict(total_step=0), ValueError, "total_step must be >= 1"),
        (dict(total_step=10, tinit=8, tfinal=2), ValueError, "no steps to prune"),
        (dict(delta_t=0), ValueError, "delta_t must be >= 1"),
        (dict(beta1=1.0), ValueError, "beta1 must be a float in"),
        (dict(beta2=0.0), ValueError, "beta2 must be a float in"),
        (dict(orth_reg_weight=-1.0), ValueError, "orth_reg_weight must be a finite number >= 0"),
        (dict(alpha=0), ValueError, "alpha must be a finite number > 0"),
        (dict(tinit=1.5), TypeError, "tinit must be an int"),
        (dict(targets=["ok", 3]), TypeError, "targets must be"),
    ],
)
def test_config_errors(kwargs, error, match):
    kwargs = {"total_step": 100, **kwargs}
    with pytest.raises(error, match=match):
        AdaLoraConfig(**kwargs)


def test_total_step_is_required():
    with pytest.raises(TypeError, match="total_step"):
        AdaLoraConfig()


def test_init_rank_larger_than_the_weight_raises(key):
    with pytest.raises(ValueError, match="init_rank 12 is too large for 'w'"):
        jaxlora.split({"w": jnp.ones((4, 6))}, AdaLoraConfig(total_step=5, targets="w"), key=key)


def test_adalora_needs_adalora_nodes_and_params(key):
    params = {"w": normal(6, 6)}
    _, lora_delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="w"), key=key)
    config = AdaLoraConfig(init_rank=2, target_rank=1, total_step=5, targets="w")
    tx = adalora(config, optax.sgd(0.1))
    with pytest.raises(ValueError, match="holds no AdaLoraNode"):
        tx.init(lora_delta)
    with pytest.raises(ValueError, match="holds no AdaLoraNode"):
        orthogonality_loss(lora_delta)
    _, delta = jaxlora.split(params, config, key=key)
    state = tx.init(delta)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(delta, state)
    with pytest.raises(TypeError, match="AdaLoraConfig"):
        adalora(jaxlora.LoraConfig(), optax.sgd(0.1))
