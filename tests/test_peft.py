"""Tests for ``jaxlora.io.peft``: PEFT adapter files, checked against PEFT itself.

The interop tests build the same tiny BERT and Llama in PyTorch (``transformers``) and in
jaxlora with identical random weights, write adapters on one side and read them on the
other, and compare the adapted models' outputs. They skip without torch, transformers or
peft; the format and error tests below them need none of these.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jaxlora
from jaxlora.io import peft
from jaxlora.io.peft import BERT_KEY_MAP, LLAMA_KEY_MAP, KeyMap
from jaxlora.io.peft._format import pattern_value
from jaxlora.models.llama import Llama, LlamaConfig
from tests.fixtures import assert_adapted, hf_llama_config, peft_warnings
from tests.helpers import is_node

# Non-square on purpose: k/v project 64 -> 32 (GQA) and the MLP 64 <-> 128, so a swapped or
# untransposed lora_A/lora_B cannot pass.
LLAMA = LlamaConfig.tiny()
LLAMA_SCANNED = dataclasses.replace(LLAMA, scan_layers=True)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def nodes(delta):
    """``{path: node}`` for the adapted leaves of a delta."""
    flat = jax.tree_util.tree_flatten_with_path(delta, is_leaf=lambda x: x is None or is_node(x))
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): node
        for path, node in flat[0]
        if node is not None
    }


def random_delta(params, config, seed, std=0.1):
    """The delta ``split`` makes, with random ``a`` and ``b`` (``b`` starts at zero).

    ``split`` runs under ``eval_shape`` and the values come from numpy through
    ``device_put``: eager jax ops, and ``jnp.asarray`` of a numpy array, compile a program
    per shape, which takes seconds on a busy CPU.
    """
    _, shapes = jax.eval_shape(lambda p: jaxlora.split(p, config, key=jax.random.key(0)), params)
    rng = np.random.default_rng(seed)

    def fill(path, node):
        if node is None:
            return None
        a = np.asarray(rng.standard_normal(node.a.shape) * std, node.a.dtype)
        b = np.asarray(rng.standard_normal(node.b.shape) * std, node.b.dtype)
        return dataclasses.replace(node, a=jax.device_put(a), b=jax.device_put(b))

    return jax.tree_util.tree_map_with_path(fill, shapes, is_leaf=lambda x: x is None or is_node(x))


def module_names(delta, key_map):
    """``{PEFT module: (path, layer index)}`` that an export of ``delta`` should write."""
    out = {}
    for path, node in nodes(delta).items():
        for index in np.ndindex(*node.layout.stacked):
            out[key_map(path).format(*index)] = (path, index)
    return out


# --- small parameter trees without torch ------------------------------------------------------


def llama_like(*, n_layers=2, d=8, kv=4, ff=12, vocab=10, scanned=False, seed=0):
    """A params tree named like ``jaxlora.models.llama.Llama``'s, with random numpy values."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    stack = (n_layers,) if scanned else ()

    def layer():
        return {
            "self_attn": {
                "q_proj": {"kernel": w(*stack, d, d)},
                "k_proj": {"kernel": w(*stack, d, kv)},
                "v_proj": {"kernel": w(*stack, d, kv)},
                "o_proj": {"kernel": w(*stack, d, d)},
            },
            "mlp": {
                "gate_proj": {"kernel": w(*stack, d, ff)},
                "up_proj": {"kernel": w(*stack, d, ff)},
                "down_proj": {"kernel": w(*stack, ff, d)},
            },
            "input_layernorm": {"scale": w(*stack, d)},
        }

    params = {"embed_tokens": {"embedding": w(vocab, d)}, "lm_head": {"kernel": w(d, vocab)}}
    if scanned:
        params["layers"] = layer()
    else:
        params.update({f"layers_{i}": layer() for i in range(n_layers)})
    return jax.device_put(params)


SCANNED_AXES = {r"^layers/": 1}


def exported(tmp_path, params, config, key_map=LLAMA_KEY_MAP, seed=0, name="adapter"):
    delta = random_delta(params, config, seed)
    directory = tmp_path / name
    peft.save_peft(directory, delta, config=config, key_map=key_map)
    return delta, directory


