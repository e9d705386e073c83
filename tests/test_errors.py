"""Bad inputs to every public function: a clear error (or warning), never a silent wrong answer.

Each case names what the message must say: the argument or path, what was expected, what
was found. Grouped by function; the corruption cases damage real checkpoints and PEFT files.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

import jaxlora
from jaxlora.io import peft
from jaxlora.variants import AdaLoraConfig, VeraConfig, adalora, loraplus, orthogonality_loss

W = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)


@pytest.fixture
def split():
    params = {"dense": {"kernel": jnp.asarray(W), "bias": jnp.zeros(6)}}
    config = jaxlora.LoraConfig(rank=2, targets="dense")
    base, delta = jaxlora.split(params, config, key=jax.random.key(0))
    return params, config, base, delta


# ------------------------------------------------------------------ LoraConfig


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(alpha=float("inf")), ValueError, r"alpha must be a finite number > 0; got inf"),
        (dict(alpha=float("nan")), ValueError, r"alpha must be a finite number > 0; got nan"),
        (dict(alpha=True), TypeError, r"alpha must be a number; got True"),
        (dict(rslora="False"), TypeError, r"rslora must be True or False; got 'False' \(str\)"),
        (dict(use_dora=1), TypeError, r"use_dora must be True or False; got 1 \(int\)"),
        (dict(dropout=True), TypeError, r"dropout must be a float in \[0, 1\); got True"),
        (dict(dropout=1.0), ValueError, r"dropout must be a float in \[0, 1\); got 1.0"),
        (dict(rank=2.0), TypeError, r"rank must be an int; got 2.0"),
        (dict(rank=True), TypeError, r"rank must be an int; got True"),
        (dict(dtype="flaot32"), TypeError, r"dtype='flaot32' is not a dtype"),
        (dict(dtype=jnp.int8), TypeError, r"dtype must be a floating dtype"),
        (dict(rank_pattern={"q": 0}), ValueError, r"rank_pattern\['q'\] must be >= 1"),
        (dict(alpha_pattern={"q": float("inf")}), ValueError, r"alpha_pattern\['q'\]"),
        (dict(rank_pattern={"(": 2}), ValueError, r"rank_pattern key='\(' is not a valid"),
        (dict(init="svd"), ValueError, r"init must be one of"),
    ],
)
def test_config_rejects(kwargs, error, message):
    with pytest.raises(error, match=message):
        jaxlora.LoraConfig(**kwargs)


def test_variant_configs_reject_non_finite_and_non_bool():
    with pytest.raises(ValueError, match="orth_reg_weight must be a finite number >= 0"):
        AdaLoraConfig(total_step=10, orth_reg_weight=float("inf"))
    with pytest.raises(TypeError, match=r"dropout must be a float in \[0, 1\)"):
        VeraConfig(dropout=False)
    with pytest.raises(ValueError, match="ratio must be a finite positive number"):
        loraplus(optax.sgd, 0.1, ratio=float("inf"))


# ------------------------------------------------------------------ split


def test_split_rejects_keys_deltas_and_tuples(split):
    params, config, base, delta = split
    with pytest.raises(TypeError, match=r"key must be a PRNG key such as jax.random.key\(0\)"):
        jaxlora.split(params, config, key=0)
    with pytest.raises(ValueError, match=r"key must be one PRNG key; got a batch of keys"):
        jaxlora.split(params, config, key=jax.random.split(jax.random.key(0), 2))
    with pytest.raises(TypeError, match=r"params holds an adapter node \(LoraNode\) at "):
        jaxlora.split(delta, config, key=jax.random.key(0))
    with pytest.raises(
        TypeError, match=r"at \[1\]\['dense'\]\['kernel'\]: it is \(or contains\) a delta"
    ):
        jaxlora.split((base, delta), config, key=jax.random.key(0))
    jaxlora.split(params, config, key=jax.random.PRNGKey(0))  # a legacy key is a key


def test_split_warns_about_patterns_that_match_nothing(split):
    params, _, _, _ = split
    config = jaxlora.LoraConfig(rank=2, targets="dense", rank_pattern={"dnese": 1})
    with pytest.warns(UserWarning, match=r"rank_pattern key 'dnese' matches none of the 1 adapted "
                      r"paths.*close to it: \['dense/kernel'\]"):  # fmt: skip
        jaxlora.split(params, config, key=jax.random.key(0))
    config = jaxlora.LoraConfig(rank=2, targets="dense", alpha_pattern={"^dense/kernel$": 4.0})
    jaxlora.split(params, config, key=jax.random.key(0))  # matches: no warning (errors would fail)


# ------------------------------------------------------------------ merge / lora_apply


def test_merge_says_what_is_wrong_with_its_arguments(split):
    _, _, base, delta = split
    with pytest.raises(ValueError, match=r"delta holds no adapter node \(got None\)"):
        jaxlora.merge(base, None)
    with pytest.raises(ValueError, match=r"base and delta are swapped"):
        jaxlora.merge(delta, base)
    with pytest.raises(ValueError, match=r"delta holds no adapter node \(got a tree of 2 leaves"):
        jaxlora.unmerge(base, base)
    node = delta["dense"]["kernel"]
    ragged = {"dense": {"kernel": dataclasses.replace(node, b=jnp.ones((3, 6))), "bias": None}}
    with pytest.raises(ValueError, match=r"LoraNode at 'dense/kernel' has b of shape \(3, 6\).*"
                       r"rank 2 need \{'a': \(8, 2\), 'b': \(2, 6\)\}"):  # fmt: skip
        jaxlora.merge(base, ragged)


def test_lora_apply_rejects_bad_keys_ids_and_functions_that_ignore_params(split):
    params, _, base, delta = split
    x = jnp.ones((3, 8))
    f = jaxlora.lora_apply(lambda p, x: x @ p["dense"]["kernel"])
    with pytest.raises(TypeError, match="dropout_key must be a PRNG key"):
        f(base, delta, x, dropout_key=jnp.ones(2))
    with pytest.raises(ValueError, match="dropout_key must be one PRNG key"):
        f(base, delta, x, dropout_key=jax.random.split(jax.random.key(0), 3))
    with pytest.raises(ValueError, match=r"base and delta are swapped"):
        f(delta, base, x)
    captured = jaxlora.lora_apply(lambda p, x: x @ params["dense"]["kernel"])
    with pytest.raises(ValueError, match=r"never reads an adapted weight .* \['dense/kernel'\]"):
        captured(base, delta, x)
    stacked = jaxlora.stack([delta, delta])
    for bad in (2, 5, -2):
        ids = jnp.array([0, bad, -1])
        with pytest.raises(ValueError, match=rf"adapter_ids\[1\] = {bad} is out of range: the "
                           r"delta stacks 2 adapters"):  # fmt: skip
            f(base, stacked, x, adapter_ids=ids)
    # traced ids cannot be checked: the bad example becomes NaN, the others stay right
    out = jax.jit(lambda ids: f(base, stacked, x, adapter_ids=ids))(jnp.array([0, 5, -1]))
    out = np.asarray(out)
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    np.testing.assert_allclose(out[2], x[2] @ W, rtol=1e-6)


# ------------------------------------------------------------------ counts, many adapters


def test_counts_and_many_adapter_tools(split):
    _, _, base, delta = split
    for fn in (jaxlora.summary, jaxlora.adapter_nbytes, jaxlora.count_parameters):
        args = (base,) if fn is not jaxlora.count_parameters else (base, base)
        with pytest.raises(
            TypeError,
            match=r"delta holds an array .* at 'dense/bias'.*was base passed in the delta",
        ):
            fn(*args)
    for fn, args in ((jaxlora.summary, (None,)), (jaxlora.count_parameters, (base, None))):
        with pytest.raises(ValueError, match="holds no adapter node"):
            fn(*args)
    with pytest.raises(ValueError, match="trainable_mask got a tree that holds no adapter node"):
        jaxlora.trainable_mask(3)
    with pytest.raises(TypeError, match="lora_apply wraps a function"):
        jaxlora.lora_apply(3)
    with pytest.raises(ValueError, match="arguments are swapped"):
        jaxlora.count_parameters(delta, base)
    with pytest.raises(TypeError, match=r"rank must be an int; got 2.0"):
        jaxlora.pad_rank(delta, 2.0)
    with pytest.raises(ValueError, match="has rank 2, more than the requested rank 1"):
        jaxlora.pad_rank(delta, 1)
    for rank, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError)):
        with pytest.raises(error, match="rank must be"):
            jaxlora.combine_adapters([delta, delta], [1.0, 1.0], method="svd", rank=rank)
    with pytest.raises(ValueError, match="non-empty list of deltas"):
        jaxlora.stack([])
    with pytest.raises(ValueError, match=r"index must be an int in \[0, 2\)"):
        jaxlora.multi.select(jaxlora.stack([delta, delta]), 2)


# ------------------------------------------------------------------ checkpoints


def test_save_adapter_refuses_a_config_that_disagrees_with_the_arrays(tmp_path, split):
    _, config, _, delta = split
    for change, message in (
        (dict(alpha=8.0), r"has scale 2.0, but config gives that path scale 4.0"),
        (dict(rank=4), r"has rank 2, but config gives that path rank 4"),
        (dict(use_dora=True), r"is a LoraNode \(kind 'lora'\), but config makes 'dora'"),
        (dict(targets="nothing"), r"adapts 'dense/kernel', but config's targets='nothing'"),
        (dict(exclude="dense"), r"targets='dense' \(exclude='dense'\) leave that path out"),
    ):
        wrong = dataclasses.replace(config, **change)
        with pytest.raises(ValueError, match=message):
            jaxlora.save_adapter(tmp_path / "x", delta, config=wrong)
    assert not (tmp_path / "x").exists()


def _saved(tmp_path, split):
    _, config, _, delta = split
    delta = jax.tree.map(lambda a: a + 1.0, delta)
    return delta, jaxlora.save_adapter(tmp_path / "adapter", delta, config=config)


def _damaged(path: pathlib.Path, tmp_path, edit) -> pathlib.Path:
    copy = tmp_path / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(path, copy)
    edit(copy)
    return copy


@pytest.fixture
def orbax_leftovers():
    """Collect, inside the test, the read coroutines Orbax abandons when a data file fails.

    When a data file fails to decode, Orbax leaves its other read coroutines unawaited; that is
    Orbax's cleanup, not ours. Collected later, they would raise an unraisable warning inside
    whichever test runs next on the worker, so collect them here where the warning is ignored.
    """
    yield
    gc.collect()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.usefixtures("orbax_leftovers")
def test_every_damaged_checkpoint_file_is_refused_or_unused(tmp_path, split):
    """Flip a byte in, truncate, or delete each file: it loads right or fails naming the path."""
    delta, path = _saved(tmp_path, split)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        for how in ("flip", "truncate", "delete"):

            def edit(copy, rel=rel, how=how):
                target = copy / rel
                data = bytearray(target.read_bytes())
                if how == "delete":
                    target.unlink()
                    return
                if how == "flip":
                    data[len(data) // 2] ^= 0x10
                else:
                    data = data[: len(data) // 2]
                target.write_bytes(bytes(data))

            copy = _damaged(path, tmp_path, edit)
            try:
                loaded, _ = jaxlora.load_adapter(copy)
            except (ValueError, FileNotFoundError) as e:
                assert str(copy) in str(e), (rel, how, e)
                assert "damaged" in str(e) or "not a jaxlora adapter" in str(e), (rel, how, e)
                continue
            for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(delta), strict=True):
                np.testing.assert_array_equal(got, want, err_msg=f"{rel} {how} loaded wrong data")


def _edit_json(copy, change):
    file = copy / "jaxlora_adapter.json"
    metadata = json.loads(file.read_text())
    change(metadata)
    file.write_text(json.dumps(metadata))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # as above
@pytest.mark.usefixtures("orbax_leftovers")
def test_checksums_and_edited_metadata(tmp_path, split):
    _, path = _saved(tmp_path, split)

    def wrong_sum(m):
        m["adapters"][0]["arrays"]["a"]["sha256"] = "0" * 64

    copy = _damaged(path, tmp_path, lambda c: _edit_json(c, wrong_sum))
    with pytest.raises(ValueError, match=rf"checkpoint '{copy}' is damaged: the array 'a' of the "
                       r"adapter at 'dense/kernel' does not match the checksum"):  # fmt: skip
        jaxlora.load_adapter(copy)

    def other_rank(m):
        m["adapters"][0]["arrays"]["a"]["shape"] = [8, 3]

    copy = _damaged(path, tmp_path, lambda c: _edit_json(c, other_rank))
    with pytest.raises(ValueError, match=rf"'{copy}' is damaged"):
        jaxlora.load_adapter(copy)

    def other_layout(m):
        m["adapters"][0]["static"]["layout"]["inputs"] = [4]

    copy = _damaged(path, tmp_path, lambda c: _edit_json(c, other_layout))
    with pytest.raises(ValueError, match=rf"'{copy}' is damaged or was edited: the adapter at "):
        jaxlora.load_adapter(copy)


# ------------------------------------------------------------------ PEFT files


@pytest.fixture
def peft_file(tmp_path):
    params = {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.asarray(W)}}}}
    config = jaxlora.LoraConfig(rank=2, targets="q_proj")
    base, delta = jaxlora.split(params, config, key=jax.random.key(0))
    directory = jaxlora.save_peft(
        tmp_path / "src", delta, config=config, key_map=peft.LLAMA_KEY_MAP
    )
    return base, directory


def _settings(change):
    def edit(directory):
        file = directory / peft.CONFIG_NAME
        settings = json.loads(file.read_text())
        change(settings)
        file.write_text(json.dumps(settings))

    return edit


def _tensors(change):
    def edit(directory):
        file = directory / peft.WEIGHTS_NAME
        tensors = safetensors.numpy.load_file(str(file))
        change(tensors)
        safetensors.numpy.save_file(tensors, str(file))

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_settings(lambda s: s.update(r="2")), r"has r='2'; it must be a positive int"),
        (_settings(lambda s: s.update(lora_alpha="4")), r"lora_alpha='4'; it must be a finite"),
        (_settings(lambda s: s.update(use_rslora="true")), r"use_rslora='true'; it must be a bool"),
        (_settings(lambda s: s.update(rank_pattern=[1])), r"rank_pattern=\[1\]; it must be a JSON"),
        (_settings(lambda s: s.update(rank_pattern={"(": 2})), r"rank_pattern key '\(', which is"),
        (_settings(lambda s: s.update(target_modules=3)), r"target_modules=3; PEFT expects"),
        (_settings(lambda s: s.update(lora_dropout="x")), r"lora_dropout='x'; it must be a number"),
        (_settings(lambda s: s.update(bias="all")), r"bias='all': the adapter also trained bias"),
        (_settings(lambda s: s.update(fan_in_fan_out="no")), r"fan_in_fan_out='no'; PEFT writes"),
        (_settings(lambda s: s.update(layers_to_transform=["0"])), r"layers_to_transform=\['0'\]"),
        (
            _tensors(lambda t: next(iter(t.values())).__setitem__((0, 0), np.nan)),
            r"with 1 non-finite values \(NaN or infinite\) of",
        ),
        (lambda d: (d / peft.CONFIG_NAME).write_text("{x"), r"is not valid JSON"),
        (lambda d: (d / peft.CONFIG_NAME).write_text("[1]"), r"does not hold a JSON object"),
        (
            _tensors(lambda t: t.update({k: v.astype(np.int32) for k, v in t.items()})),
            r"of dtype int32; adapter tensors are floating point",
        ),
        (
            lambda d: (d / peft.WEIGHTS_NAME).write_bytes(
                (d / peft.WEIGHTS_NAME).read_bytes()[:90]
            ),
            r"cannot be read as safetensors .* truncated or damaged",
        ),
    ],
)
def test_damaged_peft_files(tmp_path, peft_file, edit, message):
    base, directory = peft_file
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    edit(copy)
    with pytest.raises(ValueError, match=message):
        jaxlora.load_peft(copy, base=base, key_map=peft.LLAMA_KEY_MAP)


# ------------------------------------------------------------------ quantization, variants


def test_quantize_and_variant_helpers():
    with pytest.raises(ValueError, match="nonfinite must be 'raise' or 'zero'"):
        jaxlora.quantize({"w": jnp.ones((8, 8))}, block_size=64, nonfinite="keep")
    with pytest.raises(ValueError, match="holds no AdaLoraNode"):
        orthogonality_loss({"w": None})
    with pytest.raises(TypeError, match="config must be an AdaLoraConfig"):
        adalora(jaxlora.LoraConfig(), optax.sgd(0.1))


@pytest.mark.parametrize("dtype", ["flaot", jnp.int32, "nonsense dtype"])
def test_dequantize_with_a_dtype_that_is_not_floating(dtype):
    q = jaxlora.quantize({"w": jnp.ones((4, 64))})
    with pytest.raises(TypeError, match=r"dequantize needs a floating dtype .* got"):
        jaxlora.dequantize(q, dtype)
    with pytest.raises(TypeError, match=r"dequantize needs a floating dtype"):
        q["w"].dequantize(dtype)
    assert jaxlora.dequantize(q, "bfloat16")["w"].dtype == jnp.bfloat16  # names still work


# ------------------------------------------------------------------ booleans, misplaced deltas


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda p, b, d: jaxlora.quantize(p, double_quant="False"), "double_quant"),
        (lambda p, b, d: jaxlora.merge(b, d, requantize="False"), "requantize"),
        (lambda p, b, d: jaxlora.lora_apply(lambda q, x: x, strict="False"), "strict"),
    ],
)
def test_booleans_are_not_truthy_strings(split, call, name):
    _, _, base, delta = split
    with pytest.raises(TypeError, match=rf"{name} must be True or False; got 'False' \(str\)"):
        call({"w": jnp.ones((8, 64))}, base, delta)


def test_numpy_booleans_are_booleans():
    assert jaxlora.LoraConfig(rslora=np.True_).rslora


def test_quantize_refuses_a_delta(split):
    _, _, base, delta = split
    for tree, where in ((delta, "'dense/kernel'"), ((base, delta), "'1/dense/kernel'")):
        with pytest.raises(
            TypeError, match=rf"adapter node \(LoraNode\) at {where}.*Quantize the base"
        ):
            jaxlora.quantize(tree)


def test_merge_with_no_base(split):
    _, _, _, delta = split
    with pytest.raises(ValueError, match=r"base is None; pass the first output of jaxlora\.split"):
        jaxlora.merge(None, delta)


def _ragged(delta):
    node = delta["dense"]["kernel"]
    return {"dense": {"kernel": dataclasses.replace(node, b=jnp.ones((3, 6))), "bias": None}}


def test_nodes_with_factors_of_different_ranks_are_refused_everywhere(split):
    _, _, base, delta = split
    ragged = _ragged(delta)
    calls = {
        "count_parameters": lambda: jaxlora.count_parameters(base, ragged),
        "summary": lambda: jaxlora.summary(ragged),
        "adapter_nbytes": lambda: jaxlora.adapter_nbytes(ragged),
        "pad_rank": lambda: jaxlora.pad_rank(ragged, 4),
        "stack": lambda: jaxlora.stack([delta, ragged]),
        "combine svd": lambda: jaxlora.combine_adapters(
            [ragged, delta], [1, 1], method="svd", rank=2
        ),
        "combine cat": lambda: jaxlora.combine_adapters([delta, ragged], [1, 1]),
    }
    for call in calls.values():
        with pytest.raises(
            ValueError, match=r"'(deltas\[\d\]: )?dense/kernel' has b of shape \(3, 6\)"
        ):
            call()


@pytest.mark.parametrize(
    ("weight", "error", "message"),
    [
        (float("nan"), ValueError, r"weights\[1\] must be finite; got nan"),
        (float("inf"), ValueError, r"weights\[1\] must be finite; got inf"),
        ("2", TypeError, r"weights\[1\] must be a number; got '2'"),
        (True, TypeError, r"weights\[1\] must be a number; got True"),
    ],
)
def test_combine_weights_are_finite_numbers(split, weight, error, message):
    _, _, _, delta = split
    with pytest.raises(error, match=message):
        jaxlora.combine_adapters([delta, delta], [1.0, weight])
    both = jaxlora.combine_adapters([delta, delta], [1.0, jnp.float32(0.5)])  # 0-d arrays work
    assert both["dense"]["kernel"].rank == 4


def test_adapter_shardings_says_which_argument_is_wrong(split):
    _, _, base, delta = split
    shardings = jax.tree.map(lambda w: w.sharding, base)
    with pytest.raises(
        TypeError, match="base_shardings holds adapter nodes; the arguments look swapped"
    ):
        jaxlora.adapter_shardings(delta, shardings)
    with pytest.raises(TypeError, match="base_shardings is None"):
        jaxlora.adapter_shardings(None, delta)


def test_load_peft_says_when_base_is_not_a_base(peft_file, split):
    _, directory = peft_file
    _, _, _, delta = split
    for wrong, what in ((None, "None"), (delta, r"a tree that holds adapter nodes \(a delta\?\)")):
        with pytest.raises(TypeError, match=rf"load_peft: base is {what}; pass the frozen"):
            jaxlora.load_peft(directory, base=wrong, key_map=peft.LLAMA_KEY_MAP)


def test_a_scanned_stack_without_stacked_axes_is_explained():
    """The errors say what the user missed: stacked_axes, and a bias matched by its module."""
    params = {"layers": {"up_proj": {"kernel": jnp.ones((3, 8, 16)), "bias": jnp.ones((3, 16))}}}
    with pytest.raises(
        ValueError, match=r"'layers/up_proj/bias' looks like a bias .* stacked_axes=1"
    ):
        jaxlora.split(params, jaxlora.LoraConfig(rank=4, targets="up_proj"), key=jax.random.key(0))
    kernel = jaxlora.LoraConfig(rank=4, targets="up_proj/kernel")
    with pytest.raises(ValueError, match=r"axis 0 stacks layers .* pass stacked_axes=1"):
        jaxlora.split(params, kernel, key=jax.random.key(0))
    fixed = jaxlora.LoraConfig(rank=4, targets="up_proj/kernel", stacked_axes=1)
    _, delta = jaxlora.split(params, fixed, key=jax.random.key(0))
    assert delta["layers"]["up_proj"]["kernel"].a.shape == (3, 8, 4)
    assert delta["layers"]["up_proj"]["bias"] is None


def test_global_batch_and_process_rows_say_what_is_wrong():
    with pytest.raises(TypeError, match=r"global_batch: sharding must be a jax.sharding.Sharding"):
        jaxlora.global_batch(np.ones((8, 3)), "data")
    with pytest.raises(ValueError, match=r"process_rows: a batch of None rows does not divide"):
        jaxlora.process_rows(np.float32(1.0))  # no batch axis


def test_load_keeps_adapters_whose_stored_targets_no_longer_select_them(tmp_path, split):
    """A preset's definition may change between versions: the stored adapters stay valid."""
    _, config, _, delta = split
    path = jaxlora.save_adapter(tmp_path / "a", delta, config=config)
    _edit_json(path, lambda m: m["config"]["fields"].update(targets="another_preset_name"))
    restored, restored_config = jaxlora.load_adapter(path)
    assert restored_config.targets == "another_preset_name"
    np.testing.assert_array_equal(restored["dense"]["kernel"].a, delta["dense"]["kernel"].a)
