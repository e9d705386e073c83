"""The low-rank branch's custom backward pass: exact gradients, laid out for the backend.

References: JAX's derivative of the dense computation ``x @ (W + s·a@b)``; the
frozen model's own compiled gradient for the layout check.
"""

import re

import jax
import jax.numpy as jnp
import pytest

import jaxlora
from tests.helpers import normal, randomize_b

N_BATCH, N_SEQ, D, F, RANK = 4, 16, 24, 48, 4


def _mlp(p, x):
    h = jax.nn.gelu(x @ p["up"], approximate=False)
    return h @ p["down"]


def _split(params, rank=RANK):
    config = jaxlora.LoraConfig(rank=rank, alpha=2 * rank, targets=["up", "down"])
    base, delta = jaxlora.split(params, config, key=jax.random.key(0))
    return base, randomize_b(delta, jax.random.key(1), scale=0.5)


def _close(got, ref, tol=2e-5):
    """Leaf by leaf within ``tol`` of the reference's largest entry (float32 sums round)."""
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        assert g.shape == r.shape
        assert float(jnp.max(jnp.abs(g - r))) <= tol * float(jnp.max(jnp.abs(r)))


def _dense(base, delta):
    scale = 2.0  # alpha / rank
    return {k: base[k] + scale * delta[k].a @ delta[k].b for k in base}


@pytest.fixture
def mlp():
    params = {"up": normal(D, F, seed=1) / 5, "down": normal(F, D, seed=2) / 8}
    return params, normal(N_BATCH, N_SEQ, D, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("forward_mode", [False, True])
def test_factor_and_input_gradients_equal_the_dense_derivative(mlp, forward_mode):
    params, x = mlp
    base, delta = _split(params)
    apply = jaxlora.lora_apply(_mlp, strict=True, forward_mode=forward_mode)

    def loss(delta, x):
        return jnp.sum(jnp.sin(apply(base, delta, x)))

    def reference(ab, x):
        a_up, b_up, a_down, b_down = ab
        w = {"up": base["up"] + 2.0 * a_up @ b_up, "down": base["down"] + 2.0 * a_down @ b_down}
        return jnp.sum(jnp.sin(_mlp(w, x)))

    g_delta, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(delta, x)
    factors = (delta["up"].a, delta["up"].b, delta["down"].a, delta["down"].b)
    r_ab, r_x = jax.grad(reference, argnums=(0, 1))(factors, x)
    got = (g_delta["up"].a, g_delta["up"].b, g_delta["down"].a, g_delta["down"].b)
    _close(got, r_ab)
    _close(g_x, r_x)


def test_a_weight_used_transposed_and_a_multi_axis_kernel(mlp):
    # a tied embedding read as the output projection (x @ E.T) and a (D, heads, head_dim)
    # kernel contracted on one input axis: each factor meets the activations differently
    _, x = mlp
    params = {"embed": normal(F, D, seed=4) / 5, "qkv": normal(D, 4, 6, seed=5) / 5}

    def fn2(p, x):
        heads = jnp.einsum("btd,dhk->bthk", x, p["qkv"]).reshape(*x.shape[:2], 24)
        return heads + (x @ p["embed"].T)[..., :24]

    config = jaxlora.LoraConfig(rank=3, targets=["embed", "qkv"])
    base, delta = jaxlora.split(params, config, key=jax.random.key(0))
    delta = randomize_b(delta, jax.random.key(1), scale=0.5)
    loss = lambda d, apply: jnp.sum(jnp.cos(apply(base, d, x)))
    use_site = jax.grad(loss)(delta, jaxlora.lora_apply(fn2, strict=True))
    merged = jax.grad(loss)(delta, jaxlora.lora_apply(fn2, strategy="merge"))
    _close(use_site, merged)


def test_bfloat16_activations_keep_their_dtype_and_gradient(mlp):
    params, x = mlp
    base, delta = _split(params)
    delta = jax.tree.map(lambda v: v.astype(jnp.bfloat16), delta)
    apply = jaxlora.lora_apply(_mlp, strict=True)
    xb = x.astype(jnp.bfloat16)
    g = jax.grad(lambda d: jnp.sum(apply(base, d, xb).astype(jnp.float32) ** 2))(delta)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(g))
    g32 = jax.grad(lambda d: jnp.sum(apply(base, d, x) ** 2))(
        jax.tree.map(lambda v: v.astype(jnp.float32), delta)
    )
    for lo, hi in zip(jax.tree.leaves(g), jax.tree.leaves(g32), strict=True):
        err = jnp.linalg.norm(lo.astype(jnp.float32) - hi) / jnp.linalg.norm(hi)
        assert float(err) < 0.05


def _transposed_activations(compiled: str, shape: tuple[int, ...]) -> int:
    """How many ops of the entry computation write an activation of ``shape`` transposed."""
    entry = compiled[compiled.index("ENTRY") :]
    flipped = "f32[" + ",".join(map(str, reversed(shape))) + "]"
    return len(re.findall(re.escape(flipped) + r"\S* (?:fusion|copy|transpose)\(", entry))


def test_no_activation_is_transposed_beyond_the_frozen_model(mlp):
    # XLA:CPU's matmuls want the left operand contracted on its minor axis; JAX's own
    # derivative of (x@a)@b contracts the tokens of activation-sized arrays for the factor
    # gradients, and XLA then writes those activations transposed (40% of a MiniLM step)
    params, x = mlp
    base, delta = _split(params)
    tokens = (N_BATCH * N_SEQ, F)

    def lora_grad(forward_mode):
        apply = jaxlora.lora_apply(_mlp, forward_mode=forward_mode)
        f = jax.jit(jax.grad(lambda d: jnp.sum(jnp.sin(apply(base, d, x)))))
        return f.lower(delta).compile().as_text()

    frozen = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(_mlp(params, x)))))
    floor = _transposed_activations(frozen.lower(x).compile().as_text(), tokens)
    assert _transposed_activations(lora_grad(False), tokens) <= floor
    # the check can fail: JAX's derivative (forward_mode=True) transposes the GELU's gradient
    assert _transposed_activations(lora_grad(True), tokens) > floor


def test_forward_mode_derivatives_need_forward_mode(mlp):
    params, x = mlp
    base, delta = _split(params)
    tangent = jax.tree.map(jnp.ones_like, delta)

    def jvp(**kw):
        apply = jaxlora.lora_apply(_mlp, **kw)
        return jax.jvp(lambda d: apply(base, d, x), (delta,), (tangent,))

    out, tan = jvp(forward_mode=True)
    ref, ref_tan = jax.jvp(
        lambda d: _mlp(_dense(base, d), x), (delta,), (tangent,)
    )  # the dense formula's own derivative
    _close((out, tan), (ref, ref_tan))
    with pytest.raises(TypeError, match="forward-mode"):
        jvp()
    # a Hessian-vector product: forward over reverse
    apply = jaxlora.lora_apply(_mlp, forward_mode=True)
    g = lambda d: jax.grad(lambda e: jnp.sum(jnp.sin(apply(base, e, x))))(d)
    g_ref = lambda d: jax.grad(lambda e: jnp.sum(jnp.sin(_mlp(_dense(base, e), x))))(d)
    hvp = jax.jvp(g, (delta,), (tangent,))[1]
    hvp_ref = jax.jvp(g_ref, (delta,), (tangent,))[1]
    _close(hvp, hvp_ref, tol=1e-4)


def test_forward_mode_must_be_a_bool():
    with pytest.raises(TypeError, match="forward_mode"):
        jaxlora.lora_apply(_mlp, forward_mode="yes")
