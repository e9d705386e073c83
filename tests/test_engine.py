"""The use-site engine equals the merge strategy, construct by construct."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxlora
from tests.fixtures import Stack
from tests.helpers import dense_merge, randomize_b

RTOL = 1e-5


def assert_use_site_equals_merge(
    fn, params, config, *args, key=None, jit=True, grad=True, **kwargs
):
    """Outputs and (with ``grad``) gradients w.r.t. a and b agree between the two strategies."""
    key = jax.random.key(0) if key is None else key
    base, delta = jaxlora.split(params, config, key=key)
    delta = randomize_b(delta, jax.random.fold_in(key, 1))
    use_site = jaxlora.lora_apply(fn, strict=True)
    merged = jaxlora.lora_apply(fn, strategy="merge")

    def loss(apply):
        def f(delta):
            out = apply(base, delta, *args, **kwargs)
            return sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(out))

        return jax.jit(jax.value_and_grad(f)) if jit else jax.value_and_grad(f)

    out_u = (jax.jit(use_site) if jit else use_site)(base, delta, *args, **kwargs)
    out_m = merged(base, delta, *args, **kwargs)
    chex.assert_trees_all_close(out_u, out_m, rtol=RTOL, atol=1e-5)
    if not grad:  # e.g. lax.while_loop, which reverse mode cannot differentiate
        return base, delta
    (v_u, g_u), (v_m, g_m) = loss(use_site)(delta), loss(merged)(delta)
    np.testing.assert_allclose(v_u, v_m, rtol=RTOL, atol=1e-4)
    chex.assert_trees_all_close(g_u, g_m, rtol=1e-4, atol=1e-5)
    # the gradients are not trivially zero
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_u)) > 0
    return base, delta


def primitives_of(fn, *args):
    """Names of the primitives in ``fn``'s jaxpr, sub-jaxprs included."""
    names = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.append(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


# ---------------------------------------------------------------- linen models


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(16, name="up")(x))
        return nn.Dense(6, name="down")(x)


def test_linen_mlp(key):
    x = jax.random.normal(key, (4, 7, 8))
    params = MLP().init(key, x)["params"]
    apply = lambda p, x: MLP().apply({"params": p}, x)
    assert_use_site_equals_merge(apply, params, jaxlora.LoraConfig(rank=3, targets="kernel"), x)


def test_no_merged_weight_in_the_program(key):
    """The use-site program never adds a (16, 6) delta to the weight."""
    x = jax.random.normal(key, (4, 8))
    params = MLP().init(key, x)["params"]
    base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=3, targets="kernel"), key=key)
    jaxpr = jax.make_jaxpr(jaxlora.lora_apply(lambda p, x: MLP().apply({"params": p}, x)))(
        base, delta, x
    )
    weight_shapes = {(8, 16), (16, 6)}
    made = [
        tuple(v.aval.shape)
        for eqn in jaxpr.jaxpr.eqns
        for v in eqn.outvars
        if eqn.primitive.name in ("add", "dot_general")
    ]
    assert not weight_shapes & set(made)
    merged = jax.make_jaxpr(
        jaxlora.lora_apply(lambda p, x: MLP().apply({"params": p}, x), strategy="merge")
    )(base, delta, x)
    assert weight_shapes & {
        tuple(v.aval.shape) for eqn in merged.jaxpr.eqns for v in eqn.outvars
    }  # the check above can fail


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 4), name="query")(x)
        k = nn.DenseGeneral((2, 4), name="key")(x)
        v = nn.DenseGeneral((2, 4), name="value")(x)
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0)
        o = jnp.einsum("bhqk,bkhd->bqhd", w, v)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(o)


def test_dense_general_attention(key):
    x = jax.random.normal(key, (2, 5, 8))
    params = Attention().init(key, x)["params"]
    config = jaxlora.LoraConfig(rank=3, targets="attention", input_axes={"out/": 2})
    apply = lambda p, x: Attention().apply({"params": p}, x)
    assert_use_site_equals_merge(apply, params, config, x)


