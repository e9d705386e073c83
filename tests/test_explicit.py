"""LoRA on a mesh of ``Explicit`` axes (``jax.make_mesh``'s default since JAX 0.7).

A column/row-parallel MLP that states ``out_sharding=`` on its matmuls trains on such a
mesh without LoRA; under ``lora_apply`` the low-rank einsums state shardings too (the
output's, and the inputs' on the rank-sized intermediate), so the forward pass, the
gradients and an optimizer step compile and equal the merged model's. The same holds
for FSDP written the Explicit way (weights stored sharded, ``reshard`` before each
use: the factors are resharded alike) and on a mesh that mixes ``Explicit`` and
``Auto`` axes. Data-parallel and column-parallel gradients on Explicit meshes are
checked against one device in ``test_sharding.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlora


def _mlp(params, x):
    h = jnp.einsum("bd,df->bf", x, params["up"]["kernel"], out_sharding=P("data", "model"))
    h = jax.nn.relu(h)
    return jnp.einsum("bf,fd->bd", h, params["down"]["kernel"], out_sharding=P("data", None))


def _setup(mesh):
    rng = np.random.default_rng(0)
    put = lambda a, spec: jax.device_put(jnp.asarray(a, jnp.float32), NamedSharding(mesh, spec))
    params = {
        "up": {"kernel": put(rng.normal(size=(16, 32)) / 4, P(None, "model"))},
        "down": {"kernel": put(rng.normal(size=(32, 16)) / 6, P("model", None))},
    }
    x = put(rng.normal(size=(8, 16)), P("data", None))
    base, delta = jaxlora.split(
        params, jaxlora.LoraConfig(rank=4, targets="kernel"), key=jax.random.key(0)
    )
    delta = jax.tree.map(lambda z: z + jnp.asarray(rng.normal(size=z.shape) / 4, z.dtype), delta)
    delta = jax.device_put(
        delta, jaxlora.adapter_shardings(jax.tree.map(lambda w: w.sharding, base), delta)
    )
    return params, base, delta, x


def test_forward_gradients_and_a_step_on_an_explicit_mesh():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        _, base, delta, x = _setup(mesh)
        f = jaxlora.lora_apply(_mlp, strict=True)
        y = jax.jit(f)(base, delta, x)
        want = jax.jit(_mlp)(jaxlora.merge(base, delta), x)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        assert y.sharding.spec == P("data", None)

        def loss(strategy):
            g = jaxlora.lora_apply(_mlp, strategy=strategy)
            return lambda d: jnp.sum(jnp.sin(g(base, d, x)))

        got = jax.jit(jax.grad(loss("use-site")))(delta)
        ref = jax.jit(jax.grad(loss("merge")))(delta)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert got["up"]["kernel"].b.sharding.spec == P(None, "model")  # follows the weight
        assert got["down"]["kernel"].a.sharding.spec == P("model", None)

        tx = optax.adamw(1e-2, weight_decay=0.1)

        @jax.jit
        def step(d, state):
            value, grads = jax.value_and_grad(loss("use-site"))(d)
            updates, state = tx.update(grads, state, d)
            return optax.apply_updates(d, updates), state, value

        state = tx.init(delta)
        values = []
        for _ in range(5):
            delta, state, value = step(delta, state)
            values.append(float(value))
        assert values[-1] < values[0]


def _fsdp_mlp(params, x):
    """FSDP + TP, Explicit style: each weight is gathered over 'data' just before its use."""
    up = jax.sharding.reshard(params["up"]["kernel"], P(None, "model"))
    h = jax.nn.relu(jnp.einsum("bd,df->bf", x, up, out_sharding=P("data", "model")))
    down = jax.sharding.reshard(params["down"]["kernel"], P("model", None))
    return jnp.einsum("bf,fd->bd", h, down, out_sharding=P("data", None))


def _mixed_mlp(params, x):
    """Explicit 'data', Auto 'model': only the Explicit axis is stated."""
    h = jnp.einsum("bd,df->bf", x, params["up"]["kernel"], out_sharding=P("data", None))
    return jnp.einsum("bf,fd->bd", jax.nn.relu(h), params["down"]["kernel"])


CASES = {
    # name: (program, axis types of ("data", "model"), stored specs of up and down)
    "fsdp": (_fsdp_mlp, (AxisType.Explicit,) * 2, (P("data", "model"), P("model", "data"))),
    "mixed": (
        _mixed_mlp,
        (AxisType.Explicit, AxisType.Auto),
        (P(None, "model"), P("model", None)),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fsdp_and_mixed_axis_types_match_one_device(name):
    fn, axis_types, (up_spec, down_spec) = CASES[name]
    rng = np.random.default_rng(1)
    params = {
        "up": {"kernel": jnp.asarray(rng.normal(size=(16, 32)) / 4, jnp.float32)},
        "down": {"kernel": jnp.asarray(rng.normal(size=(32, 16)) / 6, jnp.float32)},
    }
    x = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    config = jaxlora.LoraConfig(rank=4, targets="kernel")
    base, delta = jaxlora.split(params, config, key=jax.random.key(0))
    delta = jax.tree.map(lambda z: z + jnp.asarray(rng.normal(size=z.shape) / 4, z.dtype), delta)

    def loss(base, delta, x):
        return jnp.sum(jnp.sin(jaxlora.lora_apply(fn, strict=True)(base, delta, x)))

    # the reference: the program on one device, with the merged weights
    with jax.set_mesh(jax.make_mesh((1, 1), ("data", "model"), axis_types=axis_types)):
        want = jax.jit(fn)(jaxlora.merge(base, delta), x)
        want_grads = jax.grad(lambda d: jnp.sum(jnp.sin(fn(jaxlora.merge(base, d), x))))(delta)

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=axis_types)
    with jax.set_mesh(mesh):
        stored = {"up": {"kernel": up_spec}, "down": {"kernel": down_spec}}
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), stored)
        sbase = jax.device_put(base, shardings)
        sdelta = jax.device_put(delta, jaxlora.adapter_shardings(shardings, delta))
        sx = jax.device_put(x, NamedSharding(mesh, P("data", None)))
        y = jax.jit(jaxlora.lora_apply(fn, strict=True))(sbase, sdelta, sx)  # strict: no merge
        grads = jax.jit(jax.grad(loss, argnums=1))(sbase, sdelta, sx)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    if name == "fsdp":  # gradients come back sharded like the stored adapters
        assert grads["up"]["kernel"].a.sharding.spec == P("data", None)
        assert grads["down"]["kernel"].b.sharding.spec == P(None, "data")
