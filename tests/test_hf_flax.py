"""LoRA on Flax models nobody here wrote: ``transformers``' own Flax ports, random weights.

``transformers`` 4.x ships Flax GPT-2, BERT, BLOOM, ALBERT, ViT, Whisper, Llama and
Mistral; 5 (which the ``interop`` tests need) has none, so the ``flax-models`` extra
installs 4.x in an environment of its own (see ``.ci/run``), and here, without it, this
module skips. Each model is called as its documentation shows
(``model(inputs, params=params)``) and wrapped without changes. The checks, per model:

* the presets take the weights the architecture's own papers and module names call
  attention and MLP (written out below, per model), and ``all-linear`` every linear
  layer and no convolution or embedding;
* ``infer_layout`` reads the convolution kernels' layouts (ViT's patch embedding,
  Whisper's 1-D convs), so adapting them needs no flags;
* ``lora_apply(..., strict=True)`` factors every use (a merge would raise) and equals
  the model run on ``merge(base, delta)``; its gradients equal the merge strategy's;
* a QLoRA base (NF4) gives the model run on the dequantized, merged weights.

T5's Flax port does not run on JAX 0.10 at all (it calls ``jnp.clip(a_max=...)``, which
JAX removed), with or without LoRA; it is left out.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import _paths
from tests.helpers import tiny_hf_configs

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FlaxGPT2LMHeadModel"):
    pytest.skip(
        "transformers 5 has no Flax models: install the flax-models extra (transformers 4.x)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TOKENS = jnp.asarray(np.random.default_rng(0).integers(3, 60, (2, 8)), jnp.int32)
PIXELS = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 8, 8)), jnp.float32)
MELS = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 16)), jnp.float32)

# name: (Flax class, example inputs, {preset: module paths it should take}); the config is
# tests.helpers.tiny_hf_configs'. Paths use N for layer numbers; each preset's expected
# modules are the ones the architecture calls attention and MLP.
MODELS = {
    "gpt2": (
        "FlaxGPT2LMHeadModel",
        ((TOKENS,), {}),
        {
            "attention": {"transformer/h/N/attn/c_attn", "transformer/h/N/attn/c_proj"},
            "mlp": {"transformer/h/N/mlp/c_fc", "transformer/h/N/mlp/c_proj"},
        },
    ),
    "bert": (
        "FlaxBertModel",
        ((TOKENS,), {}),
        {
            "attention": {
                *(f"encoder/layer/N/attention/self/{m}" for m in ("query", "key", "value")),
                "encoder/layer/N/attention/output/dense",
            },
            "mlp": {"encoder/layer/N/intermediate/dense", "encoder/layer/N/output/dense"},
            "other": {"pooler/dense"},
        },
    ),
    "bloom": (
        "FlaxBloomModel",
        ((TOKENS,), {}),
        {
            "attention": {"h/N/self_attention/query_key_value", "h/N/self_attention/dense"},
            "mlp": {"h/N/mlp/dense_h_to_4h", "h/N/mlp/dense_4h_to_h"},
        },
    ),
    "albert": (
        "FlaxAlbertModel",
        ((TOKENS,), {}),
        {
            "attention": {
                f"encoder/albert_layer_groups/N/albert_layers/N/attention/{m}"
                for m in ("query", "key", "value", "dense")
            },
            "mlp": {
                f"encoder/albert_layer_groups/N/albert_layers/N/{m}" for m in ("ffn", "ffn_output")
            },
            # the embedding projection and the pooler are linear layers outside the blocks
            "other": {"encoder/embedding_hidden_mapping_in", "pooler"},
        },
    ),
    "vit": (
        "FlaxViTModel",
        ((PIXELS,), {}),
        {
            "attention": {
                *(f"encoder/layer/N/attention/attention/{m}" for m in ("query", "key", "value")),
                "encoder/layer/N/attention/output/dense",
            },
            "mlp": {"encoder/layer/N/intermediate/dense", "encoder/layer/N/output/dense"},
            "other": {"pooler/dense"},
        },
    ),
    "whisper": (
        "FlaxWhisperModel",
        ((MELS,), {"decoder_input_ids": TOKENS}),
        {
            "attention": {
                f"{stack}/layers/N/{block}/{m}"
                for stack, blocks in (
                    ("encoder", ["self_attn"]),
                    ("decoder", ["self_attn", "encoder_attn"]),
                )
                for block in blocks
                for m in ("q_proj", "k_proj", "v_proj", "out_proj")
            },
            "mlp": {f"{s}/layers/N/{m}" for s in ("encoder", "decoder") for m in ("fc1", "fc2")},
        },
    ),
    **{
        name: (
            cls,
            ((TOKENS,), {}),
            {
                "attention": {f"model/layers/N/self_attn/{m}_proj" for m in "qkvo"},
                "mlp": {f"model/layers/N/mlp/{m}_proj" for m in ("gate", "up", "down")},
            },
        )
        for name, cls in (("llama", "FlaxLlamaForCausalLM"), ("mistral", "FlaxMistralForCausalLM"))
    },
}

# convolutions and embeddings, adapted by name: (targets, the input_axes infer_layout reads)
OTHER_TARGETS = {
    "gpt2": (r"transformer/wte/embedding", {}),  # (vocab, d): the default layout
    "vit": (
        r"patch_embeddings/projection/kernel",  # (4, 4, 3, 16)
        {"embeddings/patch_embeddings/projection/kernel": 3},
    ),
    "whisper": (
        r"encoder/conv[12]/kernel",  # (3, in, 16): 1-D convs
        {"encoder/conv1/kernel": 2, "encoder/conv2/kernel": 2},
    ),
}


@dataclasses.dataclass(frozen=True)
class _Model:
    name: str
    fn: object  # fn(params, *args, **kwargs): the model's first output
    params: dict
    args: tuple
    kwargs: dict
    expected: dict  # preset -> module paths


@pytest.fixture(scope="module", params=list(MODELS))
def model(request) -> _Model:
    cls, (args, kwargs), expected = MODELS[request.param]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = getattr(transformers, cls)(tiny_hf_configs(transformers)[request.param])

    def fn(params, *args, **kwargs):
        return hf(*args, params=params, **kwargs)[0]

    return _Model(request.param, fn, hf.params, args, kwargs, expected)


def _adapted(delta) -> set[str]:
    """The adapted modules' paths, layer numbers as N."""
    flat = jax.tree_util.tree_flatten_with_path(delta, is_leaf=_is_node)[0]
    return {
        re.sub(r"/\d+(?=/|$)", "/N", _paths.path_str(path).removesuffix("/kernel"))
        for path, node in flat
        if _is_node(node)
    }


