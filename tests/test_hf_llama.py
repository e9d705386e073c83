"""``load_hf_llama`` against ``transformers.LlamaForCausalLM`` saved by transformers itself."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxlora.models.hf import load_hf_llama
from jaxlora.models.llama import Llama, LlamaConfig
from tests.fixtures import hf_llama_config

SIZES = LlamaConfig.tiny(n_layers=3, rope_theta=50_000.0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, torch_libs):
    """Two random checkpoints: untied and sharded (an index), and tied in one file."""
    torch, transformers, _ = torch_libs
    out = {}
    for name, tied, shard in (("untied", False, "20KB"), ("tied", True, "50MB")):
        torch.manual_seed(len(name))
        model = transformers.LlamaForCausalLM(
            hf_llama_config(transformers, SIZES, tie_word_embeddings=tied)
        ).eval()
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory, max_shard_size=shard, safe_serialization=True)
        out[name] = (model, directory)
    return torch, out


@pytest.mark.parametrize("name", ["untied", "tied"])
@pytest.mark.parametrize("scan", [False, True])
def test_logits_equal_transformers(saved, name, scan):
    torch, models = saved
    model, directory = models[name]
    if name == "untied":
        assert (directory / "model.safetensors.index.json").is_file()  # really sharded
    config, params = load_hf_llama(directory, scan_layers=scan)
    assert config.tie_embeddings == (name == "tied") and config.rope_theta == 50_000.0
    tokens = np.random.default_rng(0).integers(0, SIZES.vocab_size, (2, 9))
    ours = Llama(config).apply({"params": params}, jnp.asarray(tokens))
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def _copy(directory, tmp_path, *, config=None, tensors=None):
    out = tmp_path / "copy"
    out.mkdir(parents=True)
    data = json.loads((directory / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config(data) if config else data))
    weights = safetensors.numpy.load_file(str(directory / "model.safetensors"))
    safetensors.numpy.save_file(
        tensors(weights) if tensors else weights, str(out / "model.safetensors")
    )
    return out


def test_errors(saved, tmp_path):
    _, models = saved
    _, directory = models["tied"]
    with pytest.raises(FileNotFoundError, match=r"config\.json does not exist"):
        load_hf_llama(tmp_path)
    bad = _copy(directory, tmp_path / "a", config=lambda c: {**c, "model_type": "mistral"})
    with pytest.raises(ValueError, match="describes a 'mistral' model"):
        load_hf_llama(bad)
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
    bad = _copy(directory, tmp_path / "b", config=lambda c: {**c, "rope_parameters": rope})
    with pytest.raises(ValueError, match="rope scaling 'linear'"):
        load_hf_llama(bad)
    drop = lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up_proj" not in k}
    bad = _copy(directory, tmp_path / "c", tensors=drop)
    with pytest.raises(ValueError, match=r"no tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_hf_llama(bad)
    extra = lambda t: {**t, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
    bad = _copy(directory, tmp_path / "d", tensors=extra)
    with pytest.raises(ValueError, match=r"1 tensors the reference Llama has no place for"):
        load_hf_llama(bad)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors"):
        load_hf_llama(tmp_path / "e")
