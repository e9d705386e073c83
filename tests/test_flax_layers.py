"""Flax's own layers, used as their docs show, with layouts read by ``infer_layout``.

Nobody here wrote these modules: ``nnx.MultiHeadAttention``, ``nnx.Conv`` (2-D,
1-D, depthwise), ``nnx.Embed``, ``nnx.LinearGeneral``, ``nnx.scan``-ed blocks
and linen's ``nn.scan``. For each, the layout ``infer_layout`` reads is the one
the layer's documentation gives its kernel, and the adapted model run by the
use-site engine under ``strict=True`` (no weight merged at its use) equals the
model run on ``merge``'s dense weights, values and gradients.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from tests.helpers import normal, randomize_b


class _Attention(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(
            num_heads=4, in_features=16, qkv_features=16, decode=False, rngs=rngs
        )
        self.mlp = nnx.Linear(16, 32, rngs=rngs)

    def __call__(self, x):
        return self.mlp(self.attn(x))


class _Convs(nnx.Module):
    def __init__(self, rngs):
        self.conv2d = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=rngs)
        self.depthwise = nnx.Conv(8, 8, kernel_size=(3, 3), feature_group_count=8, rngs=rngs)

    def __call__(self, x):
        return self.depthwise(jax.nn.relu(self.conv2d(x)))


class _Conv1d(nnx.Module):
    def __init__(self, rngs):
        self.conv1d = nnx.Conv(6, 10, kernel_size=(5,), rngs=rngs)

    def __call__(self, x):
        return self.conv1d(x)


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 12, rngs=rngs)
        self.down = nnx.Linear(12, 8, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


class _Scanned(nnx.Module):
    """Blocks made by ``nnx.vmap`` and run by ``nnx.scan``, as the Flax NNX docs show."""

    def __init__(self, rngs):
        make = nnx.vmap(lambda key: _Block(nnx.Rngs(key)), in_axes=0, out_axes=0)
        self.blocks = make(jax.random.split(jax.random.key(0), 3))
        self.embed = nnx.Embed(20, 8, rngs=rngs)
        self.proj = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
        self.merge = nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), rngs=rngs)

    def __call__(self, ids):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        x = body(self.embed(ids), self.blocks)
        return self.embed.attend(self.merge(self.proj(x)))


def _nnx(make, x):
    graphdef, state = nnx.split(make(nnx.Rngs(0)))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state, x


def _linen_scan():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return jnp.tanh(nn.Dense(8, name="mlp")(x)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(
                Layer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=4,
            )
            return scan(name="layers")(x, None)[0]

    x = normal(3, 8)
    params = Stack().init(jax.random.key(0), x)["params"]
    return (lambda p, x: Stack().apply({"params": p}, x)), params, x


# Each kernel's layout as its layer documents it: [stacked..., inputs..., outputs...].
CASES = {
    "nnx.MultiHeadAttention": (
        lambda: _nnx(_Attention, normal(2, 5, 16)),
        {"attn/out/kernel": (0, 2)},  # (heads, head_dim, features); q/k/v: the default
        "all-linear",
    ),
    "nnx.Conv 2-D and depthwise": (
        lambda: _nnx(_Convs, normal(2, 6, 6, 3)),
        {"conv2d/kernel": (0, 3), "depthwise/kernel": (0, 3)},  # (kh, kw, in/groups, out)
        "kernel",
    ),
    "nnx.Conv 1-D": (
        lambda: _nnx(_Conv1d, normal(2, 9, 6)),
        {"conv1d/kernel": (0, 2)},  # (kw, in, out): the default would read (kw) as inputs
        "kernel",
    ),
    "nnx.scan blocks, Embed, LinearGeneral": (
        lambda: _nnx(_Scanned, jnp.array([[1, 4, 7], [0, 19, 3]])),
        {
            "blocks/up/kernel": (1, 1),
            "blocks/down/kernel": (1, 1),
            "merge/kernel": (0, 2),  # LinearGeneral over (2, 4) inputs
        },  # embed: looked up by rows and attended by its transpose: left to the default
        "kernel|embedding",
    ),
    "linen nn.scan": (_linen_scan, {"layers/mlp/kernel": (1, 1)}, "mlp"),
}


def _expected_config(layouts):
    return {
        "stacked_axes": {f"^{re.escape(p)}$": s for p, (s, _) in layouts.items() if s},
        "input_axes": {f"^{re.escape(p)}$": i for p, (_, i) in layouts.items() if i != 1},
    }


@pytest.mark.parametrize("name", list(CASES))
def test_infer_layout_reads_each_layers_documented_layout(name):
    make, layouts, _ = CASES[name]
    fn, params, x = make()
    assert jaxlora.infer_layout(fn, params, x) == _expected_config(layouts)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_adapted_flax_layers_match_merge_with_the_inferred_layout(name):
    make, layouts, targets = CASES[name]
    fn, params, x = make()
    config = jaxlora.LoraConfig(rank=2, targets=targets, **jaxlora.infer_layout(fn, params, x))
    base, delta = jaxlora.split(params, config, key=jax.random.key(1))
    adapted = {p for p, _ in _leaves(delta)}
    assert set(layouts) <= adapted, adapted
    delta = randomize_b(delta, jax.random.key(2))
    f = jaxlora.lora_apply(fn, strict=True)  # raises wherever a weight would be merged
    want = fn(jaxlora.merge(base, delta), x)
    np.testing.assert_allclose(jax.jit(f)(base, delta, x), want, rtol=2e-5, atol=2e-5)

    def loss(d, strategy):
        y = jaxlora.lora_apply(fn, strategy=strategy)(base, d, x)
        return jnp.sum(jnp.sin(y))

    got = jax.grad(loss)(delta, "use-site")
    ref = jax.grad(loss)(delta, "merge")
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_the_default_layout_misreads_a_1d_conv_kernel():
    """Why inference matters: read as (kw) → (in, out), the kernel's use cannot be factored."""
    fn, params, x = _nnx(_Conv1d, normal(2, 9, 6))
    base, delta = jaxlora.split(
        params, jaxlora.LoraConfig(rank=2, targets="kernel"), key=jax.random.key(1)
    )
    with pytest.raises(jaxlora.FallbackError, match="conv1d/kernel"):
        jaxlora.lora_apply(fn, strict=True)(base, delta, x)