def assert_same_delta(got, want):
    got_nodes, want_nodes = nodes(got), nodes(want)
    assert sorted(got_nodes) == sorted(want_nodes)
    chex.assert_trees_all_equal_structs(got, want)
    for path, node in want_nodes.items():
        assert got_nodes[path].layout == node.layout, path
        assert got_nodes[path].a.dtype == node.a.dtype, path
        chex.assert_trees_all_equal(
            (got_nodes[path].a, got_nodes[path].b, got_nodes[path].scale),
            (node.a, node.b, node.scale),
        )


# --- the files, without torch ------------------------------------------------------------------


@pytest.mark.parametrize(
    "scanned, rslora, dtype", [(False, False, jnp.float32), (True, True, jnp.bfloat16)]
)
def test_export_load_round_trip(tmp_path, scanned, rslora, dtype):
    params = llama_like(scanned=scanned)
    config = jaxlora.LoraConfig(
        rank=4,
        alpha=6,
        targets=[*PROJECTIONS, "embed_tokens", "lm_head"],
        rank_pattern={"k_proj": 2, "mlp": 3},
        alpha_pattern={"v_proj": 1.5, "down_proj": 7},
        rslora=rslora,
        stacked_axes=SCANNED_AXES if scanned else None,
        dtype=dtype,
    )
    delta, directory = exported(tmp_path, params, config)
    loaded, loaded_config = peft.load_peft(directory, base=params, key_map=LLAMA_KEY_MAP)
    assert_same_delta(loaded, delta)
    for path, node in nodes(loaded).items():
        assert np.float32(loaded_config.scale_for(path)) == node.scale
        assert loaded_config.rank_for(path) == node.rank
        assert loaded_config.layout_for(path, node.layout.shape) == node.layout
    assert loaded_config.rslora == rslora
    # The returned config targets exactly the adapted paths.
    matches = loaded_config.matcher()
    adapted = {p for p, leaf in jaxlora._paths.leaves_with_paths(params) if matches(p, leaf)}
    assert adapted == set(nodes(delta))
    # And a second export writes the same files.
    peft.save_peft(tmp_path / "again", loaded, config=loaded_config, key_map=LLAMA_KEY_MAP)
    first = safetensors.numpy.load_file(directory / peft.WEIGHTS_NAME)
    second = safetensors.numpy.load_file(tmp_path / "again" / peft.WEIGHTS_NAME)
    chex.assert_trees_all_equal(first, second)


def test_export_writes_peft_layout(tmp_path):
    params = llama_like(scanned=True)
    config = jaxlora.LoraConfig(
        rank=2, targets=["k_proj", "embed_tokens"], stacked_axes=SCANNED_AXES
    )
    delta, directory = exported(tmp_path, params, config)
    tensors = safetensors.numpy.load_file(directory / peft.WEIGHTS_NAME)
    k = delta["layers"]["self_attn"]["k_proj"]["kernel"]
    embed = delta["embed_tokens"]["embedding"]
    prefix = "base_model.model.model."
    assert sorted(tensors) == sorted(
        [f"{prefix}embed_tokens.lora_embedding_A", f"{prefix}embed_tokens.lora_embedding_B"]
        + [f"{prefix}layers.{i}.self_attn.k_proj.lora_{f}.weight" for i in (0, 1) for f in "AB"]
    )
    # lora_A is (r, in), lora_B is (out, r): k_proj is 8 -> 4.
    for i in (0, 1):
        a = tensors[f"{prefix}layers.{i}.self_attn.k_proj.lora_A.weight"]
        b = tensors[f"{prefix}layers.{i}.self_attn.k_proj.lora_B.weight"]
        assert a.shape == (2, 8) and b.shape == (4, 2)
        np.testing.assert_array_equal(a, np.asarray(k.a[i]).T)
        np.testing.assert_array_equal(b, np.asarray(k.b[i]).T)
    # lora_embedding_A is (r, num_embeddings), lora_embedding_B (embedding_dim, r).
    np.testing.assert_array_equal(tensors[f"{prefix}embed_tokens.lora_embedding_A"], embed.a.T)
    np.testing.assert_array_equal(tensors[f"{prefix}embed_tokens.lora_embedding_B"], embed.b.T)


