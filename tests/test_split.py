"""split / merge / unmerge / trainable_mask against dense references."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxlora
from tests.helpers import dense_merge, is_node, randomize_b


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="up")(x)
        x = nn.relu(x)
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(5, name="down")(x)


class Attention(nn.Module):
    heads: int = 2
    head_dim: int = 4

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((self.heads, self.head_dim), name="query")(x)
        k = nn.DenseGeneral((self.heads, self.head_dim), name="key")(x)
        v = nn.DenseGeneral((self.heads, self.head_dim), name="value")(x)
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0)
        o = jnp.einsum("bhqk,bkhd->bqhd", w, v)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(o)


def _mlp(key):
    x = jax.random.normal(key, (3, 8))
    params = MLP().init(key, x)["params"]
    return params, x, lambda p, x: MLP().apply({"params": p}, x)


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_zero_b_equals_base_bit_for_bit(key, jit, init):
    params, x, apply = _mlp(key)
    base, delta = jaxlora.split(
        params, jaxlora.LoraConfig(rank=2, targets="all-linear", init=init), key=key
    )
    f = jaxlora.lora_apply(apply)
    if jit:
        f, apply = jax.jit(f), jax.jit(apply)
    np.testing.assert_array_equal(f(base, delta, x), apply(params, x))


def test_split_structure_and_shapes(key):
    params, _, _ = _mlp(key)
    base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=3, targets="all-linear"), key=key)
    chex.assert_trees_all_equal_structs(base, params)
    assert delta["norm"]["scale"] is None and delta["up"]["bias"] is None
    chex.assert_shape(delta["up"]["kernel"].a, (8, 3))
    chex.assert_shape(delta["up"]["kernel"].b, (3, 16))
    chex.assert_shape(delta["down"]["kernel"].a, (16, 3))
    assert base["up"]["kernel"] is params["up"]["kernel"]  # no copy of the base


def test_split_is_deterministic_and_keyed(key):
    params, _, _ = _mlp(key)
    config = jaxlora.LoraConfig(rank=2, targets="all-linear")
    _, d1 = jaxlora.split(params, config, key=key)
    _, d2 = jaxlora.split(params, config, key=key)
    _, d3 = jaxlora.split(params, config, key=jax.random.key(7))
    chex.assert_trees_all_equal(d1, d2)
    assert not np.allclose(d1["up"]["kernel"].a, d3["up"]["kernel"].a)
    assert not np.allclose(d1["up"]["kernel"].a[:2, :2], d1["down"]["kernel"].a[:2, :2])


def test_init_distributions(key):
    params = {"w": {"kernel": jnp.zeros((512, 256))}}
    _, dg = jaxlora.split(params, jaxlora.LoraConfig(rank=8, targets="w"), key=key)
    a = np.asarray(dg["w"]["kernel"].a)
    assert abs(a.std() - 1 / 8) < 0.01 and abs(a.mean()) < 0.01
    _, dk = jaxlora.split(params, jaxlora.LoraConfig(rank=8, targets="w", init="kaiming"), key=key)
    a = np.asarray(dk["w"]["kernel"].a)
    bound = 1 / np.sqrt(512)
    assert a.max() <= bound and a.min() >= -bound and a.max() > 0.95 * bound
    np.testing.assert_array_equal(dk["w"]["kernel"].b, 0.0)


# ---------------------------------------------------------------- layouts

LAYOUTS = [
    # (name, shape, config kwargs, (stacked, n_in, n_out))
    ("dense/kernel", (6, 5), {}, ((), 6, 5)),
    ("attn/query/kernel", (8, 2, 4), {}, ((), 8, 8)),
    ("attn/out/kernel", (2, 4, 8), {"input_axes": {"out": 2}}, ((), 8, 8)),
    ("layers/mlp/kernel", (3, 6, 5), {"stacked_axes": 1}, ((3,), 6, 5)),
    ("conv/kernel", (3, 3, 4, 6), {"input_axes": 3}, ((), 36, 6)),
    ("embed/embedding", (11, 6), {}, ((), 11, 6)),
    ("scan/out/kernel", (2, 3, 4, 6), {"stacked_axes": 1, "input_axes": 2}, ((2,), 12, 6)),
]


@pytest.mark.parametrize(("path", "shape", "kwargs", "expect"), LAYOUTS)
def test_merge_matches_dense_float64_reference(key, path, shape, kwargs, expect):
    *parents, leaf = path.split("/")
    weight = jax.random.normal(key, shape)
    params = {leaf: weight}
    for p in reversed(parents):
        params = {p: params}
    config = jaxlora.LoraConfig(rank=2, alpha=3.0, targets=re.escape(path), **kwargs)
    base, delta = jaxlora.split(params, config, key=key)
    delta = randomize_b(delta, jax.random.key(1))
    node = jax.tree.leaves(delta, is_leaf=is_node)[0]
    stacked, n_in, n_out = expect
    chex.assert_shape(node.a, (*stacked, n_in, 2))
    chex.assert_shape(node.b, (*stacked, 2, n_out))
    assert float(node.scale) == 1.5
    merged = jax.tree.leaves(jax.jit(jaxlora.merge)(base, delta))[0]
    expected = dense_merge(np.asarray(weight).reshape(*stacked, n_in, n_out), node)
    np.testing.assert_allclose(merged, expected.reshape(shape), rtol=1e-5, atol=1e-6)
    back = jax.tree.leaves(jaxlora.unmerge(jaxlora.merge(base, delta), delta))[0]
    np.testing.assert_allclose(back, weight, rtol=1e-5, atol=1e-5)


def test_merge_in_float32_casts_back_to_bfloat16(key):
    w = jax.random.normal(key, (16, 16)).astype(jnp.bfloat16)
    base, delta = jaxlora.split({"w": w}, jaxlora.LoraConfig(rank=4, targets="w"), key=key)
    delta = randomize_b(delta, key)
    merged = jaxlora.merge(base, delta)["w"]
    assert merged.dtype == jnp.bfloat16
    expected = dense_merge(np.asarray(w, np.float32), delta["w"])
    np.testing.assert_allclose(np.asarray(merged, np.float32), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(
    n_in=st.integers(1, 12),
    n_out=st.integers(1, 12),
    stacked=st.integers(0, 3),
    rank=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_unmerge_inverts_merge(n_in, n_out, stacked, rank, seed):
    rank = min(rank, n_in, n_out)
    key = jax.random.key(seed)
    shape = ((stacked,) if stacked else ()) + (n_in, n_out)
    params = {"w": jax.random.normal(key, shape)}
    config = jaxlora.LoraConfig(rank=rank, targets="w", stacked_axes=1 if stacked else 0)
    base, delta = jaxlora.split(params, config, key=key)
    delta = randomize_b(delta, jax.random.fold_in(key, 1))
    merged = jaxlora.merge(base, delta)
    np.testing.assert_allclose(
        merged["w"], dense_merge(params["w"], delta["w"]), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(jaxlora.unmerge(merged, delta)["w"], params["w"], atol=1e-5)


# ---------------------------------------------------------------- pissa / olora


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("stacked", [False, True])
def test_pissa_and_olora_start_at_the_base_model(key, init, stacked):
    shape = (3, 12, 10) if stacked else (12, 10)
    w = jax.random.normal(key, shape)
    config = jaxlora.LoraConfig(rank=4, targets="w", init=init, stacked_axes=int(stacked))
    base, delta = jaxlora.split({"w": w}, config, key=key)
    node = delta["w"]
    assert not np.allclose(node.b, 0.0)  # these inits start b away from zero
    assert not np.allclose(base["w"], w)  # and move the base
    np.testing.assert_allclose(jaxlora.merge(base, delta)["w"], w, rtol=1e-5, atol=1e-5)
    if init == "pissa":  # s·a@b is the best rank-4 approximation of W
        u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
        best = (u[..., :4] * s[..., None, :4]) @ vt[..., :4, :]
        np.testing.assert_allclose(dense_merge(np.zeros(shape), node), best, atol=1e-4)


# ---------------------------------------------------------------- patterns


def test_rank_and_alpha_patterns(key):
    params = {f"layers_{i}": {"q": {"kernel": jax.random.normal(key, (16, 16))}} for i in range(3)}
    config = jaxlora.LoraConfig(
        rank=4,
        alpha=8.0,
        targets="kernel",
        rank_pattern={"layers_0/": 2, "layers_[01]/": 6},  # first match wins
        alpha_pattern={"layers_1/": 3.0},
    )
    _, delta = jaxlora.split(params, config, key=key)
    ranks = [delta[f"layers_{i}"]["q"]["kernel"].rank for i in range(3)]
    scales = [float(delta[f"layers_{i}"]["q"]["kernel"].scale) for i in range(3)]
    assert ranks == [2, 6, 4]
    assert scales == [8.0 / 2, 3.0 / 6, 8.0 / 4]
    rs = jaxlora.LoraConfig(
        rank=4, alpha=8.0, targets="kernel", rslora=True, rank_pattern={"layers_0/": 16}
    )
    _, delta = jaxlora.split(params, rs, key=key)
    assert float(delta["layers_0"]["q"]["kernel"].scale) == 8.0 / 4.0
    assert float(delta["layers_1"]["q"]["kernel"].scale) == 8.0 / 2.0


def test_default_alpha_is_twice_each_rank():
    config = jaxlora.LoraConfig(rank=4, rank_pattern={"big": 16})
    assert config.alpha_for("x") == 8.0 and config.alpha_for("big/kernel") == 32.0


# ---------------------------------------------------------------- targets & presets

LLAMA_PATHS = [
    "embed_tokens/embedding",
    "layers_0/self_attn/q_proj/kernel",
    "layers_0/self_attn/k_proj/kernel",
    "layers_0/self_attn/v_proj/kernel",
    "layers_0/self_attn/o_proj/kernel",
    "layers_0/mlp/gate_proj/kernel",
    "layers_0/mlp/up_proj/kernel",
    "layers_0/mlp/down_proj/kernel",
    "layers_0/input_layernorm/scale",
    "layers_0/mlp/up_proj/bias",
    "norm/scale",
    "lm_head/kernel",
]
BERT_PATHS = [
    "encoder/layer_0/attention/self/query/kernel",
    "encoder/layer_0/attention/self/query/bias",
    "encoder/layer_0/attention/self/value/kernel",
    "encoder/layer_0/attention/output/dense/kernel",
    "encoder/layer_0/intermediate/dense/kernel",
    "encoder/layer_0/output/dense/kernel",
    "encoder/layer_0/output/LayerNorm/scale",
    "embeddings/word_embeddings/embedding",
    "classifier/kernel",
]


def _tree_of(paths):
    tree = {}
    for i, path in enumerate(paths):
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        shape = (4,) if leaf in ("scale", "bias") else (4, 6)
        node[leaf] = jax.random.normal(jax.random.key(i), shape)
    return tree


def _adapted(tree, **kwargs):
    _, delta = jaxlora.split(tree, jaxlora.LoraConfig(rank=2, **kwargs), key=jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(delta, is_leaf=is_node)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/") for p, n in flat if is_node(n)}


@pytest.mark.parametrize(
    ("paths", "preset", "expected"),
    [
        (LLAMA_PATHS, "attention", {p for p in LLAMA_PATHS if "self_attn" in p}),
        (LLAMA_PATHS, "mlp", {p for p in LLAMA_PATHS if "mlp" in p and "kernel" in p}),
        (LLAMA_PATHS, "all-linear", {p for p in LLAMA_PATHS if "layers_0" in p and "kernel" in p}),
        (BERT_PATHS, "attention", {p for p in BERT_PATHS if "attention" in p and "kernel" in p}),
        (BERT_PATHS, "mlp", {BERT_PATHS[4], BERT_PATHS[5]}),
    ],
)
def test_presets(paths, preset, expected):
    assert _adapted(_tree_of(paths), targets=preset) == expected


def test_regex_list_exclude_and_predicate():
    tree = _tree_of(LLAMA_PATHS)
    assert _adapted(tree, targets=["q_proj", "v_proj"]) == {LLAMA_PATHS[1], LLAMA_PATHS[3]}
    assert _adapted(tree, targets="attention", exclude="k_proj|o_proj") == {
        LLAMA_PATHS[1],
        LLAMA_PATHS[3],
    }
    assert _adapted(tree, targets=lambda path, leaf: path.startswith("lm_head")) == {
        "lm_head/kernel"
    }
    # a regex that also reaches a bias adapts only the kernel: 1-D leaves are never adapted
    assert _adapted(tree, targets="up_proj") == {"layers_0/mlp/up_proj/kernel"}


# ---------------------------------------------------------------- flax trees


def test_nnx_state(key):
    model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    base, delta = jaxlora.split(state, jaxlora.LoraConfig(rank=2, targets="kernel"), key=key)
    assert isinstance(base, nnx.State)
    delta = randomize_b(delta, key)
    merged = jaxlora.merge(base, delta)
    x = jax.random.normal(key, (3, 6))
    node = delta["kernel"]
    expected = x @ dense_merge(state["kernel"].get_value(), node) + np.asarray(
        state["bias"].get_value()
    )
    out = nnx.merge(graphdef, merged)(x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    np.testing.assert_allclose(
        jax.jit(jaxlora.lora_apply(apply))(base, delta, x), expected, rtol=1e-5, atol=1e-5
    )


def test_linen_multi_axis_attention(key):
    x = jax.random.normal(key, (2, 5, 8))
    params = Attention().init(key, x)["params"]
    config = jaxlora.LoraConfig(rank=3, targets="attention", input_axes={"out/": 2})
    base, delta = jaxlora.split(params, config, key=key)
    chex.assert_shape(delta["query"]["kernel"].a, (8, 3))
    chex.assert_shape(delta["query"]["kernel"].b, (3, 8))
    chex.assert_shape(delta["out"]["kernel"].a, (8, 3))
    delta = randomize_b(delta, key)
    apply = lambda p, x: Attention().apply({"params": p}, x)
    dense = jax.tree.map(lambda w: w, params)
    for name in ("query", "key", "value", "out"):
        dense[name]["kernel"] = dense_merge(params[name]["kernel"], delta[name]["kernel"])
    np.testing.assert_allclose(
        jax.jit(jaxlora.lora_apply(apply))(base, delta, x),
        apply(jax.tree.map(jnp.float32, dense), x),
        rtol=1e-5,
        atol=1e-5,
    )


# ---------------------------------------------------------------- training


def _loss_fn(apply):
    def loss(delta, base, x, y):
        return jnp.mean((jaxlora.lora_apply(apply)(base, delta, x) - y) ** 2)

    return loss


@pytest.mark.slow
def test_gradients_reach_only_adapters(key):
    params, x, apply = _mlp(key)
    base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="all-linear"), key=key)
    delta = randomize_b(delta, key)
    y = jax.random.normal(jax.random.key(3), (3, 5))
    g_base, g_delta = jax.grad(lambda b, d: _loss_fn(apply)(d, b, x, y), argnums=(0, 1))(
        base, delta
    )
    node = g_delta["up"]["kernel"]
    assert np.abs(node.a).max() > 0 and np.abs(node.b).max() > 0
    assert sorted(type(node).trainable_fields()) == ["a", "b"]  # the scale is no leaf
    assert g_delta["up"]["bias"] is None
    # the base's gradient exists (it is a differentiable input) but the masked optimizer ignores it
    chex.assert_trees_all_equal_structs(g_base, params)


@pytest.mark.parametrize("style", ["masked", "partition"])
def test_optax_training_lowers_loss_and_keeps_base_bit_identical(key, style):
    params, x, apply = _mlp(key)
    x = jax.random.normal(key, (32, 8))
    y = jnp.sin(x[:, :5] * 2.0)
    base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=4, targets="all-linear"), key=key)
    base_before = jax.tree.map(np.array, base)
    mask = jaxlora.trainable_mask(delta)
    if style == "masked":
        tx = optax.chain(
            optax.masked(optax.adam(1e-2), mask),
            optax.masked(optax.set_to_zero(), jax.tree.map(lambda m: not m, mask)),
        )
    else:
        labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
        tx = optax.transforms.partition(
            {"train": optax.adam(1e-2), "freeze": optax.set_to_zero()}, labels
        )
    opt_state = tx.init(delta)
    loss = _loss_fn(apply)

    @jax.jit
    def step(delta, opt_state):
        value, grads = jax.value_and_grad(loss)(delta, base, x, y)
        updates, opt_state = tx.update(grads, opt_state, delta)
        return optax.apply_updates(delta, updates), opt_state, value

    first = None
    for _ in range(60):
        delta, opt_state, value = step(delta, opt_state)
        first = value if first is None else first
    final = loss(delta, base, x, y)
    assert final < 0.5 * first
    chex.assert_trees_all_equal(base, base_before)  # bit-identical
    assert float(delta["up"]["kernel"].scale) == 2.0


def test_trainable_mask_on_combined_tree(key):
    params, _, _ = _mlp(key)
    base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="all-linear"), key=key)
    mask = jaxlora.trainable_mask((base, delta))
    assert not any(jax.tree.leaves(mask[0]))
    assert sum(jax.tree.leaves(mask[1])) == 4  # a and b of two kernels
    chex.assert_trees_all_equal_structs(mask, (base, delta))


# ---------------------------------------------------------------- helpers


def test_count_parameters_bytes_and_summary(key):
    params, _, _ = _mlp(key)
    base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="all-linear"), key=key)
    count = jaxlora.count_parameters(base, delta)
    base_total = sum(x.size for x in jax.tree.leaves(params))
    expected_trainable = (8 + 16) * 2 + (16 + 5) * 2
    assert count == (expected_trainable, base_total + expected_trainable)
    assert "trainable%" in str(count)
    assert jaxlora.adapter_nbytes(delta) == 4 * expected_trainable  # no scale array
    text = jaxlora.summary(delta)
    assert "up/kernel" in text and "down/kernel" in text and "2 adapted weights" in text


# ---------------------------------------------------------------- errors


def test_targets_matching_nothing_lists_paths(key):
    params, _, _ = _mlp(key)
    with pytest.raises(ValueError, match=r"matched no adaptable parameter.*'up/kernel'"):
        jaxlora.split(params, jaxlora.LoraConfig(targets="attn"), key=key)


def test_rank_too_large_names_the_path(key):
    params, _, _ = _mlp(key)
    with pytest.raises(
        ValueError, match=r"rank 9 is too large for 'up/kernel'.*min\(in, out\) = 8"
    ):
        jaxlora.split(params, jaxlora.LoraConfig(rank=9, targets="up"), key=key)


def test_non_array_and_non_float_leaves(key):
    with pytest.raises(TypeError, match=r"'meta/kernel'.*str"):
        jaxlora.split({"meta": {"kernel": "hello"}}, jaxlora.LoraConfig(targets="kernel"), key=key)
    with pytest.raises(TypeError, match=r"'ids/kernel'.*int32"):
        jaxlora.split(
            {"ids": {"kernel": jnp.ones((3, 3), jnp.int32)}},
            jaxlora.LoraConfig(rank=1, targets="kernel"),
            key=key,
        )
    with pytest.raises(TypeError, match=r"jaxlora\.LoraConfig"):
        jaxlora.split({"w": jnp.ones((3, 3))}, {"rank": 2}, key=key)


def test_ambiguous_layout_asks_for_input_axes(key):
    with pytest.raises(ValueError, match=r"'conv/kernel'.*input_axes"):
        jaxlora.split(
            {"conv": {"kernel": jnp.ones((3, 3, 4, 8))}},
            jaxlora.LoraConfig(rank=2, targets="conv"),
            key=key,
        )
    with pytest.raises(ValueError, match=r"'w'.*at least one input and one output axis"):
        jaxlora.split(
            {"w": jnp.ones((3, 3))}, jaxlora.LoraConfig(rank=2, targets="w", input_axes=2), key=key
        )


def test_merge_rejects_wrong_structure_and_shapes(key):
    params, _, _ = _mlp(key)
    base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="all-linear"), key=key)
    wrong = dict(base)
    del wrong["norm"]
    with pytest.raises(ValueError, match=r"'norm/bias', which base lacks"):
        jaxlora.merge(wrong, delta)
    swapped = dict(base, up=base["down"], down=base["up"])
    with pytest.raises(ValueError, match=r"'down/kernel' was made for a weight of shape \(16, 5\)"):
        jaxlora.merge(swapped, delta)
    with pytest.raises(ValueError, match="different tree structures"):
        jaxlora.unmerge([base], delta)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, "rank must be >= 1"),
        ({"rank": 2.5}, TypeError, "rank must be an int"),
        ({"alpha": -1.0}, ValueError, "alpha must be a finite number > 0"),
        ({"dropout": 1.0}, ValueError, r"dropout must be a float in \[0, 1\)"),
        ({"init": "xavier"}, ValueError, "init must be one of"),
        ({"targets": "("}, ValueError, "targets='\\(' is not a valid regular expression"),
        ({"targets": 3}, TypeError, "targets must be a regex string"),
        ({"targets": []}, TypeError, "targets must be a regex string"),
        ({"rank_pattern": {"q": 0}}, ValueError, r"rank_pattern\['q'\] must be >= 1"),
        ({"alpha_pattern": {"[": 1.0}}, ValueError, "alpha_pattern key"),
        ({"input_axes": 0}, ValueError, "input_axes must be >= 1"),
        ({"stacked_axes": {"x": -1}}, ValueError, r"stacked_axes\['x'\] must be >= 0"),
        ({"dtype": jnp.int32}, TypeError, "dtype must be a floating dtype"),
    ],
)
def test_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        jaxlora.LoraConfig(**kwargs)


def test_config_is_frozen_and_hashable():
    config = jaxlora.LoraConfig(rank=2, targets=["q", "v"], rank_pattern={"q": 4})
    assert hash(config) == hash(
        jaxlora.LoraConfig(rank=2, targets=["q", "v"], rank_pattern={"q": 4})
    )
    with pytest.raises(AttributeError):
        config.rank = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.rank_pattern["v"] = 2  # type: ignore[index]
    with pytest.raises(TypeError):
        jaxlora.LoraConfig(2)  # type: ignore[misc]