def test_infer_layout_accepts_abstract_inputs_and_rejects_a_non_callable():
    fn, params, x = _nnx(_Conv1d, normal(2, 9, 6))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, x))
    assert jaxlora.infer_layout(fn, *abstract) == _expected_config({"conv1d/kernel": (0, 2)})
    with pytest.raises(TypeError, match="callable"):
        jaxlora.infer_layout("model.apply", params, x)


def test_a_kernel_stored_out_by_in_keeps_the_default():
    """``x @ W.T`` with ``W: (out, in)`` is not ``[inputs..., outputs...]``: nothing is listed."""
    params = {"proj": {"kernel": normal(6, 4)}}
    fn = lambda p, x: x @ p["proj"]["kernel"].T
    assert jaxlora.infer_layout(fn, params, normal(3, 4)) == {"stacked_axes": {}, "input_axes": {}}


def _leaves(delta):
    return [
        (jaxlora._paths.path_str(p), n)
        for p, n in jax.tree_util.tree_flatten_with_path(
            delta, is_leaf=lambda z: isinstance(z, jaxlora.LoraNode)
        )[0]
        if isinstance(n, jaxlora.LoraNode)
    ]


# ------------------------------------------------------------------ weight-normalized kernels


def _weight_norm(layer, x):
    model = nn.WeightNorm(layer)
    params = model.init(jax.random.key(0), x)["params"]
    return (lambda p, x: model.apply({"params": p}, x)), params