def test_export_config_covers_every_tensor(tmp_path):
    """PEFT drops tensors of modules missing from target_modules: none may be missing."""
    params = llama_like()
    config = jaxlora.LoraConfig(
        rank=4,
        alpha=8,
        targets="all-linear",
        rank_pattern={"layers_1/mlp": 2},
        alpha_pattern={"layers_0/self_attn/q": 3.0},
    )
    delta, directory = exported(tmp_path, params, config)
    written = json.loads((directory / peft.CONFIG_NAME).read_text())
    tensors = safetensors.numpy.load_file(directory / peft.WEIGHTS_NAME)
    in_file = {re.sub(r"^base_model\.model\.(.*)\.lora_[AB]\.weight$", r"\1", k) for k in tensors}
    expected = sorted(module_names(delta, LLAMA_KEY_MAP))
    assert sorted(in_file) == written["target_modules"] == expected
    # PEFT's own lookup of r and lora_alpha (first pattern matching a name suffix) gives
    # every module its adapter's rank and scale.
    for module, (path, _) in module_names(delta, LLAMA_KEY_MAP).items():
        node = nodes(delta)[path]
        r = pattern_value(written["rank_pattern"], module, written["r"])
        alpha = pattern_value(written["alpha_pattern"], module, written["lora_alpha"])
        assert r == node.rank
        assert np.float32(alpha / r) == node.scale
    assert written["r"] == 4 and written["lora_alpha"] == 8
    assert written["init_lora_weights"] is True and written["use_dora"] is False


def test_export_derives_alpha_from_scale(tmp_path):
    """A node whose scale is not the config's still exports PEFT's exact scale."""
    params = llama_like()
    config = jaxlora.LoraConfig(rank=3, alpha=5, targets="q_proj", rslora=True)
    delta = random_delta(params, config, 0)
    node = delta["layers_0"]["self_attn"]["q_proj"]["kernel"]
    odd = dataclasses.replace(node, scale=0.123456)
    delta["layers_0"]["self_attn"]["q_proj"]["kernel"] = odd
    peft.save_peft(tmp_path, delta, config=config, key_map=LLAMA_KEY_MAP)
    loaded, _ = peft.load_peft(tmp_path, base=params, key_map=LLAMA_KEY_MAP)
    assert np.float32(loaded["layers_0"]["self_attn"]["q_proj"]["kernel"].scale) == np.float32(
        0.123456
    )
    assert loaded["layers_1"]["self_attn"]["q_proj"]["kernel"].scale == node.scale


def test_multi_axis_kernels_flatten_row_major(tmp_path):
    """DenseGeneral kernels (d, heads, head_dim) and (heads, head_dim, d) read as PEFT's 2-D."""
    params = {
        "q": {"kernel": jnp.asarray(np.random.default_rng(0).standard_normal((8, 2, 3)))},
        "o": {"kernel": jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 8)))},
    }
    config = jaxlora.LoraConfig(rank=2, targets=["q", "o"], input_axes={"^o/": 2})
    delta, directory = exported(tmp_path, params, config, key_map=lambda p: p.split("/")[0])
    tensors = safetensors.numpy.load_file(directory / peft.WEIGHTS_NAME)
    for name, (n_in, n_out) in {"q": (8, 6), "o": (6, 8)}.items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert (a.shape, b.shape) == ((2, n_in), (n_out, 2))
        # The torch Linear's delta (b @ a, (out, in)) is the Flax delta flattened row-major.
        node = delta[name]["kernel"]
        flat = np.asarray(node.delta_weight()).reshape(n_in, n_out)
        np.testing.assert_allclose(float(node.scale) * (b @ a).T, flat, rtol=1e-5, atol=1e-6)
    # Without a config, load reads the input axes from lora_A's width.
    loaded, loaded_config = peft.load_peft(
        directory, base=params, key_map=lambda p: p.split("/")[0]
    )
    assert_same_delta(loaded, delta)
    assert loaded_config.layout_for("o/kernel", (2, 3, 8)).inputs == (2, 3)


# --- errors ------------------------------------------------------------------------------------


