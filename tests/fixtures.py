"""Fixtures and PyTorch-side references shared by several test modules.

A pytest plugin of the suite (the root ``conftest.py`` loads it), so each is
defined once: the tiny BERT built on both sides (PEFT tests), the
``transformers`` configs that mirror jaxlora's BERT and Llama configs, the tiny
scanned Llama and its random adapters (many-adapter tests), and a scanned Flax
stack of layers (engine and variant tests).
"""

from __future__ import annotations

import contextlib
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.models import bert, minilm
from jaxlora.models.llama import Llama, LlamaConfig
from tests.helpers import randomize_b

BERT = bert.BertConfig(
    vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, max_position=16
)
RTOL, ATOL = 1e-4, 1e-5


def hf_bert_config(transformers, config: bert.BertConfig):
    """The ``transformers.BertConfig`` of jaxlora's :class:`~jaxlora.models.bert.BertConfig`."""
    return transformers.BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def hf_llama_config(transformers, config, **overrides):
    """The ``transformers.LlamaConfig`` of jaxlora's :class:`~jaxlora.models.llama.LlamaConfig`."""
    fields = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        intermediate_size=config.d_ff,
        max_position_embeddings=config.max_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
    )
    return transformers.LlamaConfig(**{**fields, **overrides})


@contextlib.contextmanager
def peft_warnings():
    """Warnings stay errors, except transformers' deprecation that PEFT trips over."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        warnings.filterwarnings("ignore", "Setting `save_embedding_layers` to `True`")
        yield


@pytest.fixture(scope="module")
def torch_libs():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_peft = pytest.importorskip("peft")
    return torch, transformers, hf_peft


@pytest.fixture(scope="module")
def bert_model(torch_libs):
    torch, transformers, _ = torch_libs
    hf_config = hf_bert_config(transformers, BERT)
    torch.manual_seed(1)
    model = transformers.BertModel(hf_config, add_pooling_layer=False).eval()
    params = minilm.convert_hf_state_dict(
        {k: v.numpy() for k, v in model.state_dict().items()}, BERT
    )
    ids = np.random.default_rng(1).integers(0, BERT.vocab_size, (2, 6))
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2])
    encoder = lambda p, i, m: bert.BertModel(BERT).apply({"params": p}, i, m)
    fn = jax.jit(jaxlora.lora_apply(encoder))

    def run(peft_model):
        with torch.no_grad():
            out = peft_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        return out.last_hidden_state.numpy()[mask.astype(bool)]  # padded rows are arbitrary

    return model, params, lambda p, d: np.asarray(fn(p, d, ids, mask))[mask.astype(bool)], run


def assert_adapted(got, want, base):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # A no-op adapter (a file PEFT loads but ignores) must fail.
    assert np.max(np.abs(want - base)) > 1e3 * ATOL


class Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(8, name="proj")(jnp.tanh(h)), None


class Stack(nn.Module):
    """Three :class:`Layer` s under ``nn.scan`` (kernels ``(3, 8, 8)``), optionally rematted."""

    remat: bool = False

    @nn.compact
    def __call__(self, x):
        layer = nn.remat(Layer, prevent_cse=False) if self.remat else Layer
        scan = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        h, _ = scan(name="layers")(x, None)
        return h


@pytest.fixture(scope="module")
def llama():
    """The tiny scanned Llama: ``(config, model, params)``."""
    config = LlamaConfig.tiny(scan_layers=True)
    model = Llama(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return config, model, params


def random_deltas(params, ranks, alphas, key, *, b_key=1000):
    """``(base, deltas)``: one all-linear adapter of ``params`` per rank and alpha.

    Adapter ``i`` splits with ``fold_in(key, i)`` and gets random ``b`` factors (scale 0.3)
    from ``fold_in(key, b_key + i)``; ``params`` is the scanned Llama's (one stacked axis).
    """
    out = []
    for i, (rank, alpha) in enumerate(zip(ranks, alphas, strict=True)):
        config = jaxlora.LoraConfig(rank=rank, alpha=alpha, targets="all-linear", stacked_axes=1)
        base, delta = jaxlora.split(params, config, key=jax.random.fold_in(key, i))
        out.append(randomize_b(delta, jax.random.fold_in(key, b_key + i), scale=0.3))
    return base, out