@pytest.mark.parametrize(
    ("spec", "w_shape", "x_shape", "input_axes", "stacked_axes"),
    [
        ("btd,dhk->bthk", (8, 2, 3), (2, 5, 8), 1, 0),
        ("bthk,hkd->btd", (2, 3, 8), (2, 5, 2, 3), 2, 0),
        ("btd,kd->btk", (6, 8), (2, 5, 8), 1, 0),  # weight used transposed: contracts its output
        ("lbd,ldk->lbk", (3, 8, 6), (3, 4, 8), 1, 1),  # stacked axis as a batch dimension
        ("bd,dk->bkd", (8, 6), (4, 8), 1, 0),  # an input axis that stays free
    ],
)
def test_einsum(key, spec, w_shape, x_shape, input_axes, stacked_axes):
    params = {"w": jax.random.normal(key, w_shape)}
    x = jax.random.normal(jax.random.key(2), x_shape)
    config = jaxlora.LoraConfig(
        rank=2, targets="w", input_axes=input_axes, stacked_axes=stacked_axes
    )
    fn = lambda p, x: jnp.einsum(spec, x, p["w"])
    assert_use_site_equals_merge(fn, params, config, x)


def test_conv(key):
    conv = nn.Conv(6, (3, 3), padding="SAME")
    x = jax.random.normal(key, (2, 8, 8, 4))
    params = conv.init(key, x)["params"]
    apply = lambda p, x: conv.apply({"params": p}, x)
    config = jaxlora.LoraConfig(rank=2, targets="kernel", input_axes=3)
    assert_use_site_equals_merge(apply, params, config, x)


class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(20, 8, name="embed")
        h = nn.Dense(8, name="mix")(embed(ids))
        return embed.attend(jnp.tanh(h))


@pytest.mark.parametrize("use_dora", [False, True])
def test_tied_embedding_lookup_and_attend(key, use_dora):
    """With DoRA, ``attend`` contracts the scaled features: the multiplier scales its input."""
    ids = jax.random.randint(key, (3, 5), 0, 20)
    params = TiedLM().init(key, ids)["params"]
    apply = lambda p, ids: TiedLM().apply({"params": p}, ids)
    config = jaxlora.LoraConfig(rank=4, targets=["embedding", "kernel"], use_dora=use_dora)
    assert_use_site_equals_merge(apply, params, config, ids)


@pytest.mark.parametrize("remat", [False, True])
def test_nn_scan_stacked_layers(key, remat):
    x = jax.random.normal(key, (4, 8))
    params = Stack(remat).init(key, x)["params"]
    assert params["layers"]["proj"]["kernel"].shape == (3, 8, 8)
    config = jaxlora.LoraConfig(rank=2, targets="kernel", stacked_axes=1)
    apply = lambda p, x: Stack(remat).apply({"params": p}, x)
    base, delta = assert_use_site_equals_merge(apply, params, config, x)
    prims = primitives_of(jaxlora.lora_apply(apply), base, delta, x)
    assert "scan" in prims and (("remat2" in prims or "checkpoint" in prims) == remat)


def test_stacked_weight_read_as_unstacked_falls_back_with_a_warning(key):
    x = jax.random.normal(key, (4, 8))
    params = Stack(False).init(key, x)["params"]
    # stacked_axes left at 0: the (3, 8, 8) kernel reads as in=3, out=(8, 8)
    base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="kernel"), key=key)
    apply = lambda p, x: Stack(False).apply({"params": p}, x)
    with pytest.warns(jaxlora.FallbackWarning, match="layers/proj/kernel"):
        out = jaxlora.lora_apply(apply)(base, delta, x)
    np.testing.assert_allclose(
        out, jaxlora.lora_apply(apply, strategy="merge")(base, delta, x), rtol=RTOL
    )


