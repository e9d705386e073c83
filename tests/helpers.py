"""Helpers shared by the tests: random data and trees, dense references, a training loop."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora
from jaxlora import memory as _memory


def normal(*shape, seed=0, dtype=np.float32):
    """Standard normal test data from numpy: no XLA program compiled per shape.

    ``shape`` is given as integers (``normal(3, 4)``) or as one tuple
    (``normal((3, 4))``); the float64 draws are rounded to ``dtype``.
    """
    if len(shape) == 1 and isinstance(shape[0], tuple):
        (shape,) = shape
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def randomize_b(delta, key, scale=0.1):
    """A copy of ``delta`` whose ``b`` factors are random (they start at zero)."""
    leaves, treedef = jax.tree.flatten(delta, is_leaf=is_node)
    out = []
    for i, node in enumerate(leaves):
        if is_node(node):
            b = scale * jax.random.normal(jax.random.fold_in(key, i), node.b.shape, node.b.dtype)
            node = dataclasses.replace(node, b=b)
        out.append(node)
    return treedef.unflatten(out)


def is_node(x):
    return isinstance(x, jaxlora.LoraNode)


def dense_merge(weight, node, sign=1.0):
    """``W + s·a@b`` in float64 numpy, reshaped to the weight's shape."""
    a = np.asarray(node.a, np.float64)
    b = np.asarray(node.b, np.float64)
    delta = float(node.scale) * np.matmul(a, b)
    return np.asarray(weight, np.float64) + sign * delta.reshape(np.shape(weight))


def train(loss, base, delta, batch, *, steps, lr):
    """``steps`` jitted Adam steps of ``jaxlora.memory.lora_step`` on one batch.

    ``loss(params, batch)`` is the model's loss; returns the trained delta and the loss
    before each step.
    """
    tx = _memory.lora_optimizer(optax.adam(lr), delta)
    step = jax.jit(_memory.lora_step(loss, tx))
    state = tx.init(delta)
    losses = []
    for _ in range(steps):
        delta, state, value = step(delta, state, base, batch)
        losses.append(float(value))
    return delta, losses


def tiny_hf_configs(t):
    """``transformers`` configs of one-layer, width-16 models (random weights, fast to build).

    ``t`` is the ``transformers`` module; the same configs build its PyTorch models
    (``tests/test_presets.py``) and its Flax ports (``tests/test_hf_flax.py``).
    """
    small = dict(vocab_size=60, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    block = dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    decoder = dict(**block, **small, num_key_value_heads=1, max_position_embeddings=16)
    return {
        "gpt2": t.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, **small),
        "t5": t.T5Config(num_layers=1, d_model=16, d_ff=32, num_heads=2, d_kv=8, **small),
        "bloom": t.BloomConfig(n_layer=1, hidden_size=16, n_head=2, **small),
        "albert": t.AlbertConfig(**block, embedding_size=8, **small),
        "whisper": t.WhisperConfig(
            encoder_layers=1,
            decoder_layers=1,
            d_model=16,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            num_mel_bins=8,
            max_source_positions=8,
            max_target_positions=8,
            decoder_start_token_id=1,
            **small,
        ),
        "vit": t.ViTConfig(**block, image_size=8, patch_size=4),
        "bert": t.BertConfig(**block, **small),
        "llama": t.LlamaConfig(**decoder),
        "mistral": t.MistralConfig(**decoder),
    }