@pytest.mark.slow
@pytest.mark.parametrize(
    "layer, shape, input_axes",
    [
        (nn.Dense(6), (3, 4), None),
        (nn.Conv(5, kernel_size=(3, 3)), (2, 6, 6, 3), {"kernel": 3}),
    ],
    ids=["Dense", "Conv"],
)
def test_a_weight_normalized_kernel_is_factored(layer, shape, input_axes):
    """``flax.linen.WeightNorm``: ``g · V / ||V||`` over the inputs, ``V = W + s·a@b``.

    The column norms come from the factors (no merged ``V``) and the multiplier
    scales the layer's output: equal to the dense weight-normalized model.
    """
    x = normal(*shape, seed=4)
    apply, params = _weight_norm(layer, x)
    config = jaxlora.LoraConfig(rank=2, targets="kernel$", input_axes=input_axes)
    base, delta = jaxlora.split(params, config, key=jax.random.key(1))
    delta = randomize_b(delta, jax.random.key(2), scale=0.3)
    kernel = base["layer_instance"]["kernel"]
    node = delta["layer_instance"]["kernel"]
    v = kernel + node.scale * (node.a @ node.b).reshape(kernel.shape)
    axes = tuple(range(kernel.ndim - 1))
    dense = v / jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True) + 1e-12)
    dense = dense * params["layer_instance/kernel/scale"]  # the normalized kernel, by hand
    layer_params = {"params": {"kernel": dense, "bias": base["layer_instance"]["bias"]}}
    want = layer.apply(layer_params, x)
    f = jaxlora.lora_apply(apply, strict=True)
    np.testing.assert_allclose(jax.jit(f)(base, delta, x), want, rtol=2e-5, atol=2e-5)
    loss = lambda s: lambda d: jnp.sum(jnp.sin(jaxlora.lora_apply(apply, strategy=s)(base, d, x)))
    got, ref = jax.grad(loss("use-site"))(delta), jax.grad(loss("merge"))(delta)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_a_multiplier_along_the_inputs_falls_back_and_stays_right():
    """``W * m[:, None]`` scales inputs, not outputs: merged at the use, with a warning."""
    params = {"proj": {"kernel": normal(4, 6)}}
    m = jnp.arange(1.0, 5.0)[:, None]
    fn = lambda p, x: x @ (p["proj"]["kernel"] * m)
    base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="proj"),
                                key=jax.random.key(0))  # fmt: skip
    delta = randomize_b(delta, jax.random.key(1))
    x = normal(3, 4)
    with pytest.warns(jaxlora.FallbackWarning, match="mul"):
        got = jaxlora.lora_apply(fn)(base, delta, x)
    np.testing.assert_allclose(got, fn(jaxlora.merge(base, delta), x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_an_l2_penalty_on_an_adapted_weight_is_factored():
    """``sum(W²)`` over every axis (weight decay in the loss): the column norms, summed."""
    params = {"layers": {"proj": {"kernel": normal(3, 4, 6)}}}

    def fn(p, x):
        w = p["layers"]["proj"]["kernel"]
        y = jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl @ wl.T), None), x, w)[0]
        return jnp.sum(y) + 0.1 * jnp.sum(w**2) + jnp.sum(jnp.square(w), axis=(0, 1))

    config = jaxlora.LoraConfig(rank=2, targets="proj", stacked_axes=1)
    base, delta = jaxlora.split(params, config, key=jax.random.key(0))
    delta = randomize_b(delta, jax.random.key(1), scale=0.3)
    x = normal(2, 4)
    f = jaxlora.lora_apply(fn, strict=True)
    want = fn(jaxlora.merge(base, delta), x)
    np.testing.assert_allclose(jax.jit(f)(base, delta, x), want, rtol=1e-5, atol=1e-5)
    loss = lambda s: lambda d: jnp.sum(jaxlora.lora_apply(fn, strategy=s)(base, d, x))
    got, ref = jax.grad(loss("use-site"))(delta), jax.grad(loss("merge"))(delta)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
