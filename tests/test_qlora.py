"""QLoRA: a quantized base trained through the use-site engine, and merging into it."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora import memory as _memory
from jaxlora import quant
from jaxlora.models.llama import Llama, LlamaConfig, causal_lm_loss
from tests.helpers import dense_merge, randomize_b, train


class Deep(nn.Module):
    layers: int = 6
    width: int = 256

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = jnp.tanh(nn.Dense(self.width, use_bias=False, name=f"dense_{i}")(x))
        return x


def _setup(key, *, double_quant=True, targets="dense"):
    model = Deep()
    x = jax.random.normal(key, (2, 256))
    params = model.init(key, x)["params"]
    base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=4, targets=targets), key=key)
    delta = randomize_b(delta, key, scale=0.05)
    qbase = jaxlora.quantize(base, double_quant=double_quant)
    apply = lambda p, x: model.apply({"params": p}, x)
    return apply, qbase, delta, x


@pytest.mark.parametrize("targets", ["dense", "dense_[024]"])
def test_use_site_on_a_quantized_base_equals_merge_on_its_dequantized_copy(key, targets):
    apply, qbase, delta, x = _setup(key, targets=targets)
    deq = jaxlora.dequantize(qbase)
    use_site = jax.jit(jaxlora.lora_apply(apply, strict=True))
    np.testing.assert_allclose(
        use_site(qbase, delta, x),
        jaxlora.lora_apply(apply, strategy="merge")(deq, delta, x),
        rtol=1e-5,
        atol=1e-5,
    )
    loss = lambda strategy, base: jax.grad(
        lambda d: jnp.sum(jaxlora.lora_apply(apply, strategy=strategy)(base, d, x) ** 2)
    )(delta)
    chex.assert_trees_all_close(loss("use-site", qbase), loss("merge", deq), rtol=1e-4, atol=1e-4)


def test_no_full_precision_copy_of_the_model_and_dequantization_recomputed(key):
    """Compiled train-step temp memory holds about one dequantized weight, not all six."""
    apply, qbase, delta, x = _setup(key)
    loss = lambda p, x: jnp.sum(apply(p, x) ** 2)
    tx = _memory.lora_optimizer(optax.adam(1e-3), delta)
    step = _memory.lora_step(loss, tx)
    report = _memory.memory_of(step, delta, tx.init(delta), qbase, x, donate_argnums=(0, 1))
    weight_bytes = 256 * 256 * 4
    assert report.temp < 2 * weight_bytes  # six layers: 6 x 256 KiB if dequantized weights lived
    merged = _memory.memory_of(
        _memory.lora_step(loss, tx, strategy="merge"),
        delta,
        tx.init(delta),
        qbase,
        x,
        donate_argnums=(0, 1),
    )
    assert merged.temp > 4 * weight_bytes  # the merge strategy holds them for the backward pass
    # the backward pass dequantizes again instead of saving: 6 forward + 5 backward dequantizations
    # (the first layer's input needs no gradient)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda d: loss_of(apply, qbase, d, x)))(delta))
    forward = str(jax.make_jaxpr(lambda d: loss_of(apply, qbase, d, x))(delta))
    assert forward.count("name=_dequantize_jit") == 6
    assert jaxpr.count("name=_dequantize_jit") == 11


def loss_of(apply, base, delta, x):
    return jnp.sum(jaxlora.lora_apply(apply)(base, delta, x) ** 2)


@pytest.mark.slow
def test_qlora_training_on_the_reference_decoder_lowers_the_loss(key):
    config = LlamaConfig.tiny(scan_layers=True)
    model = Llama(config)
    tokens = jax.random.randint(key, (4, 32), 0, config.vocab_size)
    params = jax.jit(model.init)(key, tokens)["params"]
    lora = jaxlora.LoraConfig(rank=4, targets="all-linear", stacked_axes={"layers/": 1})
    base, delta = jaxlora.split(params, lora, key=key)
    qbase = jaxlora.quantize(base, targets="layers/.*kernel", double_quant=False)
    assert isinstance(qbase["layers"]["mlp"]["up_proj"]["kernel"], jaxlora.QuantizedArray)
    loss = lambda p, toks: causal_lm_loss(model.apply({"params": p}, toks), toks)
    _, losses = train(loss, qbase, delta, tokens, steps=30, lr=1e-2)
    assert losses[-1] < 0.9 * losses[0]  # from ln(256): memorizing random tokens


@pytest.mark.slow
def test_a_scanned_stack_whose_double_quant_groups_span_layers_is_factored(key):
    """64 x 64 per layer = 64 blocks: a group of 256 block scales spans both layers.

    The engine dequantizes the block scales for the scan (each layer its own)
    and keeps the 4-bit codes: no merged weight (strict), dequantized values exact.
    """
    config = LlamaConfig.tiny(scan_layers=True)
    model = Llama(config)
    tokens = jax.random.randint(key, (2, 8), 0, config.vocab_size)
    params = jax.jit(model.init)(key, tokens)["params"]
    lora = jaxlora.LoraConfig(rank=2, targets="q_proj", stacked_axes=1)
    base, delta = jaxlora.split(params, lora, key=key)
    delta = jax.tree.map(lambda z: z + 0.05, delta)
    qbase = jaxlora.quantize(base, targets="q_proj", double_quant=True)
    assert qbase["layers"]["self_attn"]["q_proj"]["kernel"].double_quant
    apply = lambda p, t: model.apply({"params": p}, t)
    out = jax.jit(jaxlora.lora_apply(apply, strict=True))(qbase, delta, tokens)
    want = jaxlora.lora_apply(apply, strategy="merge")(jaxlora.dequantize(qbase), delta, tokens)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_stacked_quantized_weights_whose_blocks_span_layers_fall_back(key):
    """Blocks of 64 over layers of 8 x 4 = 32 weights: no layer has its own blocks."""
    params = {"layers": {"proj": {"kernel": jax.random.normal(key, (4, 8, 4))}}}
    lora = jaxlora.LoraConfig(rank=2, targets="proj", stacked_axes=1)
    base, delta = jaxlora.split(params, lora, key=key)
    qbase = jaxlora.quantize(base, targets="proj", block_size=64)

    def apply(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w @ w.T), None), x,
                            p["layers"]["proj"]["kernel"])[0]  # fmt: skip

    x = jnp.ones((2, 8))
    with pytest.warns(jaxlora.FallbackWarning, match="blocks span layers"):
        out = jaxlora.lora_apply(apply)(qbase, delta, x)
    want = jaxlora.lora_apply(apply, strategy="merge")(jaxlora.dequantize(qbase), delta, x)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_merge_into_a_quantized_base(key):
    _, qbase, delta, _ = _setup(key)
    merged = jaxlora.merge(qbase, delta)
    w = qbase["dense_0"]["kernel"]
    assert isinstance(merged["dense_0"]["kernel"], jax.Array)
    np.testing.assert_allclose(
        merged["dense_0"]["kernel"],
        dense_merge(w.dequantize(), delta["dense_0"]["kernel"]),
        rtol=1e-5,
        atol=1e-5,
    )
    requantized = jaxlora.merge(qbase, delta, requantize=True)
    rq = requantized["dense_0"]["kernel"]
    assert isinstance(rq, jaxlora.QuantizedArray) and rq.format == w.format
    # requantizing is lossy: the error is of the order of the 4-bit grid, not float rounding
    error = np.abs(np.asarray(rq.dequantize()) - np.asarray(merged["dense_0"]["kernel"])).max()
    assert 1e-3 < error < 0.5 * float(np.abs(w.dequantize()).max())


def test_pissa_on_a_quantized_weight_asks_to_split_first(key):
    qparams = jaxlora.quantize({"w": jax.random.normal(key, (64, 64))})
    with pytest.raises(ValueError, match="Split the float weights first"):
        jaxlora.split(qparams, jaxlora.LoraConfig(rank=2, targets="w", init="pissa"), key=key)


def test_split_of_a_quantized_tree(key):
    qparams = jaxlora.quantize({"w": jax.random.normal(key, (64, 32))})
    base, delta = jaxlora.split(qparams, jaxlora.LoraConfig(rank=2, targets="w"), key=key)
    assert base["w"] is qparams["w"] and delta["w"].a.shape == (64, 2)
    assert quant.bits_per_parameter(base["w"]) < 4.2


@pytest.mark.slow
def test_scanned_qlora_step_compiles_with_every_input_kept(key):
    """Regression: custom-VJP residuals must be arrays (keep_unused turns any into inputs)."""
    config = LlamaConfig.tiny(scan_layers=True)
    model = Llama(config)
    tokens = jax.random.randint(key, (2, 16), 0, config.vocab_size)
    params = jax.jit(model.init)(key, tokens)["params"]
    lora = jaxlora.LoraConfig(rank=2, targets="all-linear", stacked_axes={"layers/": 1})
    base, delta = jaxlora.split(params, lora, key=key)
    qbase = jaxlora.quantize(base, targets="layers/.*kernel", double_quant=False)
    loss = lambda p, t: causal_lm_loss(model.apply({"params": p}, t), t)
    tx = _memory.lora_optimizer(optax.adam(1e-3), delta)
    report = _memory.memory_of(
        _memory.lora_step(loss, tx), delta, tx.init(delta), qbase, tokens, donate_argnums=(0, 1)
    )
    assert report.argument >= sum(
        q.nbytes
        for q in jax.tree.leaves(qbase, is_leaf=lambda x: isinstance(x, jaxlora.QuantizedArray))
        if isinstance(q, jaxlora.QuantizedArray)
    )


def test_requantized_merge_keeps_a_stored_axis_order(key):
    """A GGUF-style weight stored transposed is requantized in its own stored order."""
    w = jax.random.normal(key, (64, 96))  # the kernel (in, out); stored (out, in)
    stored = quant.quantize_array(w.T, format="q4_1", block_size=32)
    base = {"w": dataclasses.replace(stored, shape=(64, 96), axes=(1, 0))}
    _, delta = jaxlora.split({"w": w}, jaxlora.LoraConfig(rank=2, targets="w"), key=key)
    delta = jax.tree.map(lambda x: x + 0.05, delta)
    merged = jaxlora.merge(base, delta, requantize=True)["w"]
    assert merged.axes == (1, 0) and merged.shape == (64, 96) and merged.format == "q4_1"
    exact = jaxlora.merge(base, delta)["w"]  # full precision
    want = quant.quantize_array(exact.T, format="q4_1", block_size=32)  # blocks along `in`
    np.testing.assert_array_equal(merged.codes, want.codes)
    np.testing.assert_array_equal(merged.dequantize(), want.dequantize().T)