def _fused_qkv(p, x):
    """A fused (in, 3·d) kernel cut into q/k/v by columns, and an input-sliced use."""
    w = p["qkv"]["kernel"]
    q, k, v = w[:, :8], w[:, 8:16], w[:, 16::1]
    scores = jax.nn.softmax((x @ q) @ (x @ k).T)
    return scores @ (x @ v) + x[:, :6] @ w[2:8, ::3]


def _layer_by_index(p, x):
    """Layers of a stacked kernel taken one by one: a static index, then a traced one."""
    w = p["layers"]["kernel"]
    x = jnp.tanh(x @ w[0])
    return jax.lax.fori_loop(1, 3, lambda i, h: jnp.tanh(h @ w[i]), x)


@pytest.mark.parametrize("use_dora", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_slices_of_a_weight_slice_its_factors(key, use_dora):
    x = jax.random.normal(key, (5, 12))
    fused = {"qkv": {"kernel": jax.random.normal(jax.random.fold_in(key, 1), (12, 24)) / 4}}
    config = jaxlora.LoraConfig(rank=3, targets="kernel", use_dora=use_dora)
    assert_use_site_equals_merge(_fused_qkv, fused, config, x)
    stacked = {"layers": {"kernel": jax.random.normal(jax.random.fold_in(key, 2), (3, 12, 12))}}
    layout = jaxlora.infer_layout(_layer_by_index, stacked, x)
    assert layout["stacked_axes"] == {"^layers/kernel$": 1}
    config = jaxlora.LoraConfig(rank=3, targets="kernel", use_dora=use_dora, **layout)
    assert_use_site_equals_merge(_layer_by_index, stacked, config, x)


def test_slices_of_a_quantized_weight(key):
    """A static slice stays lazy (dequantized at its use); a traced one merges there, right."""
    x = jax.random.normal(key, (5, 12))
    params = {"layers": {"kernel": jax.random.normal(jax.random.fold_in(key, 2), (3, 12, 12))}}
    config = jaxlora.LoraConfig(rank=3, targets="kernel", stacked_axes=1)
    base, delta = jaxlora.split(params, config, key=key)
    qbase, delta = jaxlora.quantize(base, block_size=16), randomize_b(delta, key)
    want = _layer_by_index(jaxlora.merge(jaxlora.dequantize(qbase), delta), x)
    static = lambda p, x: jnp.tanh(x @ p["layers"]["kernel"][2])
    np.testing.assert_allclose(
        jaxlora.lora_apply(static, strict=True)(qbase, delta, x),
        static(jaxlora.merge(jaxlora.dequantize(qbase), delta), x),
        rtol=RTOL,
        atol=1e-5,
    )
    with pytest.warns(jaxlora.FallbackWarning, match="dynamic_slice"):
        got = jaxlora.lora_apply(_layer_by_index)(qbase, delta, x)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5)


# ---------------------------------------------------------------- nnx


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.down = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


def test_nnx_model(key):
    graphdef, state = nnx.split(NnxMLP(nnx.Rngs(0)))
    x = jax.random.normal(key, (5, 8))
    apply = lambda s, x: nnx.merge(graphdef, s)(x)
    assert_use_site_equals_merge(apply, state, jaxlora.LoraConfig(rank=2, targets="kernel"), x)


# ---------------------------------------------------------------- control flow


@jax.jit
def _inner(w, h):
    return jnp.tanh(h @ w)


def _cond_fn(p, x):
    h = jax.lax.cond(x.sum() > 0, lambda h: h @ p["w"], lambda h: h @ p["w"].T, x)
    h = _inner(p["v"], h)
    return jax.lax.switch(1, [lambda h: h, lambda h: h @ p["v"]], h)


def _while_fn(p, x):
    body = lambda c: (_inner(p["v"], c[0]) @ p["w"], c[1] + 1)
    return jax.lax.while_loop(lambda c: c[1] < 3, body, (x, 0))[0]


