"""PyTorch-side references shared by the PEFT tests: the tiny BERT on both sides.

A pytest plugin of the suite (the root ``conftest.py`` loads it), so its fixtures
are defined once for ``test_peft.py`` and ``test_peft_variants.py``.
"""

from __future__ import annotations

import contextlib
import warnings

import jax
import numpy as np
import pytest

import jaxlora
from jaxlora.models import bert, minilm

BERT = bert.BertConfig(
    vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, max_position=16
)
RTOL, ATOL = 1e-4, 1e-5


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
    hf_config = transformers.BertConfig(
        vocab_size=BERT.vocab_size,
        hidden_size=BERT.hidden_size,
        num_hidden_layers=BERT.num_layers,
        num_attention_heads=BERT.num_heads,
        intermediate_size=BERT.intermediate_size,
        max_position_embeddings=BERT.max_position,
        type_vocab_size=BERT.type_vocab_size,
        layer_norm_eps=BERT.layer_norm_eps,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
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
