"""Tests for the reference models in jaxlora/models (Llama in linen, a block in NNX)."""

from __future__ import annotations

import dataclasses
import functools

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings

from jaxlora.models.llama import (
    Llama,
    LlamaConfig,
    apply_rotary,
    causal_lm_loss,
    rotary_cos_sin,
)
from jaxlora.models.nnx_block import NnxBlock, NnxMLP

BATCH, SEQ = 2, 12


# Compiling takes most of this file's time; XLA's cheapest CPU backend level cuts it
# by roughly 40%, and these tests check semantics, not speed.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _tokens(cfg: LlamaConfig, seed: int = 0, shape=(BATCH, SEQ)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


def _normal(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _random_params(cfg: LlamaConfig, seed: int = 0):
    """Params of the right tree and shapes, filled from numpy (no init to compile).

    Kernels get std 1/sqrt(fan_in) so attention is far from uniform, and norm scales
    are 1 + noise so a dropped or misplaced scale shows up.
    """
    shapes = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.standard_normal(leaf.shape)
        if path[-1].key == "scale":
            value = 1.0 + 0.1 * noise
        elif path[-1].key == "kernel":
            value = noise / np.sqrt(leaf.shape[-2])
        else:
            value = noise
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.partial(_jit, static_argnums=0)
def _logits(cfg: LlamaConfig, params, tokens) -> jax.Array:
    return Llama(cfg).apply(params, tokens)


@functools.partial(_jit, static_argnums=0)
def _loss_and_grad(cfg: LlamaConfig, params, tokens):
    loss = lambda p: causal_lm_loss(Llama(cfg).apply(p, tokens), tokens)
    return jax.value_and_grad(loss)(params)


@pytest.fixture(scope="module")
def tiny():
    """The tiny config, random params and a fixed random batch of tokens."""
    cfg = LlamaConfig.tiny()
    return cfg, _random_params(cfg), _tokens(cfg)


# --- an independent float64 numpy reference of the whole forward pass -------------------


def _np_rope(x: np.ndarray, theta: float) -> np.ndarray:
    """Rotates features (i, i + d/2) as the complex number x_i + j x_{i+d/2}."""
    seq, d = x.shape[1], x.shape[-1]
    freqs = theta ** (-np.arange(d // 2) * 2.0 / d)
    phase = np.exp(1j * np.arange(seq)[:, None] * freqs)[None, :, None, :]
    z = (x[..., : d // 2] + 1j * x[..., d // 2 :]) * phase
    return np.concatenate([z.real, z.imag], axis=-1)


def _np_rmsnorm(x, scale, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def _np_forward(cfg: LlamaConfig, params, tokens) -> np.ndarray:
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    tokens = np.asarray(tokens)
    b, s = tokens.shape
    hd, groups = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    x = p["embed_tokens"]["embedding"][tokens]
    for i in range(cfg.n_layers):
        lp = p[f"layers_{i}"]
        at = lp["self_attn"]
        h = _np_rmsnorm(x, lp["input_layernorm"]["scale"], cfg.norm_eps)
        q = _np_rope((h @ at["q_proj"]["kernel"]).reshape(b, s, cfg.n_heads, hd), cfg.rope_theta)
        k = _np_rope((h @ at["k_proj"]["kernel"]).reshape(b, s, -1, hd), cfg.rope_theta)
        v = (h @ at["v_proj"]["kernel"]).reshape(b, s, -1, hd)
        out = np.zeros((b, s, cfg.n_heads, hd))
        for head in range(cfg.n_heads):
            kv = head // groups
            scores = q[:, :, head] @ k[:, :, kv].transpose(0, 2, 1) / np.sqrt(hd)
            scores = np.where(np.tri(s, dtype=bool), scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[:, :, head] = probs @ v[:, :, kv]
        x = x + out.reshape(b, s, -1) @ at["o_proj"]["kernel"]
        mlp = lp["mlp"]
        h = _np_rmsnorm(x, lp["post_attention_layernorm"]["scale"], cfg.norm_eps)
        gate = h @ mlp["gate_proj"]["kernel"]
        silu = gate / (1 + np.exp(-gate))
        x = x + (silu * (h @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"]["kernel"]
    x = _np_rmsnorm(x, p["norm"]["scale"], cfg.norm_eps)
    if cfg.tie_embeddings:
        return x @ p["embed_tokens"]["embedding"].T
    return x @ p["lm_head"]["kernel"]


def _stack_layers(params, n_layers: int):
    """Turns layers_0..layers_{n-1} into one 'layers' tree with a leading layer axis."""
    p = dict(params["params"])
    layers = [p.pop(f"layers_{i}") for i in range(n_layers)]
    p["layers"] = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *layers)
    return {"params": p}


# --- LlamaConfig ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(d_model=64.0), "d_model must be a positive integer"),
        (dict(n_layers=True), "n_layers must be a positive integer"),
        (dict(n_heads=3, n_kv_heads=3), "d_model=64 is not divisible by n_heads=3"),
        (dict(n_kv_heads=3), "n_heads=4 is not divisible by n_kv_heads=3"),
        (dict(d_model=12, n_heads=4, n_kv_heads=4), "head_dim .* is odd"),
        (dict(rope_theta=0.0), "rope_theta must be a positive number"),
        (dict(norm_eps=-1e-6), "norm_eps must be a positive number"),
        (dict(scan_layers=1), "scan_layers must be a bool"),
        (dict(dtype=jnp.int32), "dtype must be a floating dtype"),
        (dict(param_dtype="nonsense"), "param_dtype must be a floating dtype"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.tiny(**overrides)


def test_config_is_frozen_and_defaults_kv_heads():
    cfg = LlamaConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, d_ff=16)
    assert cfg.n_kv_heads == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 16  # type: ignore[misc]
    with pytest.raises(TypeError):
        LlamaConfig(256, 64, 2, 4, 2, 128)  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize(
    "cfg",
    [
        LlamaConfig.tiny(),
        LlamaConfig.tiny(tie_embeddings=True),
        LlamaConfig.tiny(scan_layers=True, n_kv_heads=1),
        LlamaConfig.llama_1b(scan_layers=True),
        LlamaConfig.llama_7b(scan_layers=True),
    ],
    ids=["tiny", "tiny-tied", "tiny-scan-mqa", "1b", "7b"],
)
def test_num_params_matches_initialized_tree(cfg):
    shapes = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert cfg.num_params() == _count(shapes)


def test_preset_param_counts():
    assert LlamaConfig.llama_1b().num_params() == 1_100_048_384  # TinyLlama-1.1B
    assert LlamaConfig.llama_7b().num_params() == 6_738_415_616  # LLaMA-7B


# --- Llama forward -------------------------------------------------------------------


def test_param_names_follow_hugging_face(tiny):
    cfg, params, _ = tiny
    p = params["params"]
    assert sorted(p) == ["embed_tokens", "layers_0", "layers_1", "lm_head", "norm"]
    assert sorted(p["layers_0"]["self_attn"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert sorted(p["layers_0"]["mlp"]) == ["down_proj", "gate_proj", "up_proj"]
    chex.assert_shape(p["embed_tokens"]["embedding"], (cfg.vocab_size, cfg.d_model))
    chex.assert_shape(p["layers_0"]["self_attn"]["v_proj"]["kernel"], (64, 2 * 16))
    chex.assert_shape(p["layers_1"]["mlp"]["down_proj"]["kernel"], (cfg.d_ff, cfg.d_model))
    chex.assert_shape(p["layers_1"]["post_attention_layernorm"]["scale"], (cfg.d_model,))


def test_forward_shape_and_finite(tiny):
    cfg, params, tokens = tiny
    logits = _logits(cfg, params, tokens)
    chex.assert_shape(logits, (BATCH, SEQ, cfg.vocab_size))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("tied", [False, True], ids=["gqa", "tied-mqa"])
def test_forward_matches_numpy_reference(tiny, tied):
    cfg, params, tokens = tiny
    if tied:
        cfg = dataclasses.replace(cfg, tie_embeddings=True, n_kv_heads=1, rope_theta=500.0)
        params = _random_params(cfg, seed=1)
        assert "lm_head" not in params["params"]
    np.testing.assert_allclose(
        _logits(cfg, params, tokens), _np_forward(cfg, params, tokens), rtol=1e-4, atol=1e-4
    )


def test_gqa_equals_mha_with_repeated_kv_heads(tiny):
    cfg, params, tokens = tiny
    mha_cfg = dataclasses.replace(cfg, n_kv_heads=cfg.n_heads)
    groups = cfg.n_heads // cfg.n_kv_heads

    def repeat(kernel):  # (d, kv * hd) -> (d, heads * hd); head h reads kv head h // groups
        kernel = kernel.reshape(cfg.d_model, cfg.n_kv_heads, cfg.head_dim)
        return jnp.repeat(kernel, groups, axis=1).reshape(cfg.d_model, -1)

    mha = jax.tree.map(lambda x: x, params)  # fresh containers, same leaves
    for i in range(cfg.n_layers):
        attn = mha["params"][f"layers_{i}"]["self_attn"]
        for name in ("k_proj", "v_proj"):
            attn[name] = {"kernel": repeat(attn[name]["kernel"])}
    assert _count(mha) == mha_cfg.num_params()
    np.testing.assert_allclose(
        _logits(mha_cfg, mha, tokens), _logits(cfg, params, tokens), rtol=1e-5, atol=1e-5
    )


def test_causality(tiny):
    cfg, params, tokens = tiny
    t = SEQ // 2
    changed = np.array(tokens)
    changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
    before, after = _logits(cfg, params, tokens), _logits(cfg, params, changed)
    np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert np.all(np.abs(after[:, t:] - before[:, t:]).max(axis=-1) > 1e-3)


def test_scan_matches_unrolled_layers(tiny):
    cfg, params, tokens = tiny
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    stacked = _stack_layers(params, cfg.n_layers)
    scan_init = jax.eval_shape(Llama(scan_cfg).init, jax.random.key(0), tokens)
    assert jax.tree.structure(stacked) == jax.tree.structure(scan_init)
    chex.assert_trees_all_equal_shapes_and_dtypes(stacked, scan_init)
    chex.assert_shape(stacked["params"]["layers"]["self_attn"]["q_proj"]["kernel"], (2, 64, 64))
    np.testing.assert_allclose(
        _logits(scan_cfg, stacked, tokens), _logits(cfg, params, tokens), rtol=1e-6, atol=1e-6
    )


def test_init_is_seeded_and_scan_gives_each_layer_its_own_weights():
    cfg = LlamaConfig.tiny(scan_layers=True)
    init = _jit(Llama(cfg).init)
    tokens = _tokens(cfg)
    params = init(jax.random.key(1), tokens)
    chex.assert_trees_all_equal(params, init(jax.random.key(1), tokens))
    chex.assert_tree_all_finite(params)
    kernel = params["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert not np.allclose(kernel[0], kernel[1])
    assert np.all(params["params"]["norm"]["scale"] == 1)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan"])
def test_remat_changes_nothing(tiny, scan_layers):
    """Loss and grads with remat equal those of the plain scanned model."""
    cfg, params, tokens = tiny
    plain = dataclasses.replace(cfg, scan_layers=True)
    remat = dataclasses.replace(cfg, scan_layers=scan_layers, remat=True)
    stacked = _stack_layers(params, cfg.n_layers)
    want = _loss_and_grad(plain, stacked, tokens)
    loss, grads = _loss_and_grad(remat, stacked if scan_layers else params, tokens)
    if not scan_layers:
        grads = _stack_layers(grads, cfg.n_layers)
    chex.assert_trees_all_close((loss, grads), want, rtol=1e-5, atol=1e-6)


def test_inputs_embeds_matches_tokens_and_is_differentiable(tiny):
    cfg, params, tokens = tiny
    model = Llama(cfg)
    embeds = params["params"]["embed_tokens"]["embedding"][tokens]

    def total(e):
        logits = model.apply(params, inputs_embeds=e)
        return logits.sum(), logits

    (_, logits), grad = _jit(jax.value_and_grad(total, has_aux=True))(embeds)
    np.testing.assert_allclose(logits, _logits(cfg, params, tokens), rtol=1e-6, atol=1e-6)
    chex.assert_shape(grad, embeds.shape)
    chex.assert_tree_all_finite(grad)
    shapes = jax.eval_shape(model.init, jax.random.key(0), inputs_embeds=embeds)
    assert jax.tree.structure(shapes) == jax.tree.structure(params)


def test_call_errors(tiny):
    cfg, params, tokens = tiny
    model = Llama(cfg)
    embeds = jnp.ones((1, 3, cfg.d_model))
    with pytest.raises(ValueError, match="exactly one of tokens and inputs_embeds"):
        jax.eval_shape(model.apply, params)
    with pytest.raises(ValueError, match="exactly one of tokens and inputs_embeds"):
        jax.eval_shape(lambda p: model.apply(p, tokens, inputs_embeds=embeds), params)
    with pytest.raises(ValueError, match=r"tokens must have shape \(batch, seq\)"):
        jax.eval_shape(model.apply, params, tokens[0])
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(batch, seq, 64\)"):
        jax.eval_shape(lambda p: model.apply(p, inputs_embeds=embeds[..., :8]), params)
    with pytest.raises(ValueError, match=r"exceeds config\.max_len=128"):
        jax.eval_shape(model.apply, params, jnp.zeros((1, 129), jnp.int32))


def test_bfloat16_compute(tiny):
    cfg, _, tokens = tiny
    cfg = dataclasses.replace(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = _random_params(cfg)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    logits = _logits(cfg, params, tokens)
    assert logits.dtype == jnp.float32
    want = _np_forward(cfg, params, tokens)
    assert np.abs(logits - want).max() < 0.03 * np.abs(want).max()


# --- rotary embeddings ---------------------------------------------------------------


@_jit
def _rope(x, positions, theta):
    cos, sin = rotary_cos_sin(positions, x.shape[-1], theta=theta)
    return apply_rotary(x, cos, sin)


def test_rotary_matches_numpy_complex_rotation():
    x = _normal(3, (2, 7, 3, 8))
    np.testing.assert_allclose(
        _rope(x, jnp.arange(7), 100.0),
        _np_rope(x.astype(np.float64), 100.0),
        rtol=1e-5,
        atol=1e-6,
    )


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(0, 500),
    n=st.integers(0, 500),
    shift=st.integers(0, 500),
    seed=st.integers(0, 2**16),
)
def test_rotary_scores_depend_only_on_relative_position(m, n, shift, seed):
    qk = _normal(seed, (2, 1, 1, 16))  # q and k as (batch=2, seq=1, heads=1, head_dim=16)

    def score(i, j):
        rotated = _rope(qk, jnp.array([[i], [j]]), 10000.0)
        return float(jnp.sum(rotated[0] * rotated[1]))

    assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-3, abs=1e-3)


# --- causal_lm_loss ------------------------------------------------------------------


def test_causal_lm_loss_matches_numpy():
    logits = _normal(4, (2, 5, 7))
    tokens = np.random.default_rng(5).integers(0, 7, (2, 5))
    lg = logits.astype(np.float64)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    want = -np.mean([logp[b, t, tokens[b, t + 1]] for b in range(2) for t in range(4)])
    np.testing.assert_allclose(_jit(causal_lm_loss)(logits, tokens), want, rtol=1e-6)


def test_causal_lm_loss_errors():
    with pytest.raises(ValueError, match=r"got logits \(2, 5, 7\) and tokens \(2, 4\)"):
        causal_lm_loss(jnp.ones((2, 5, 7)), jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="seq >= 2"):
        causal_lm_loss(jnp.ones((2, 1, 7)), jnp.ones((2, 1), jnp.int32))


def test_optax_training_lowers_loss(tiny):
    cfg, params, tokens = tiny
    cfg = dataclasses.replace(cfg, scan_layers=True)  # Shares _loss_and_grad's compile.
    params = _stack_layers(params, cfg.n_layers)
    opt = optax.adam(1e-2)

    @_jit
    def update(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state, losses = opt.init(params), []
    for _ in range(20):
        loss, grads = _loss_and_grad(cfg, params, tokens)
        params, state = update(grads, state, params)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


# --- NNX block -----------------------------------------------------------------------


def test_nnx_block_shape_names_and_causality():
    block = NnxBlock(32, 4, 64, rngs=nnx.Rngs(0))
    assert block.q_proj.kernel.shape == (32, 32) and block.q_proj.bias is None
    assert block.mlp.up.kernel.shape == (32, 64) and block.mlp.down.kernel.shape == (64, 32)
    x = _normal(6, (2, 9, 32))
    t = 4
    x2 = x.copy()
    x2[:, t] += _normal(7, (2, 32))
    graphdef, state = nnx.split(block)
    call = _jit(lambda state, x: nnx.merge(graphdef, state)(x))
    y1, y2 = call(state, x), call(state, x2)
    chex.assert_shape(y1, x.shape)
    chex.assert_tree_all_finite(y1)
    np.testing.assert_allclose(y2[:, :t], y1[:, :t], rtol=0, atol=1e-6)
    assert np.all(np.abs(y2[:, t:] - y1[:, t:]).max(axis=-1) > 1e-4)


def test_nnx_mlp_eager_matches_numpy():
    mlp = NnxMLP(8, 16, rngs=nnx.Rngs(1))
    x = _normal(8, (3, 8))
    up = x @ np.asarray(mlp.up.kernel[...]) + np.asarray(mlp.up.bias[...])
    gelu = 0.5 * up * (1 + np.tanh(np.sqrt(2 / np.pi) * (up + 0.044715 * up**3)))
    want = gelu @ np.asarray(mlp.down.kernel[...]) + np.asarray(mlp.down.bias[...])
    np.testing.assert_allclose(mlp(x), want, rtol=1e-5, atol=1e-5)  # eager


@pytest.mark.parametrize(
    "args, match",
    [
        ((32, 5, 64), "whole, even head dimension"),
        ((12, 4, 64), "whole, even head dimension"),
        ((32, 4, 0), "sizes must be positive"),
    ],
)
def test_nnx_block_rejects_bad_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        NnxBlock(*args, rngs=nnx.Rngs(0))