@pytest.mark.parametrize("jit", [True, False])
def test_plain_function_with_cond_switch_and_nested_jit(key, jit):
    params = {"w": jax.random.normal(key, (6, 6)) / 3, "v": jax.random.normal(key, (6, 6)) / 3}
    x = jax.random.normal(jax.random.key(3), (4, 6))
    config = jaxlora.LoraConfig(rank=2, targets=["w", "v"])
    assert_use_site_equals_merge(_cond_fn, params, config, x, jit=jit)
    assert_use_site_equals_merge(_cond_fn, params, config, -x, jit=jit)  # the other branch


def test_plain_function_with_while_loop(key):
    params = {"w": jax.random.normal(key, (6, 6)) / 3, "v": jax.random.normal(key, (6, 6)) / 3}
    x = jax.random.normal(jax.random.key(3), (4, 6))
    config = jaxlora.LoraConfig(rank=2, targets=["w", "v"])
    base, delta = assert_use_site_equals_merge(_while_fn, params, config, x, grad=False)
    prims = primitives_of(jaxlora.lora_apply(_while_fn), base, delta, x)
    assert "while" in prims
    # forward-mode derivatives go through the loop
    tangent = jax.tree.map(jnp.ones_like, delta)
    jvp = lambda s: jax.jvp(
        lambda d: jaxlora.lora_apply(_while_fn, strategy=s)(base, d, x), (delta,), (tangent,)
    )
    chex.assert_trees_all_close(jvp("use-site"), jvp("merge"), rtol=1e-4, atol=1e-5)


def test_custom_jvp_and_custom_vjp_wrapped_weights(key):
    @jax.custom_jvp
    def matmul(x, w):
        return x @ w

    @matmul.defjvp
    def _(primals, tangents):
        (x, w), (dx, dw) = primals, tangents
        return x @ w, dx @ w + x @ dw

    @jax.custom_vjp
    def matmul2(x, w):
        return x @ w

    matmul2.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))
    params = {"w": jax.random.normal(key, (5, 5))}
    x = jax.random.normal(jax.random.key(3), (3, 5))
    fn = lambda p, x: matmul2(matmul(x, p["w"]), p["w"])
    assert_use_site_equals_merge(fn, params, jaxlora.LoraConfig(rank=2, targets="w"), x)


def test_vmap_over_the_wrapped_function(key):
    params = {"w": jax.random.normal(key, (5, 4))}
    base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="w"), key=key)
    delta = randomize_b(delta, key)
    xs = jax.random.normal(key, (7, 3, 5))
    f = jaxlora.lora_apply(lambda p, x: x @ p["w"])
    out = jax.vmap(f, in_axes=(None, None, 0))(base, delta, xs)
    np.testing.assert_allclose(out, xs @ dense_merge(params["w"], delta["w"]), rtol=RTOL, atol=1e-5)


