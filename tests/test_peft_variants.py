"""DoRA, VeRA and AdaLoRA PEFT files, both directions, checked against PEFT's outputs.

Each case builds the tiny BERT of ``tests/test_peft.py`` in PyTorch and in jaxlora with
identical weights, writes an adapter with random trainable values on one side, loads it
on the other, and compares the adapted models' hidden states (never just the loading).
The parameter counts are compared with PEFT's ``get_nb_trainable_parameters``.
"""

from __future__ import annotations

import copy
import json
import warnings

import jax
import numpy as np
import pytest

import jaxlora
from jaxlora.io import peft
from jaxlora.io.peft import BERT_KEY_MAP
from jaxlora.variants import AdaLoraConfig, VeraConfig
from tests.fixtures import assert_adapted, peft_warnings

TARGETS = ["query", "value", "intermediate/dense"]
PEFT_TARGETS = ["query", "value", "intermediate.dense"]


def _perturbed(delta, seed, std=0.1):
    """Every trainable array of ``delta`` moved by Gaussian noise (host numpy, then device)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jax.device_put(
            np.asarray(np.asarray(x) + std * rng.standard_normal(x.shape), x.dtype)
        ),
        delta,
    )


def _configs():
    return {
        "dora": (
            jaxlora.LoraConfig(rank=4, alpha=8, targets=TARGETS, use_dora=True),
            lambda hf: hf.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, use_dora=True),
        ),
        "dora-rslora": (
            jaxlora.LoraConfig(rank=4, alpha=6, targets=TARGETS, use_dora=True, rslora=True),
            lambda hf: hf.LoraConfig(
                r=4, lora_alpha=6, target_modules=PEFT_TARGETS, use_dora=True, use_rslora=True
            ),
        ),
        "vera": (
            VeraConfig(rank=8, targets=TARGETS, projection_key=3),
            lambda hf: hf.VeraConfig(r=8, target_modules=PEFT_TARGETS, projection_prng_key=3),
        ),
        "adalora": (
            AdaLoraConfig(init_rank=4, target_rank=2, total_step=10, alpha=8, targets=TARGETS),
            lambda hf: hf.AdaLoraConfig(
                init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=PEFT_TARGETS
            ),
        ),
    }


CASES = list(_configs())


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_export_matches_peft(torch_libs, bert_model, tmp_path, case):
    _, _, hf_peft = torch_libs
    model, params, apply, run = bert_model
    config, _ = _configs()[case]
    _, delta = jaxlora.split(params, config, key=jax.random.key(0))
    delta = _perturbed(delta, 1)
    directory = peft.save_peft(tmp_path / case, delta, config=config, key_map=BERT_KEY_MAP)
    with peft_warnings():
        peft_model = hf_peft.PeftModel.from_pretrained(copy.deepcopy(model), directory).eval()
    assert_adapted(apply(params, delta), run(peft_model), run(model))
    # the file round-trips into the same delta
    loaded, loaded_config = peft.load_peft(directory, base=params, key_map=BERT_KEY_MAP)
    assert jax.tree.structure(loaded) == jax.tree.structure(delta) or case == "vera"
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(delta), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(apply(params, loaded), apply(params, delta), rtol=1e-6, atol=1e-6)
    assert loaded_config.kind == config.kind


@pytest.mark.parametrize("case", CASES)
def test_import_from_peft(torch_libs, bert_model, tmp_path, case):
    torch, _, hf_peft = torch_libs
    model, params, apply, run = bert_model
    _, make = _configs()[case]
    with peft_warnings():
        peft_model = hf_peft.get_peft_model(copy.deepcopy(model), make(hf_peft))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:  # lora_A/B/E, magnitudes, VeRA's lambdas
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(tmp_path)
    delta, config = peft.load_peft(tmp_path, base=params, key_map=BERT_KEY_MAP)
    assert_adapted(apply(params, delta), run(peft_model.eval()), run(model))
    assert (
        jaxlora.count_parameters(params, delta).trainable
        == (peft_model.get_nb_trainable_parameters()[0])
    )
    # what was read is an artifact: it saves and loads bit for bit with its config
    path = jaxlora.save_adapter(tmp_path / "checkpoint", delta, config=config)
    again, again_config = jaxlora.load_adapter(path)
    assert again_config == config
    np.testing.assert_array_equal(apply(params, again), apply(params, delta))


def test_adalora_import_with_rank_pattern(torch_libs, bert_model, tmp_path):
    """A file PEFT wrote after pruning: kept triplets only, and masks in rank_pattern."""
    torch, _, hf_peft = torch_libs
    model, params, apply, run = bert_model
    config = hf_peft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=["query", "value"]
    )
    with peft_warnings():
        peft_model = hf_peft.get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(7)
    masks = {}
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
            if name.endswith("lora_E.default"):
                kept = [True, False, True, name.endswith("query.lora_E.default")]
                param[[not k for k in kept]] = 0.0  # what PEFT's rank allocator does
                masks[name.removeprefix("base_model.model.")] = kept
    peft_model.peft_config["default"].rank_pattern = masks
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / peft.CONFIG_NAME).read_text())
    assert saved["rank_pattern"], "PEFT should have written the masks"
    with peft_warnings(), warnings.catch_warnings():
        # PEFT reads AdaLoRA's rank_pattern LoRA-style too, and says its keys match nothing
        warnings.filterwarnings("ignore", "The following rank_pattern keys did not match")
        reloaded = hf_peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    delta, _ = peft.load_peft(tmp_path, base=params, key_map=BERT_KEY_MAP)
    node = delta["encoder"]["layer_0"]["attention"]["self"]["value"]["kernel"]
    np.testing.assert_array_equal(np.asarray(node.e) != 0, [True, False, True, False])
    assert_adapted(apply(params, delta), run(reloaded), run(model))


@pytest.mark.parametrize(
    "make",
    [
        lambda hf: hf.LoraConfig(r=8, target_modules=["query", "value"]),
        lambda hf: hf.LoraConfig(r=4, target_modules=PEFT_TARGETS, use_dora=True),
        lambda hf: hf.VeraConfig(r=16, target_modules=PEFT_TARGETS),
        lambda hf: hf.AdaLoraConfig(
            init_r=6, target_r=2, total_step=5, target_modules=PEFT_TARGETS
        ),
    ],
    ids=["lora", "dora", "vera", "adalora"],
)
def test_trainable_count_equals_peft(torch_libs, bert_model, make):
    """What a delta's leaves count is what PEFT trains (the scale is no parameter)."""
    _, _, hf_peft = torch_libs
    model, params, _, _ = bert_model
    peft_config = make(hf_peft)
    with peft_warnings():
        peft_model = hf_peft.get_peft_model(copy.deepcopy(model), peft_config)
    targets = [t.replace(".", "/") for t in peft_config.target_modules]
    config = {
        "LORA": lambda: jaxlora.LoraConfig(
            rank=peft_config.r, targets=targets, use_dora=peft_config.use_dora
        ),
        "VERA": lambda: VeraConfig(rank=peft_config.r, targets=targets),
        "ADALORA": lambda: AdaLoraConfig(init_rank=6, target_rank=2, total_step=5, targets=targets),
    }[peft_config.peft_type.value]()
    base, delta = jaxlora.split(params, config, key=jax.random.key(0))
    count = jaxlora.count_parameters(base, delta)
    assert count.trainable == peft_model.get_nb_trainable_parameters()[0]
    assert sum(x.size for x in jax.tree.leaves(delta)) == count.trainable