def test_export_errors(tmp_path):
    params = llama_like()
    config = jaxlora.LoraConfig(rank=2, targets=["q_proj", "lm_head"])
    delta = random_delta(params, config, 0)
    no_head = lambda p: None if p.startswith("lm_head") else LLAMA_KEY_MAP(p)
    with pytest.raises(ValueError, match=r"key_map\('lm_head/kernel'\) returned None"):
        peft.save_peft(tmp_path, delta, config=config, key_map=no_head)
    with pytest.raises(ValueError, match=r"maps both .* to the PEFT module 'same'"):
        peft.save_peft(tmp_path, delta, config=config, key_map=lambda p: "same")
    with pytest.raises(ValueError, match=r"starts with PEFT's own prefix"):
        peft.save_peft(
            tmp_path, delta, config=config, key_map=LLAMA_KEY_MAP.prefixed("base_model.model.")
        )
    names = {"layers_0": "lm_head", "layers_1": "model.layers.1.q", "lm_head": "model.lm_head"}
    with pytest.raises(ValueError, match=r"'lm_head' and 'model.lm_head' end alike"):
        peft.save_peft(tmp_path, delta, config=config, key_map=lambda p: names[p.split("/")[0]])
    with pytest.raises(ValueError, match=r"not a PyTorch module name"):
        peft.save_peft(tmp_path, delta, config=config, key_map=lambda p: p.replace("/", ". "))
    with pytest.raises(TypeError, match=r"key_map must be"):
        peft.save_peft(tmp_path, delta, config=config, key_map="model")
    with pytest.raises(TypeError, match=r"config must be a jaxlora.LoraConfig"):
        peft.save_peft(tmp_path, delta, config={"r": 2}, key_map=LLAMA_KEY_MAP)
    with pytest.raises(ValueError, match=r"holds no adapter"):
        peft.save_peft(
            tmp_path, jax.tree.map(lambda _: None, params), config=config, key_map=LLAMA_KEY_MAP
        )
    scanned = llama_like(scanned=True)
    stacked_config = jaxlora.LoraConfig(rank=2, targets="q_proj", stacked_axes=SCANNED_AXES)
    stacked = random_delta(scanned, stacked_config, 0)
    with pytest.raises(ValueError, match=r"0 '\{\}' fields, but the adapter .* has 1 stacked"):
        peft.save_peft(
            tmp_path, stacked, config=stacked_config, key_map=lambda p: p.replace("/", "_")
        )
    assert not (tmp_path / peft.CONFIG_NAME).exists()  # nothing written on error


@pytest.fixture
def llama_file(tmp_path):
    params = llama_like()
    config = jaxlora.LoraConfig(rank=2, targets=["q_proj", "up_proj"])
    _, directory = exported(tmp_path, params, config)
    return params, directory


def edit(directory, *, settings=None, tensors=None):
    """Rewrites an adapter's config (``settings(dict)``) or tensors (``tensors(dict)``)."""
    if settings is not None:
        file = directory / peft.CONFIG_NAME
        data = json.loads(file.read_text())
        settings(data)
        file.write_text(json.dumps(data))
    if tensors is not None:
        file = directory / peft.WEIGHTS_NAME
        data = dict(safetensors.numpy.load_file(file))
        tensors(data)
        safetensors.numpy.save_file(data, file)


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def test_load_unknown_module(llama_file):
    params, directory = llama_file
    one_layer = {k: v for k, v in params.items() if k != "layers_1"}
    with pytest.raises(ValueError, match=r"'base_model\.model\.model\.layers\.1\..*' adapts the"):
        peft.load_peft(directory, base=one_layer, key_map=LLAMA_KEY_MAP)


def test_load_prefix_hints(llama_file):
    params, directory = llama_file
    with pytest.raises(ValueError, match=r"the key map adds 'extra\.', which the file lacks"):
        peft.load_peft(directory, base=params, key_map=LLAMA_KEY_MAP.prefixed("extra."))
    wrap = lambda name: name.replace("base_model.model.", "base_model.model.wrap.")
    edit(
        directory,
        tensors=lambda t: t.update({wrap(k): t.pop(k) for k in list(t)}),
        settings=lambda s: s.update(target_modules=["wrap." + m for m in s["target_modules"]]),
    )
    with pytest.raises(ValueError, match=r"use key_map\.prefixed\('wrap\.'\)"):
        peft.load_peft(directory, base=params, key_map=LLAMA_KEY_MAP)
    loaded, _ = peft.load_peft(directory, base=params, key_map=LLAMA_KEY_MAP.prefixed("wrap."))
    assert len(nodes(loaded)) == 4


def test_load_shape_mismatch(llama_file):
    _, directory = llama_file
    wider = llama_like(ff=16)
    with pytest.raises(
        ValueError,
        match=r"'base_model\.model\.model\.layers\.\d\.mlp\.up_proj\.lora_A\.weight' and its "
        r"module's other tensors hold a \(8 -> 12\) adapter, but "
        r"'layers_\d/mlp/up_proj/kernel' has shape \(8, 16\)",
    ):
        peft.load_peft(directory, base=wider, key_map=LLAMA_KEY_MAP)


