"""llama.cpp LoRA adapter files, read back and applied by hand as llama.cpp applies them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.models.gguf import load_gguf_llama, rotary_rows
from jaxlora.models.gguf_lora import save_gguf_lora
from jaxlora.models.gguf_writer import save_gguf_llama
from jaxlora.models.llama import Llama, LlamaConfig
from jaxlora.variants import VeraConfig
from tests.helpers import randomize_b

gguf = pytest.importorskip("gguf")

CONFIG = LlamaConfig.tiny(n_layers=2)
TARGET_NAMES = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}  # fmt: skip


def _params(scan):
    config = dataclasses.replace(CONFIG, scan_layers=scan)
    params = Llama(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return config, params


def _tensors(path):
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape))) for t in reader.tensors}
    return reader, tensors


def _gguf_order(kernel, name, config):
    """A Flax kernel (in, out) as llama.cpp stores it: (out, in), q/k rows permuted."""
    w = np.asarray(kernel, np.float64).T
    if name in ("attn_q", "attn_k"):
        heads = config.n_heads if name == "attn_q" else config.n_kv_heads
        w = w[np.argsort(rotary_rows(w.shape[0], heads))]
    return w


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize(
    "lora_config",
    [
        jaxlora.LoraConfig(
            rank=4,
            targets="all-linear",
            rank_pattern={"mlp": 2},
            alpha_pattern={"self_attn/v_proj": 3.0},
        ),
        jaxlora.LoraConfig(rank=3, alpha=5.0, rslora=True, targets="attention"),
    ],
    ids=["patterns", "rslora"],
)
def test_adapter_applied_as_llama_cpp_does_equals_our_merge(tmp_path, key, scan, lora_config):
    config, params = _params(scan)
    if scan:
        lora_config = dataclasses.replace(lora_config, stacked_axes={"^layers/": 1})
    base_file = tmp_path / "base.gguf"
    save_gguf_llama(base_file, config, params)
    base, delta = jaxlora.split(params, lora_config, key=key)
    delta = randomize_b(delta, jax.random.fold_in(key, 1), scale=0.3)
    adapter_file = tmp_path / "adapter.gguf"
    save_gguf_lora(adapter_file, delta, config=config)
    reader, adapter = _tensors(adapter_file)
    assert str(reader.fields["general.type"].contents()) == "adapter"
    assert str(reader.fields["adapter.type"].contents()) == "lora"
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    _, base_tensors = _tensors(base_file)
    merged = jaxlora.merge(base, delta)
    checked = 0
    for i in range(config.n_layers):
        for module, name in TARGET_NAMES.items():
            group = (
                "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            )
            kernel = (merged["layers"][group][module]["kernel"][i] if scan
                      else merged[f"layers_{i}"][group][module]["kernel"])  # fmt: skip
            tensor = f"blk.{i}.{name}.weight"
            want = _gguf_order(kernel, name, config)
            if f"{tensor}.lora_a" not in adapter:
                np.testing.assert_allclose(base_tensors[tensor], want, rtol=1e-6, atol=1e-7)
                continue
            lora_a, lora_b = adapter[f"{tensor}.lora_a"], adapter[f"{tensor}.lora_b"]
            rank = lora_b.shape[1]  # llama.cpp reads the rank from lora_b
            by_hand = base_tensors[tensor] + (alpha / rank) * lora_b.astype(np.float64) @ lora_a
            np.testing.assert_allclose(by_hand, want, rtol=1e-5, atol=1e-6, err_msg=tensor)
            assert np.abs(by_hand - base_tensors[tensor]).max() > 1e-3  # the adapter is there
            checked += 1
    assert checked >= 2 * 4


def test_vera_exports_through_its_factors_and_f16(tmp_path, key):
    config, params = _params(False)
    base, delta = jaxlora.split(params, VeraConfig(rank=8, targets="q_proj"), key=key)
    delta = jax.tree.map(lambda x: x + 0.1, delta)
    save_gguf_lora(tmp_path / "v.gguf", delta, config=config, dtype="F16", alpha=8.0)
    _, adapter = _tensors(tmp_path / "v.gguf")
    a, b = adapter["blk.0.attn_q.weight.lora_a"], adapter["blk.0.attn_q.weight.lora_b"]
    assert a.dtype == np.float16
    q = lambda tree: tree["layers_0"]["self_attn"]["q_proj"]["kernel"]
    want = _gguf_order(q(jaxlora.merge(base, delta)) - q(base), "attn_q", config)
    np.testing.assert_allclose((8.0 / 8) * b.astype(np.float64) @ a, want, rtol=2e-2, atol=2e-3)


def test_loaded_base_round_trip(tmp_path, key):
    """An adapter trained on a base loaded from GGUF goes back to that file's names."""
    config, params = _params(False)
    save_gguf_llama(tmp_path / "base.gguf", config, params, format="q8_0")
    loaded_config, loaded = load_gguf_llama(tmp_path / "base.gguf")
    _, delta = jaxlora.split(loaded, jaxlora.LoraConfig(rank=2, targets="o_proj"), key=key)
    save_gguf_lora(tmp_path / "a.gguf", delta, config=loaded_config)
    _, adapter = _tensors(tmp_path / "a.gguf")
    assert sorted(adapter) == sorted(
        f"blk.{i}.attn_output.weight.lora_{x}" for i in range(2) for x in "ab"
    )


def test_errors(tmp_path, key):
    config, params = _params(False)
    _, dora = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="q_proj", use_dora=True),
                            key=key)  # fmt: skip
    with pytest.raises(TypeError, match=r"DoraNode, which llama\.cpp's LoRA adapters cannot"):
        save_gguf_lora(tmp_path / "x.gguf", dora, config=config)
    _, embed = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="embed_tokens"), key=key)
    with pytest.raises(ValueError, match=r"'embed_tokens/embedding' has no llama\.cpp tensor"):
        save_gguf_lora(tmp_path / "x.gguf", embed, config=config)
    tied = dataclasses.replace(config, tie_embeddings=False)
    _, head = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="lm_head"), key=key)
    save_gguf_lora(tmp_path / "h.gguf", head, config=tied)  # an untied head has output.weight
    with pytest.raises(ValueError, match="tied embeddings has no output weight"):
        save_gguf_lora(
            tmp_path / "x.gguf", head, config=dataclasses.replace(tied, tie_embeddings=True)
        )
    with pytest.raises(ValueError, match="dtype must be 'F32' or 'F16'"):
        save_gguf_lora(tmp_path / "x.gguf", head, config=tied, dtype="Q8_0")