# ---------------------------------------------------------------- property test


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_random_dot_general_dimension_numbers(data):
    """Any contracting/batch dims, the weight on either side, several input/output axes."""
    n_batch = data.draw(st.integers(0, 1))
    n_in = data.draw(st.integers(1, 2))
    n_out = data.draw(st.integers(1, 2))
    n_xfree = data.draw(st.integers(0, 2))
    sizes = iter(data.draw(st.lists(st.integers(2, 4), min_size=8, max_size=8)))
    batch = [next(sizes) for _ in range(n_batch)]
    ins = [next(sizes) for _ in range(n_in)]
    outs = [next(sizes) for _ in range(n_out)]
    xfree = [next(sizes) for _ in range(n_xfree)]
    # weight axes: stacked (batch) + inputs + outputs, then a random permutation of them
    w_logical = batch + ins + outs
    w_perm = data.draw(st.permutations(range(len(w_logical))))
    # x axes: batch + contracted (the inputs) + free, in a random order
    x_logical = (
        [("b", i) for i in range(n_batch)]
        + [("c", i) for i in range(n_in)]
        + [("f", i) for i in range(n_xfree)]
    )
    x_perm = data.draw(st.permutations(range(len(x_logical))))
    x_axes = [x_logical[i] for i in x_perm]
    x_shape = [{"b": batch, "c": ins, "f": xfree}[g][i] for g, i in x_axes]
    w_roles = (
        [("b", i) for i in range(n_batch)]
        + [("c", i) for i in range(n_in)]
        + [("o", i) for i in range(n_out)]
    )
    seed = data.draw(st.integers(0, 1000))
    weight_is_lhs = data.draw(st.booleans())
    rank = data.draw(st.integers(1, 3))
    w = jax.random.normal(jax.random.key(seed), w_logical)
    x = jax.random.normal(jax.random.key(seed + 1), x_shape)
    w_axes = [w_roles[i] for i in w_perm]

    def fn(p, x):
        wv = jnp.transpose(p["w"], w_perm)
        xc = [x_axes.index(("c", i)) for i in range(n_in)]
        wc = [w_axes.index(("c", i)) for i in range(n_in)]
        xb = [x_axes.index(("b", i)) for i in range(n_batch)]
        wb = [w_axes.index(("b", i)) for i in range(n_batch)]
        if weight_is_lhs:
            return jax.lax.dot_general(wv, x, ((wc, xc), (wb, xb)))
        return jax.lax.dot_general(x, wv, ((xc, wc), (xb, wb)))

    rank = min(rank, int(np.prod(ins)), int(np.prod(outs)))
    config = jaxlora.LoraConfig(rank=rank, targets="w", stacked_axes=n_batch, input_axes=n_in)
    assert_use_site_equals_merge(fn, {"w": w}, config, x, key=jax.random.key(seed))


# ---------------------------------------------------------------- fallback


def test_fallback_warns_once_per_primitive_and_path_and_strict_raises(key):
    params = {"w": jax.random.normal(key, (4, 4))}
    base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="w"), key=key)
    delta = randomize_b(delta, key)
    fn = lambda p, x: x @ p["w"] + jnp.sum(jnp.sin(p["w"])) + jnp.sum(jnp.sin(p["w"]))
    x = jnp.ones((2, 4))
    f = jaxlora.lora_apply(fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = f(base, delta, x)
        f(base, delta, x)
    messages = [str(w.message) for w in caught if issubclass(w.category, jaxlora.FallbackWarning)]
    assert len(messages) == 1 and "'w'" in messages[0] and "`sin`" in messages[0]
    np.testing.assert_allclose(
        out, jaxlora.lora_apply(fn, strategy="merge")(base, delta, x), rtol=RTOL
    )
    with pytest.raises(jaxlora.FallbackError, match=r"`sin` uses the adapted weight 'w'"):
        jaxlora.lora_apply(fn, strict=True)(base, delta, x)


def test_bad_strategy_and_dropout_with_merge(key):
    with pytest.raises(ValueError, match="strategy must be one of"):
        jaxlora.lora_apply(lambda p: p, strategy="fast")
    base, delta = jaxlora.split(
        {"w": jnp.ones((3, 3))}, jaxlora.LoraConfig(rank=1, targets="w"), key=key
    )
    with pytest.raises(ValueError, match="dropout needs the use-site strategy"):
        jaxlora.lora_apply(lambda p: p["w"], strategy="merge")(base, delta, dropout_key=key)


# ---------------------------------------------------------------- dropout


def test_dropout_matches_a_hand_written_reference(key):
    params = {"w": jax.random.normal(key, (6, 5))}
    config = jaxlora.LoraConfig(rank=2, targets="w", dropout=0.5)
    base, delta = jaxlora.split(params, config, key=key)
    delta = randomize_b(delta, key)
    x = jax.random.normal(jax.random.key(5), (8, 6))
    f = jax.jit(jaxlora.lora_apply(lambda p, x: x @ p["w"]))
    dropout_key = jax.random.key(42)
    out = f(base, delta, x, dropout_key=dropout_key)
    # documented: the i-th use site (from 1, in trace order) draws from fold_in(key, i)
    keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, 1), 0.5, x.shape)
    x_drop = np.where(keep, np.asarray(x) / 0.5, 0.0)
    node = delta["w"]
    expected = np.asarray(x) @ np.asarray(params["w"]) + float(node.scale) * (
        x_drop @ np.asarray(node.a) @ np.asarray(node.b)
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out, f(base, delta, x, dropout_key=dropout_key))
    assert not np.allclose(out, f(base, delta, x, dropout_key=jax.random.key(43)))
    np.testing.assert_allclose(
        f(base, delta, x), x @ dense_merge(params["w"], node), rtol=1e-5, atol=1e-5
    )  # no key, no dropout


