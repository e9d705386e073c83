"""The adapter-node protocol: every variant is a delta of trainable arrays only, and an artifact.

For each node type (LoRA, rsLoRA, PiSSA, OLoRA, DoRA, VeRA, AdaLoRA): an unmasked optax
optimizer with weight decay keeps the adapter maths, ``jax.tree.map`` and casts leave the
static metadata alone, checkpoints round-trip bit for bit (linen and NNX) and onto
shardings, adapters shard like their weights on 8 devices, and stacking works or says why
not. References are dense float64 re-computations.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora._node import AdapterNode, Constant
from jaxlora.plan import plan
from jaxlora.variants import AdaLoraConfig, VeraConfig
from tests.test_variants import mlp, normal

TOL = dict(rtol=1e-5, atol=1e-5)


def _configs():
    return {
        "lora": jaxlora.LoraConfig(rank=2, targets="kernel"),
        "rslora": jaxlora.LoraConfig(rank=2, alpha=3.0, rslora=True, targets="kernel"),
        "pissa": jaxlora.LoraConfig(rank=2, init="pissa", targets="kernel"),
        "olora": jaxlora.LoraConfig(rank=2, init="olora", targets="kernel"),
        "dora": jaxlora.LoraConfig(rank=2, targets="kernel", use_dora=True),
        "vera": VeraConfig(rank=8, targets="kernel"),
        "adalora": AdaLoraConfig(init_rank=3, target_rank=2, total_step=10, targets="kernel"),
    }


KINDS = list(_configs())


def _nodes(tree):
    return [n for n in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, AdapterNode))
            if isinstance(n, AdapterNode)]  # fmt: skip


def _dense_weight(weight, node):
    """The adapted weight, float64 numpy: the method's formula from the node's own arrays."""
    w = np.asarray(weight, np.float64).reshape(node.layout.matrix_shape)
    a, b = (np.asarray(f, np.float64) for f in node.factors())
    v = w + float(node.scale) * a @ b
    if node.kind == "dora":
        v = (
            np.asarray(node.m, np.float64)[..., None, :]
            * v
            / np.linalg.norm(v, axis=-2, keepdims=True)
        )
    return v.reshape(node.layout.shape)


def _train(kind, steps=30):
    params, x, apply = mlp()
    config = _configs()[kind]
    base, delta = jaxlora.split(params, config, key=jax.random.key(1))
    y = jnp.sin(normal(3, 5, seed=2))
    f = jaxlora.lora_apply(apply)
    tx = optax.adamw(3e-2, weight_decay=0.1)  # no mask: the delta is the trainable tree
    state = tx.init(delta)

    @jax.jit
    def step(delta, state):
        grads = jax.grad(lambda d: jnp.mean((f(base, d, x) - y) ** 2))(delta)
        updates, state = tx.update(grads, state, delta)
        return optax.apply_updates(delta, updates), state

    for _ in range(steps):
        delta, state = step(delta, state)
    return params, base, delta, config


@pytest.mark.parametrize("kind", KINDS)
def test_unmasked_adamw_keeps_the_adapter_maths(kind):
    params, base, trained, config = _train(kind)
    merged = jaxlora.merge(base, trained)
    for path in ("up", "down"):
        node = trained[path]["kernel"]
        np.testing.assert_allclose(
            merged[path]["kernel"], _dense_weight(base[path]["kernel"], node), **TOL
        )
        # weight decay never reached the scale: the node is still what the config makes
        config.check_node(f"{path}/kernel", node)
    # training moved the model: the optimizer reached every trainable array
    _, fresh = jaxlora.split(params, config, key=jax.random.key(1))
    for moved, start in zip(jax.tree.leaves(trained), jax.tree.leaves(fresh), strict=True):
        assert not np.array_equal(moved, start)


@pytest.mark.parametrize("kind", KINDS)
def test_tree_maps_and_casts_leave_static_metadata_alone(kind):
    params, _, _ = mlp()
    _, delta = jaxlora.split(params, _configs()[kind], key=jax.random.key(1))
    zero = jax.tree.map(lambda x: x * 0, delta)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), delta)
    for node, z, h in zip(_nodes(delta), _nodes(zero), _nodes(half), strict=True):
        assert z.scale == h.scale == node.scale and z.layout == node.layout
        assert jax.tree.structure(z) == jax.tree.structure(node)
        assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(z))
    summed = jax.tree.map(jnp.add, delta, delta)  # adding adapters adds arrays, not scales
    assert [n.scale for n in _nodes(summed)] == [n.scale for n in _nodes(delta)]
    # every leaf trains: the mask of a plain delta is all True
    assert all(jax.tree.leaves(jaxlora.trainable_mask(delta)))


def test_frozen_arrays_are_constants_outside_the_trainable_tree():
    params, _, _ = mlp()
    _, delta = jaxlora.split(params, _configs()["dora"], key=jax.random.key(1))
    node = delta["up"]["kernel"]
    assert isinstance(node.base_norm, Constant)
    np.testing.assert_allclose(
        node.base_norm.value, np.linalg.norm(np.asarray(params["up"]["kernel"]), axis=0), rtol=1e-6
    )
    assert sorted(type(node).trainable_fields()) == ["a", "b", "m"]
    _, vera = jaxlora.split(params, _configs()["vera"], key=jax.random.key(1))
    assert sorted(type(vera["up"]["kernel"]).trainable_fields()) == ["b", "d"]


# ------------------------------------------------------------------ checkpoints


def _perturbed(delta, seed=3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + 0.2 * rng.standard_normal(x.shape), x.dtype), delta
    )


def _same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trip_linen(tmp_path, kind):
    params, x, apply = mlp()
    config = _configs()[kind]
    base, delta = jaxlora.split(params, config, key=jax.random.key(1))
    delta = _perturbed(delta)
    path = jaxlora.save_adapter(tmp_path / kind, delta, config=config)
    loaded, loaded_config = jaxlora.load_adapter(path)
    assert loaded_config == config
    _same(loaded, delta)
    f = jax.jit(jaxlora.lora_apply(apply))
    np.testing.assert_array_equal(f(base, loaded, x), f(base, delta, x))
    if kind == "dora":  # the frozen base norms come back too: unmerge still works
        merged = jaxlora.merge(base, loaded)
        again = jaxlora.merge(jaxlora.unmerge(merged, loaded), loaded)
        chex.assert_trees_all_close(again, merged, **TOL)


@pytest.mark.parametrize("kind", ["dora", "vera", "adalora"])
def test_checkpoint_round_trip_nnx(tmp_path, kind):
    model = nnx.Sequential(nnx.Linear(6, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
    _, state = nnx.split(model)
    config = _configs()[kind]
    base, delta = jaxlora.split(state, config, key=jax.random.key(2))
    delta = _perturbed(delta)
    path = jaxlora.save_adapter(tmp_path / kind, delta, config=config)
    loaded, _ = jaxlora.load_adapter(path, base=base)
    assert type(loaded).__name__ == "State"
    _same(loaded, delta)


def test_imported_vera_projections_are_saved_once(tmp_path):
    """Given projections are constants shared by every node: one file in the checkpoint."""
    params, _, _ = mlp()
    config = _configs()["vera"]
    _, delta = jaxlora.split(params, config, key=jax.random.key(1))
    projection = delta["up"]["kernel"].projection
    a, b = (Constant(np.asarray(m) * 1.5) for m in projection.matrices())
    given = dataclasses.replace(projection, given=(a, b))
    delta = jax.tree.map(
        lambda n: dataclasses.replace(n, projection=given), delta,
        is_leaf=lambda x: isinstance(x, AdapterNode),
    )  # fmt: skip
    path = jaxlora.save_adapter(tmp_path / "vera", delta, config=config)
    assert len(list((path / "constants").iterdir())) == 2
    loaded, _ = jaxlora.load_adapter(path)
    np.testing.assert_array_equal(loaded["down"]["kernel"].projection.given[0].value, a.value)


# ------------------------------------------------------------------ sharding


def _sharded_mlp(mesh):
    params, x, apply = mlp()
    specs = {"up": {"kernel": P(None, "model"), "bias": P("model")},
             "down": {"kernel": P("model", None), "bias": P()}}  # fmt: skip
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    return jax.device_put(params, shardings), shardings, x, apply


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "dora", "vera", "adalora"])
def test_variants_shard_like_their_weights_and_restore_onto_old_shardings(tmp_path, kind):
    # Auto axes: on an Explicit mesh the row-parallel matmul itself needs out_sharding=
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    params, shardings, x, apply = _sharded_mlp(mesh)
    config = _configs()[kind]
    base, delta = jaxlora.split(params, config, key=jax.random.key(1))
    expected = jaxlora.adapter_shardings(shardings, delta)
    for node, want in zip(_nodes(delta), _nodes(expected), strict=True):
        for name in type(node).trainable_fields():
            got = getattr(node, name).sharding
            assert got.is_equivalent_to(getattr(want, name), getattr(node, name).ndim), name
    out_field = {"lora": "b", "dora": "m", "vera": "b", "adalora": "q"}[kind]  # along "out"
    assert getattr(expected["up"]["kernel"], out_field).spec[-1] == "model"  # column-parallel
    assert getattr(expected["down"]["kernel"], out_field).spec[-1] is None  # row-parallel
    delta = jax.device_put(_perturbed(delta), expected)
    path = jaxlora.save_adapter(tmp_path / kind, delta, config=config)
    # what an Orbax restore with a target does: the old tree's shardings
    restored, _ = jaxlora.load_adapter(path, shardings=jax.tree.map(lambda a: a.sharding, delta))
    f = jax.jit(jaxlora.lora_apply(apply))
    loss = lambda d: jnp.sum(f(base, d, x) ** 2)
    grads = jax.jit(jax.grad(loss))(restored)  # runs: no array on another device set
    chex.assert_trees_all_close(grads, jax.grad(loss)(jax.device_get(delta)), rtol=1e-4, atol=1e-5)
    single = jaxlora.lora_apply(apply)(jax.device_get(base), jax.device_get(delta), x)
    np.testing.assert_allclose(f(base, restored, x), single, **TOL)


# ------------------------------------------------------------------ stacking


@pytest.mark.parametrize("kind", ["dora", "vera", "adalora", "rslora"])
@pytest.mark.parametrize("routing", ["auto", "gather", "grouped"])
def test_variants_stack_and_route_per_example(kind, routing):
    params, _, apply = mlp()
    x = normal(4, 7, seed=9)
    config = _configs()[kind]
    base, d0 = jaxlora.split(params, config, key=jax.random.key(1))
    d0, d1 = _perturbed(d0, 4), _perturbed(d0, 5)
    f = jax.jit(jaxlora.lora_apply(apply, strict=True, routing=routing))
    for fold in (True, False):
        stacked = jaxlora.stack([d0, d1], fold_scales=fold)
        ids = jnp.array([1, 0, -1, 1])
        mixed = f(base, stacked, x, adapter_ids=ids)
        for row, i in enumerate(np.asarray(ids)):
            want = apply(params, x) if i < 0 else f(base, [d0, d1][i], x)
            np.testing.assert_allclose(mixed[row], want[row], **TOL)


def test_stacking_says_why_not():
    params, _, _ = mlp()
    _, v0 = jaxlora.split(params, VeraConfig(rank=8, targets="kernel"), key=jax.random.key(0))
    _, v1 = jaxlora.split(
        params, VeraConfig(rank=8, targets="kernel", projection_key=1), key=jax.random.key(0)
    )
    with pytest.raises(ValueError, match=r"'projection'.*same projection_key"):
        jaxlora.stack([v0, v1])
    with pytest.raises(TypeError, match=r"VeRA adapter's rank .* cannot be padded"):
        jaxlora.pad_rank(v0, 9)
    _, lora = jaxlora.split(
        params, jaxlora.LoraConfig(rank=2, targets="kernel"), key=jax.random.key(0)
    )
    with pytest.raises(
        ValueError, match=r"holds a VeraNode at '\w+/kernel' and deltas\[0\] a LoraNode"
    ):
        jaxlora.stack([lora, v0])
    _, dora = jaxlora.split(params, _configs()["dora"], key=jax.random.key(0))
    with pytest.raises(ValueError, match="not additive"):
        jaxlora.combine_adapters([dora, dora], [1.0, 1.0])


@pytest.mark.parametrize("kind", ["dora", "adalora"])
def test_pad_rank_of_variants_is_exact(kind):
    params, x, apply = mlp()
    base, delta = jaxlora.split(params, _configs()[kind], key=jax.random.key(1))
    delta = _perturbed(delta)
    f = jaxlora.lora_apply(apply)
    for fold in (True, False):
        padded = jaxlora.pad_rank(delta, 5, fold_scale=fold)
        assert all(n.rank == 5 for n in _nodes(padded))
        np.testing.assert_allclose(f(base, padded, x), f(base, delta, x), **TOL)


def test_combine_adapters_of_additive_variants_is_exact():
    params, _, _ = mlp()
    base, vera = jaxlora.split(params, _configs()["vera"], key=jax.random.key(1))
    _, ada = jaxlora.split(params, _configs()["adalora"], key=jax.random.key(1))
    vera, ada = _perturbed(vera), _perturbed(ada)
    both = jaxlora.combine_adapters([vera, ada], [0.5, 2.0])
    for path in ("up", "down"):
        w = np.asarray(base[path]["kernel"], np.float64)
        want = w + 0.5 * (_dense_weight(w, vera[path]["kernel"]) - w) + 2.0 * (
            _dense_weight(w, ada[path]["kernel"]) - w)  # fmt: skip
        np.testing.assert_allclose(jaxlora.merge(base, both)[path]["kernel"], want, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_the_planner_plans_every_variant(kind):
    """The plan's trainable count is the actual split's, and its memory plan compiles."""
    params, x, apply = mlp()
    config = _configs()[kind]
    base, delta = jaxlora.split(params, config, key=jax.random.key(1))
    want = jaxlora.count_parameters(base, delta).trainable
    expected_formula = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(delta))
    result = plan(apply, params, config, batch=x, optimizer=optax.adam(1e-3))
    assert result.lora.trainable_params == want == expected_formula
    assert result.lora.peak_bytes > 0