def test_load_dora_magnitudes_must_match_the_method(llama_file):
    params, directory = llama_file
    edit(directory, tensors=lambda t: t.update({f"{Q0}.lora_magnitude_vector": np.ones(8)}))
    # a plain LoRA file with a magnitude: reading it as LoRA would drop DoRA's m
    with pytest.raises(ValueError, match=r"lora_magnitude_vector', which is no LoRA tensor"):
        peft.load_peft(directory, base=params, key_map=LLAMA_KEY_MAP)
    edit(directory, settings=lambda s: s.update(use_dora=True))
    with pytest.raises(ValueError, match=r"has no lora_magnitude_vector .* DoRA adapter"):
        peft.load_peft(directory, base=params, key_map=LLAMA_KEY_MAP)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(settings=lambda s: s.update(peft_type="IA3")), ValueError, "'IA3' adapter"),
        (dict(settings=lambda s: s.update(lora_bias=True)), NotImplementedError, "lora_B"),
        (
            dict(settings=lambda s: s.update(modules_to_save=["lm_head"])),
            NotImplementedError,
            "modules_to_save",
        ),
        (
            dict(tensors=lambda t: t.pop(f"{Q0}.lora_B.weight")),
            ValueError,
            r"q_proj\.lora_A\.weight' has no matching lora_B",
        ),
        (
            dict(tensors=lambda t: t.update({"model.x.lora_A.weight": np.ones((2, 8))})),
            ValueError,
            r"'model\.x\.lora_A\.weight', which lacks PEFT's 'base_model\.model\.' prefix",
        ),
        (
            dict(tensors=lambda t: t.update({f"{Q0}.lora_A.default.weight": np.ones((2, 8))})),
            ValueError,
            r"no LoRA tensor jaxlora knows",
        ),
        (
            dict(settings=lambda s: s.update(target_modules=["up_proj"])),
            ValueError,
            r"does not select 'model\.layers\.\d\.self_attn\.q_proj': PEFT would .* drop",
        ),
        (
            dict(settings=lambda s: s.update(rank_pattern={"q_proj": 3})),
            ValueError,
            r"has rank 2, but adapter_config\.json gives 'model\.layers\.\d\.self_attn\.q_proj' "
            r"rank 3",
        ),
        (
            dict(tensors=lambda t: t.update({f"{Q0}.lora_A.weight": np.ones((2, 2, 1, 1))})),
            NotImplementedError,
            r"convolution adapter",
        ),
        (
            dict(
                tensors=lambda t: t.update(
                    {"base_model.model.model.embed_tokens.base_layer.weight": np.ones((10, 8))}
                )
            ),
            ValueError,
            r"copy of a base weight .* differs from base's 'embed_tokens/embedding'",
        ),
    ],
)
def test_load_rejects(llama_file, change, error, match):
    params, directory = llama_file
    edit(directory, **change)
    with pytest.raises(error, match=match):
        peft.load_peft(directory, base=params, key_map=LLAMA_KEY_MAP)


def test_load_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json does not exist"):
        peft.load_peft(tmp_path, base=llama_like(), key_map=LLAMA_KEY_MAP)


def test_load_stacked_needs_one_rank(tmp_path):
    params = llama_like()
    config = jaxlora.LoraConfig(rank=2, targets="v_proj", rank_pattern={"layers_1/": 1})
    _, directory = exported(tmp_path, params, config)
    with pytest.raises(ValueError, match=r"the layers of 'layers/self_attn/v_proj/kernel' have"):
        peft.load_peft(directory, base=llama_like(scanned=True), key_map=LLAMA_KEY_MAP)
    # Unstacked, the same file loads.
    _, loaded_config = peft.load_peft(directory, base=params, key_map=LLAMA_KEY_MAP)
    assert loaded_config.rank_for("layers_1/self_attn/v_proj/kernel") == 1