def _is_node(x) -> bool:
    return isinstance(x, jaxlora.LoraNode)


def _perturbed(delta, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda z: z + jnp.asarray(rng.normal(size=z.shape) / 8, z.dtype), delta)


def _close(got, want, rtol=2e-5):
    """Close relative to the output's scale (the models' outputs reach tens)."""
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * max(scale, 1.0))


def test_presets_take_the_architectures_attention_and_mlp_weights(model):
    for preset in ("attention", "mlp"):
        config = jaxlora.LoraConfig(rank=2, targets=preset)
        _, delta = jaxlora.split(model.params, config, key=jax.random.key(0))
        assert _adapted(delta) == model.expected[preset], (model.name, preset)
    config = jaxlora.LoraConfig(rank=2, targets="all-linear")
    _, delta = jaxlora.split(model.params, config, key=jax.random.key(0))
    expected = model.expected
    assert _adapted(delta) == expected["attention"] | expected["mlp"] | expected.get("other", set())


def _split_all_linear(model):
    layout = jaxlora.infer_layout(model.fn, model.params, *model.args, **model.kwargs)
    config = jaxlora.LoraConfig(rank=2, targets="all-linear", **layout)
    base, delta = jaxlora.split(model.params, config, key=jax.random.key(0))
    return base, _perturbed(delta)


def test_lora_apply_factors_every_use_and_equals_merge(model):
    fn, args, kwargs = model.fn, model.args, model.kwargs
    base, delta = _split_all_linear(model)
    f = jax.jit(jaxlora.lora_apply(fn, strict=True))  # strict: a merge at any use raises
    want = fn(jaxlora.merge(base, delta), *args, **kwargs)
    _close(f(base, delta, *args, **kwargs), want)
    assert float(jnp.max(jnp.abs(want - fn(model.params, *args, **kwargs)))) > 1e-3  # it adapts

    def grad(strategy):
        g = jaxlora.lora_apply(fn, strategy=strategy)
        return jax.jit(jax.grad(lambda d: jnp.mean(jnp.sin(g(base, d, *args, **kwargs)))))

    got, ref = grad("use-site")(delta), grad("merge")(delta)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        _close(g, r, rtol=1e-4)


def test_convolutions_and_embeddings_with_the_inferred_layout(model):
    """ViT's patch kernel and Whisper's 1-D conv kernels; GPT-2's tied embedding (lookup and
    LM head), plain and DoRA."""
    if model.name not in OTHER_TARGETS:
        pytest.skip(f"{model.name}: no convolution, and no embedding used beyond a lookup")
    fn, args, kwargs = model.fn, model.args, model.kwargs
    targets, want = OTHER_TARGETS[model.name]
    layout = jaxlora.infer_layout(fn, model.params, *args, **kwargs)
    assert {k: n for k, n in layout["input_axes"].items() if re.search(targets, k)} == {
        f"^{k}$": n for k, n in want.items()
    }
    for use_dora in (False, True):
        config = jaxlora.LoraConfig(rank=2, targets=targets, use_dora=use_dora, **layout)
        base, delta = jaxlora.split(model.params, config, key=jax.random.key(1))
        delta = _perturbed(delta, seed=1)
        got = jax.jit(jaxlora.lora_apply(fn, strict=True))(base, delta, *args, **kwargs)
        _close(got, fn(jaxlora.merge(base, delta), *args, **kwargs))


def test_qlora_base(model):
    base, delta = _split_all_linear(model)
    qbase = jaxlora.quantize(base, targets="all-linear", block_size=16)
    f = jax.jit(jaxlora.lora_apply(model.fn, strict=True))
    got = f(qbase, delta, *model.args, **model.kwargs)
    want = model.fn(jaxlora.merge(jaxlora.dequantize(qbase), delta), *model.args, **model.kwargs)
    _close(got, want)