def test_dropout_differs_per_scanned_layer(key):
    x = jax.random.normal(key, (4, 8))
    params = Stack(False).init(key, x)["params"]
    config = jaxlora.LoraConfig(rank=2, targets="kernel", stacked_axes=1, dropout=0.3)
    base, delta = jaxlora.split(params, config, key=key)
    delta = randomize_b(delta, key)
    apply = jax.jit(jaxlora.lora_apply(lambda p, x: Stack(False).apply({"params": p}, x)))
    a = apply(base, delta, x, dropout_key=jax.random.key(1))
    np.testing.assert_array_equal(a, apply(base, delta, x, dropout_key=jax.random.key(1)))
    assert not np.allclose(a, apply(base, delta, x, dropout_key=jax.random.key(2)))


# ---------------------------------------------------------------- compilation


def test_new_delta_values_do_not_recompile(key):
    x = jax.random.normal(key, (4, 8))
    params = MLP().init(key, x)["params"]
    base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=3, targets="kernel"), key=key)
    f = jax.jit(jaxlora.lora_apply(lambda p, x: MLP().apply({"params": p}, x)))
    f(base, delta, x)
    for i in range(3):
        other = randomize_b(delta, jax.random.key(i))
        other = jax.tree.map(lambda a, i=i: a * (i + 2), other)  # other values, same structure
        f(base, other, x)
    assert f._cache_size() == 1


class _ScannedBlock(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.linear(x))


class _ScannedModel(nnx.Module):
    """Blocks made with nnx.vmap and run with nnx.scan, as the Flax NNX docs show."""

    def __init__(self):
        make = nnx.vmap(lambda key: _ScannedBlock(nnx.Rngs(key)), in_axes=0, out_axes=0)
        self.blocks = make(jax.random.split(jax.random.key(0), 3))

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


def test_an_nnx_scan_of_the_merged_module_runs_at_each_use():
    """nnx.scan refuses Variables made at another trace level; the engine makes fresh ones."""
    graphdef, state = nnx.split(_ScannedModel())
    apply = lambda s, x: nnx.merge(graphdef, s)(x)
    config = jaxlora.LoraConfig(rank=2, targets="kernel", stacked_axes=1)
    base, delta = jaxlora.split(state, config, key=jax.random.key(1))
    delta = jax.tree.map(lambda z: z + 0.1, delta)
    x = jnp.ones((2, 8))
    f = jaxlora.lora_apply(apply, strict=True)
    np.testing.assert_allclose(
        jax.jit(f)(base, delta, x), apply(jaxlora.merge(base, delta), x), rtol=1e-5, atol=1e-6
    )
    loss = lambda strategy: (
        lambda d: jnp.sum(jaxlora.lora_apply(apply, strategy=strategy)(base, d, x))
    )
    for got, want in zip(
        jax.tree.leaves(jax.grad(loss("use-site"))(delta)),
        jax.tree.leaves(jax.grad(loss("merge"))(delta)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