def test_load_stacked_fills_missing_layers_with_zeros(tmp_path):
    params = llama_like(n_layers=3)
    config = jaxlora.LoraConfig(rank=2, targets=r"layers_[02]/self_attn/q_proj")
    delta, directory = exported(tmp_path, params, config)
    scanned = llama_like(n_layers=3, scanned=True)
    loaded, loaded_config = peft.load_peft(directory, base=scanned, key_map=LLAMA_KEY_MAP,
        config=jaxlora.LoraConfig(stacked_axes=SCANNED_AXES, dropout=0.1),
    )  # fmt: skip
    node = loaded["layers"]["self_attn"]["q_proj"]["kernel"]
    assert node.a.shape == (3, 8, 2) and node.dropout == 0.1 and loaded_config.dropout == 0.1
    np.testing.assert_array_equal(node.a[0], delta["layers_0"]["self_attn"]["q_proj"]["kernel"].a)
    np.testing.assert_array_equal(node.a[2], delta["layers_2"]["self_attn"]["q_proj"]["kernel"].a)
    assert not np.any(node.a[1]) and not np.any(node.b[1])
    with pytest.raises(ValueError, match=r"config reads .* with 0 stacked axes, but the key map"):
        peft.load_peft(directory, base=scanned, key_map=LLAMA_KEY_MAP, config=jaxlora.LoraConfig())


# --- against PEFT and transformers --------------------------------------------------------------


def llama_from_hf(state):
    """``LlamaForCausalLM`` weights as ``Llama`` params: Linear (out, in) -> kernel (in, out).

    jaxlora's Llama uses the Hugging Face rotate_half convention for rotary embeddings, so
    q_proj and k_proj need no permutation.
    """
    layer = lambda i, name: state[f"model.layers.{i}.{name}.weight"]
    params = {
        "embed_tokens": {"embedding": state["model.embed_tokens.weight"]},
        "norm": {"scale": state["model.norm.weight"]},
        "lm_head": {"kernel": state["lm_head.weight"].T},
    }
    for i in range(LLAMA.n_layers):
        params[f"layers_{i}"] = {
            "self_attn": {p: {"kernel": layer(i, f"self_attn.{p}").T} for p in PROJECTIONS[:4]},
            "mlp": {p: {"kernel": layer(i, f"mlp.{p}").T} for p in PROJECTIONS[4:]},
            "input_layernorm": {"scale": layer(i, "input_layernorm")},
            "post_attention_layernorm": {"scale": layer(i, "post_attention_layernorm")},
        }
    return jax.device_put(params)


