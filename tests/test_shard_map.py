"""``shard_map`` bodies: adapters sliced per shard like their weights, against one device.

On 8 simulated CPU devices (the root ``conftest.py``). Each program is written
the way ``shard_map`` code is (tensor-parallel MLP with a ``psum``, FSDP with an
``all_gather`` of the weight shards); the reference is the same model without
``shard_map`` on the ``merge``d dense weights. ``strict=True`` everywhere: a
weight merged at its use would raise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import jaxlora

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _mesh(shape, names, kind=AxisType.Auto):
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "up": {"kernel": jnp.asarray(rng.normal(size=(16, 32)) / 4, jnp.float32)},
        "down": {"kernel": jnp.asarray(rng.normal(size=(32, 16)) / 4, jnp.float32)},
    }


def dense(p, x):
    return jax.nn.gelu(x @ p["up"]["kernel"]) @ p["down"]["kernel"]


def tensor_parallel(mesh, check_vma):
    """Column-parallel ``up``, row-parallel ``down``, one ``psum``; the batch over ``data``."""

    def body(up, down, x):
        return jax.lax.psum(jax.nn.gelu(x @ up) @ down, "model")

    def apply(p, x):
        specs = (P(None, "model"), P("model", None), P("data", None))
        f = jax.shard_map(
            body, mesh=mesh, in_specs=specs, out_specs=P("data", None), check_vma=check_vma
        )
        return f(p["up"]["kernel"], p["down"]["kernel"], x)

    return apply


def fsdp(mesh, check_vma):
    """Weights sharded over ``data`` on their first axis, gathered whole before each use."""

    def body(up, down, x):
        gather = lambda w: jax.lax.all_gather(w, "data", axis=0, tiled=True)
        return jax.nn.gelu(x @ gather(up)) @ gather(down)

    def apply(p, x):
        specs = (P("data", None), P("data", None), P("data", None))
        f = jax.shard_map(
            body, mesh=mesh, in_specs=specs, out_specs=P("data", None), check_vma=check_vma
        )
        return f(p["up"]["kernel"], p["down"]["kernel"], x)

    return apply


PROGRAMS = {
    "tensor parallel": (tensor_parallel, ((2, 4), ("data", "model"))),
    "fsdp": (fsdp, ((8,), ("data",))),
}


def _check(apply, base, delta, x, reference, plain=None):
    """``apply`` through lora_apply equals ``reference`` (on ``plain``: unsharded copies)."""
    plain = (base, delta, x) if plain is None else plain
    f = jaxlora.lora_apply(apply, strict=True)
    np.testing.assert_allclose(jax.jit(f)(base, delta, x), reference(*plain),
                               rtol=1e-5, atol=1e-5)  # fmt: skip

    def loss(fn, base, x):
        return lambda d: jnp.sum(jnp.sin(fn(base, d, x)))

    got = jax.jit(jax.grad(loss(f, base, x)))(delta)
    want = jax.grad(loss(reference, plain[0], plain[2]))(plain[1])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("name", list(PROGRAMS))
@pytest.mark.parametrize("use_dora", [False, True])
def test_a_shard_map_body_is_factored_and_matches_one_device(name, check_vma, use_dora):
    make, (shape, names) = PROGRAMS[name]
    config = jaxlora.LoraConfig(rank=2, targets="kernel", use_dora=use_dora)
    base, delta = jaxlora.split(_params(), config, key=jax.random.key(0))
    delta = jax.tree.map(lambda z: z + 0.05, delta)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16)), jnp.float32)
    reference = lambda b, d, x: dense(jaxlora.merge(b, d), x)
    _check(make(_mesh(shape, names), check_vma), base, delta, x, reference)


def test_dropout_in_a_shard_map_body_masks_each_shard_differently():
    """With dropout the branch changes the output; each data shard draws its own mask."""
    mesh = _mesh((8,), ("data",))
    apply = fsdp(mesh, True)
    config = jaxlora.LoraConfig(rank=2, targets="kernel", dropout=0.5)
    base, delta = jaxlora.split(_params(), config, key=jax.random.key(0))
    delta = jax.tree.map(lambda z: z + 0.3, delta)
    x = jnp.ones((8, 16))  # every row the same: only the masks tell the rows apart
    f = jax.jit(jaxlora.lora_apply(apply, strict=True))
    y = f(base, delta, x, dropout_key=jax.random.key(3))
    plain = f(base, delta, x)
    assert not np.allclose(y, plain)
    assert len({tuple(np.round(np.asarray(row), 5)) for row in y}) == 8


def test_a_quantized_base_in_a_shard_map_body_is_dequantized_there_and_stays_right():
    """The gap: QLoRA bases are not sliced per shard; the weight is merged at the boundary."""
    mesh = _mesh((2, 4), ("data", "model"))
    apply = tensor_parallel(mesh, True)
    base, delta = jaxlora.split(
        _params(), jaxlora.LoraConfig(rank=2, targets="kernel"), key=jax.random.key(0)
    )
    q = jaxlora.quantize(base, block_size=16)
    x = jnp.ones((8, 16))
    with pytest.warns(jaxlora.FallbackWarning, match="shard_map"):
        got = jaxlora.lora_apply(apply)(q, delta, x)
    want = dense(jaxlora.merge(jaxlora.dequantize(q), delta), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_an_explicit_mesh_with_sharded_weights_and_adapters_matches_one_device():
    """On an Explicit mesh the operands must already lie as the specs say: so do the adapters."""
    mesh = _mesh((2, 4), ("data", "model"), AxisType.Explicit)
    apply = tensor_parallel(mesh, True)
    config = jaxlora.LoraConfig(rank=2, targets="kernel")
    base, delta = jaxlora.split(_params(), config, key=jax.random.key(0))
    delta = jax.tree.map(lambda z: z + 0.05, delta)
    shardings = {
        "up": {"kernel": jax.NamedSharding(mesh, P(None, "model"))},
        "down": {"kernel": jax.NamedSharding(mesh, P("model", None))},
    }
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16)), jnp.float32)
    plain = (base, delta, x)
    base = jax.device_put(base, shardings)
    delta = jax.device_put(delta, jaxlora.adapter_shardings(shardings, delta))
    x = jax.device_put(x, jax.NamedSharding(mesh, P("data", None)))
    reference = lambda b, d, x: dense(jaxlora.merge(b, d), x)
    with jax.set_mesh(mesh):
        _check(apply, base, delta, x, reference, plain)
    assert delta["up"]["kernel"].b.sharding.spec == P(None, "model")  # b follows W's outputs
