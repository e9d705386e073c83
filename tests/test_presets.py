"""The target presets classify the weights of third-party architectures as their authors do.

The reference is each model's own module structure in ``transformers`` (tiny random
configs of GPT-2, T5, BLOOM, ALBERT, Whisper, ViT and BERT): a linear layer inside an
attention module (class name ``*Attention`` or ``*SelfOutput``) is attention's, one inside
an MLP module (``*MLP``, ``*DenseActDense``, ``*Intermediate``, ``*Output``) or an encoder
layer's ``fc1``/``fc2``/``ffn``/``ffn_output`` is the MLP's; ``all-linear`` takes every
linear layer (``nn.Linear`` and GPT-2's ``Conv1D``) and no convolution. Paths are the
module names as Flax ports spell them (``h/0/attn/c_proj/kernel``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxlora import _paths
from tests.helpers import tiny_hf_configs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


def _models():
    t, configs = transformers, tiny_hf_configs(transformers)
    classes = {
        "gpt2": t.GPT2Model,
        "t5": t.T5Model,
        "bloom": t.BloomModel,
        "albert": t.AlbertModel,
        "whisper": t.WhisperModel,
        "vit": t.ViTModel,
        "bert": t.BertModel,
    }
    return {name: (lambda cls=cls, name=name: cls(configs[name])) for name, cls in classes.items()}


def _role(name: str, parent: str) -> str | None:
    """attention, mlp or None, from the enclosing module's class (the reference)."""
    if "Attention" in parent or parent.endswith("SelfOutput"):
        return "attention"
    if any(k in parent for k in ("MLP", "DenseActDense", "Intermediate")):
        return "mlp"
    if parent.endswith("Output") or (
        parent.endswith("Layer") and name.rsplit(".", 1)[-1] in ("fc1", "fc2", "ffn", "ffn_output")
    ):
        return "mlp"
    return None


def _weights(model):
    """``(flax path, abstract kernel, role, is_linear)`` for every linear or conv module."""
    modules = dict(model.named_modules())
    linear_types = (torch.nn.Linear, Conv1D)
    for name, module in model.named_modules():
        if not isinstance(module, (*linear_types, torch.nn.Conv1d, torch.nn.Conv2d)):
            continue
        parent = type(modules[name.rsplit(".", 1)[0]] if "." in name else model).__name__
        ndim = module.weight.ndim
        kernel = jax.ShapeDtypeStruct((4,) * ndim, jnp.float32)
        path = name.replace(".", "/") + "/kernel"
        yield path, kernel, _role(name, parent), isinstance(module, linear_types)


@pytest.mark.parametrize("model", list(_models()))
def test_presets_follow_the_models_own_structure(model):
    weights = list(_weights(_models()[model]()))
    assert any(role == "attention" for _, _, role, _ in weights)
    attention, mlp, linear = (
        _paths.target_predicate(preset, None) for preset in ("attention", "mlp", "all-linear")
    )
    for path, kernel, role, is_linear in weights:
        assert attention(path, kernel) == (role == "attention"), (path, role)
        assert mlp(path, kernel) == (role == "mlp"), (path, role)
        assert linear(path, kernel) == is_linear, path  # no convolution, every linear layer


def test_the_issues_examples():
    """The misfilings reported against the first presets, by name."""
    attention, mlp, linear = (
        _paths.target_predicate(preset, None) for preset in ("attention", "mlp", "all-linear")
    )
    w = jax.ShapeDtypeStruct((4, 4), jnp.float32)
    assert attention("h/0/attn/c_proj/kernel", w) and not mlp("h/0/attn/c_proj/kernel", w)
    assert mlp("h/0/mlp/c_proj/kernel", w) and not attention("h/0/mlp/c_proj/kernel", w)
    t5_wo = "encoder/block/0/layer/1/DenseReluDense/wo/kernel"
    assert mlp(t5_wo, w) and not attention(t5_wo, w)
    assert attention("h/0/self_attention/dense/kernel", w)
    assert attention("albert_layers/0/attention/dense/kernel", w)
    assert mlp("albert_layers/0/ffn/kernel", w) and mlp("albert_layers/0/ffn_output/kernel", w)
    conv1d, conv2d = (jax.ShapeDtypeStruct((3,) * n, jnp.float32) for n in (3, 4))
    assert not linear("encoder/conv1/kernel", conv1d) and not linear("Conv_0/kernel", conv2d)
    assert not linear("embeddings/patch_embeddings/projection/kernel", conv2d)
    assert linear("Dense_0/kernel", w) and not linear("lm_head/kernel", w)
    # 2-D layers whose names merely contain "conv" are linear (ConvNeXt's pointwise layers)
    assert linear("convnext/stages/0/layers/0/pwconv1/weight", w)
    assert linear("model/convex_proj/kernel", w)


def test_attention_blocks_do_not_claim_norms_biases_or_nested_mlps():
    attention, mlp = (_paths.target_predicate(p, None) for p in ("attention", "mlp"))
    w = jax.ShapeDtypeStruct((4, 4), jnp.float32)
    not_weights = (
        "block/0/layer/0/SelfAttention/relative_attention_bias/weight",
        "layers/self_attn/q_norm/weight",
        "layers/self_attn/layer_norm/weight",
    )
    for path in not_weights:
        assert not attention(path, w), path
    nested = "perceiver/cross_attention/mlp/dense1/weight"
    assert mlp(nested, w) and not attention(nested, w)