def scan(params):
    """Unscanned Llama params -> ``scan_layers=True`` params (a leading layer axis)."""
    layers = [params[f"layers_{i}"] for i in range(LLAMA.n_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def dense_general(params):
    """q/k/v kernels as (d_model, heads, head_dim) and o_proj as (heads, head_dim, d_model)."""
    params = jax.tree.map(lambda x: x, params)
    hd = LLAMA.head_dim
    for i in range(LLAMA.n_layers):
        attn = params[f"layers_{i}"]["self_attn"]
        for p in ("q_proj", "k_proj", "v_proj"):
            attn[p]["kernel"] = attn[p]["kernel"].reshape(LLAMA.d_model, -1, hd)
        attn["o_proj"]["kernel"] = attn["o_proj"]["kernel"].reshape(-1, hd, LLAMA.d_model)
    return params


def dense(params):
    """The inverse of :func:`dense_general`, inside the apply function."""
    params = jax.tree.map(lambda x: x, params)
    for i in range(LLAMA.n_layers):
        attn = params[f"layers_{i}"]["self_attn"]
        for p in PROJECTIONS[:4]:
            w = attn[p]["kernel"]
            attn[p]["kernel"] = (
                w.reshape(LLAMA.d_model, -1) if p != "o_proj" else w.reshape(-1, LLAMA.d_model)
            )
    return params


@pytest.fixture(scope="module")
def llama(torch_libs):
    torch, transformers, _ = torch_libs
    hf_config = hf_llama_config(transformers, LLAMA, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    params = llama_from_hf({k: v.numpy() for k, v in model.state_dict().items()})
    tokens = np.random.default_rng(0).integers(0, LLAMA.vocab_size, (2, 7))
    plain = lambda p, t: Llama(LLAMA).apply({"params": p}, t)
    fns = {
        "dense": jax.jit(jaxlora.lora_apply(plain)),
        "dense_general": jax.jit(jaxlora.lora_apply(lambda p, t: plain(dense(p), t))),
        "scanned": jax.jit(
            jaxlora.lora_apply(lambda p, t: Llama(LLAMA_SCANNED).apply({"params": p}, t))
        ),
    }
    layouts = {"dense": params, "dense_general": dense_general(params), "scanned": scan(params)}

    def run(peft_model):
        with torch.no_grad():
            return peft_model(input_ids=torch.from_numpy(tokens)).logits.numpy()

    return model, layouts, fns, tokens, run(model), run


def check_peft_loaded(torch_libs, peft_model, directory, delta, key_map):
    """Every tensor of the file sits in ``peft_model``, at the scale of its jaxlora adapter."""
    _, _, hf_peft = torch_libs
    state = hf_peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    tensors = safetensors.numpy.load_file(directory / peft.WEIGHTS_NAME)
    assert sorted(state) == sorted(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)
    expected = {m: nodes(delta)[p].scale for m, (p, _) in module_names(delta, key_map).items()}
    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, hf_peft.tuners.lora.LoraLayer)
    }
    assert sorted(layers) == sorted(expected)
    for name, scale in expected.items():
        assert np.float32(layers[name].scaling["default"]) == scale, name


LLAMA_CASES = {
    "dense": jaxlora.LoraConfig(
        rank=4,
        targets=[*PROJECTIONS, "embed_tokens", "lm_head"],
        rank_pattern={"layers_1/self_attn": 2, "layers_0/mlp/down": 3},
        alpha_pattern={"layers_0/self_attn/(q|k)_proj": 3.0, "lm_head": 1.0},
    ),
    "dense_general": jaxlora.LoraConfig(
        rank=4,
        alpha=4.0,
        targets=PROJECTIONS,
        rslora=True,
        input_axes={"o_proj": 2},
        rank_pattern={"layers_1/self_attn/[kv]": 3},
        alpha_pattern={"layers_0": 2.5},
    ),
    "scanned": jaxlora.LoraConfig(
        rank=4,
        targets=PROJECTIONS,
        stacked_axes=SCANNED_AXES,
        rank_pattern={"mlp": 2},
        alpha_pattern={"self_attn/v_proj": 5.0},
    ),
}


@pytest.mark.parametrize("layout", list(LLAMA_CASES))
def test_llama_export_matches_peft(torch_libs, llama, tmp_path, layout):
    _, _, hf_peft = torch_libs
    model, layouts, fns, tokens, base_logits, run = llama
    params, config = layouts[layout], LLAMA_CASES[layout]
    delta, directory = exported(tmp_path, params, config)
    got = np.asarray(fns[layout](params, delta, tokens))
    with peft_warnings():
        peft_model = hf_peft.PeftModel.from_pretrained(copy.deepcopy(model), directory).eval()
    check_peft_loaded(torch_libs, peft_model, directory, delta, LLAMA_KEY_MAP)
    assert_adapted(got, run(peft_model), base_logits)


def test_bert_export_matches_peft(torch_libs, bert_model, tmp_path):
    _, _, hf_peft = torch_libs
    model, params, apply, run = bert_model
    config = jaxlora.LoraConfig(
        rank=4,
        alpha=6.0,
        targets=["attention", "mlp", "word_embeddings"],
        rslora=True,
        rank_pattern={"layer_1/attention/self/value": 2, "intermediate": 3},
        alpha_pattern={"layer_0/.*query": 5.0},
    )
    delta, directory = exported(tmp_path, params, config, key_map=BERT_KEY_MAP)
    assert (
        "embeddings.word_embeddings"
        in json.loads((directory / peft.CONFIG_NAME).read_text())["target_modules"]
    )
    with peft_warnings():
        peft_model = hf_peft.PeftModel.from_pretrained(copy.deepcopy(model), directory).eval()
    check_peft_loaded(torch_libs, peft_model, directory, delta, BERT_KEY_MAP)
    assert_adapted(apply(params, delta), run(peft_model), run(model))


def randomize_peft(torch, peft_model, seed):
    """Random lora_A and lora_B (PEFT starts lora_B, or lora_embedding_A, at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_llama_import_from_peft(torch_libs, llama, tmp_path):
    torch, _, hf_peft = torch_libs
    model, layouts, fns, tokens, base_logits, run = llama
    peft_config = hf_peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=[*PROJECTIONS, "embed_tokens"],
        rank_pattern={"k_proj": 2},
        alpha_pattern={"down_proj": 5},
    )
    with peft_warnings():
        peft_model = hf_peft.get_peft_model(copy.deepcopy(model), peft_config)
        randomize_peft(torch, peft_model, 0)
        peft_model.save_pretrained(tmp_path)  # also saves embed_tokens' base weight
    want = run(peft_model.eval())
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in
               safetensors.numpy.load_file(tmp_path / peft.WEIGHTS_NAME))  # fmt: skip
    delta, config = peft.load_peft(tmp_path, base=layouts["dense"], key_map=LLAMA_KEY_MAP)
    assert sorted(nodes(delta)) == sorted(
        ["embed_tokens/embedding"]
        + [f"layers_{i}/{m}/{p}/kernel" for i in range(2) for m, ps in
           (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:])) for p in ps]
    )  # fmt: skip
    assert config.rank_for("layers_1/self_attn/k_proj/kernel") == 2
    assert config.scale_for("layers_0/mlp/down_proj/kernel") == 5 / 4
    assert_adapted(np.asarray(fns["dense"](layouts["dense"], delta, tokens)), want, base_logits)
    # The same file into scanned params: one stacked adapter per projection.
    stacked, _ = peft.load_peft(tmp_path, base=layouts["scanned"], key_map=LLAMA_KEY_MAP,
        config=jaxlora.LoraConfig(stacked_axes=SCANNED_AXES),
    )  # fmt: skip
    assert stacked["layers"]["self_attn"]["k_proj"]["kernel"].a.shape == (2, LLAMA.d_model, 2)
    got = np.asarray(fns["scanned"](layouts["scanned"], stacked, tokens))
    assert_adapted(got, want, base_logits)


def test_bert_import_from_peft(torch_libs, bert_model, tmp_path):
    torch, _, hf_peft = torch_libs
    model, params, apply, run = bert_model
    peft_config = hf_peft.LoraConfig(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["query", "value", "dense"],
        rank_pattern={"intermediate.dense": 3},
        alpha_pattern={"layer.1.attention.output.dense": 2},
    )
    with peft_warnings():
        peft_model = hf_peft.get_peft_model(copy.deepcopy(model), peft_config)
        randomize_peft(torch, peft_model, 1)
        peft_model.save_pretrained(tmp_path)
    delta, config = peft.load_peft(tmp_path, base=params, key_map=BERT_KEY_MAP)
    assert len(nodes(delta)) == 2 * 5 and config.rslora
    assert config.scale_for("encoder/layer_1/attention/output/dense/kernel") == 2 / 2.0
    assert_adapted(apply(params, delta), run(peft_model.eval()), run(model))


def test_key_map_for_wrapped_bert(torch_libs, bert_model, tmp_path):
    """Bare-encoder params against ``BertForSequenceClassification``: prefix the map."""
    _, transformers, hf_peft = torch_libs
    model, params, _, _ = bert_model
    wrapped = transformers.BertForSequenceClassification(model.config).eval()
    wrapped.bert.load_state_dict(model.state_dict(), strict=False)
    config = jaxlora.LoraConfig(rank=2, targets="query")
    delta, directory = exported(tmp_path, params, config, key_map=BERT_KEY_MAP.prefixed("bert."))
    with peft_warnings():
        peft_model = hf_peft.PeftModel.from_pretrained(wrapped, directory)
    check_peft_loaded(torch_libs, peft_model, directory, delta, BERT_KEY_MAP.prefixed("bert."))
    loaded, _ = peft.load_peft(directory, base=params, key_map=BERT_KEY_MAP.prefixed("bert."))
    assert_same_delta(loaded, delta)


def test_custom_key_map_function(tmp_path):
    """A plain function works as a key map, and ``KeyMap`` can flag embeddings by hand."""
    params = {"tok": {"table": jnp.ones((10, 4))}, "proj": {"w": jnp.ones((4, 6))}}
    config = jaxlora.LoraConfig(rank=2, targets=["tok", "proj"])
    key_map = KeyMap(lambda p: p.split("/")[0], is_embedding=lambda p: p.startswith("tok"))
    delta, directory = exported(tmp_path, params, config, key_map=key_map)
    keys = sorted(safetensors.numpy.load_file(directory / peft.WEIGHTS_NAME))
    assert keys == [
        "base_model.model.proj.lora_A.weight",
        "base_model.model.proj.lora_B.weight",
        "base_model.model.tok.lora_embedding_A",
        "base_model.model.tok.lora_embedding_B",
    ]
    loaded, _ = peft.load_peft(directory, base=params, key_map=key_map)
    assert_same_delta(loaded, delta)
    with pytest.raises(ValueError, match=r"stored as an embedding adapter, but the key map says"):
        peft.load_peft(directory, base=params, key_map=lambda p: p.split("/")[0])
