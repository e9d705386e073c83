"""load_adapter on a hand-edited jaxlora_adapter.json: one damaged-checkpoint ValueError, or a load.

Every edit of the metadata either loads exactly what was saved or raises a
``ValueError`` that names the checkpoint, says it is damaged or was edited,
and names the entry or array and what was expected and found.
"""

import dataclasses
import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxlora
from jaxlora.io.checkpoint import load_adapter, save_adapter

CONFIG = jaxlora.LoraConfig(rank=2, targets="kernel")  # scale alpha / rank = 2.0


def _randomized(delta, seed=1):
    node = delta["dense"]["kernel"]
    b = jax.random.normal(jax.random.key(seed), node.b.shape, node.b.dtype)
    return {"dense": {"kernel": dataclasses.replace(node, b=b)}}


@pytest.fixture
def saved(tmp_path):
    """``(path, delta)`` of a saved LoRA adapter of one 8 x 6 kernel, ``b`` random."""
    params = {"dense": {"kernel": jnp.ones((8, 6))}}
    _, delta = jaxlora.split(params, CONFIG, key=jax.random.key(0))
    delta = _randomized(delta)
    return save_adapter(tmp_path / "adapter", delta, config=CONFIG), delta


def _edited(path, edit):
    """A copy of the checkpoint at ``path`` whose metadata went through ``edit`` (in place)."""
    copy = path.with_name("edited")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(path, copy)
    file = copy / "jaxlora_adapter.json"
    metadata = json.loads(file.read_text())
    edit(metadata)
    file.write_text(json.dumps(metadata))  # NaN stays NaN, as Python's json writes it
    return copy


def _damaged(copy, detail):
    """The ``match`` of the one error: the checkpoint, 'damaged or was edited', ``detail``."""
    return rf"^the checkpoint '{re.escape(str(copy))}' is damaged or was edited: {detail}"


def _entry(m):
    return m["adapters"][0]


def _static(name, value):
    return lambda m: _entry(m)["static"].update({name: value})


def _config(name, value):
    return lambda m: m["config"]["fields"].update({name: value})


def _drop_checksums(m):
    for spec in _entry(m)["arrays"].values():
        del spec["sha256"]


EDITS = {
    "scale 2 -> 4": (
        _static("scale", 4.0),
        r"its stored config does not make the adapter at 'dense/kernel': .*has scale 4\.0, "
        r"but config gives that path scale 2\.0",
    ),
    "scale '2'": (
        _static("scale", "2"),
        r"the static 'scale' of the adapter at 'dense/kernel' should be a finite number; "
        r"found '2'",
    ),
    "scale NaN": (
        _static("scale", math.nan),
        r"the static 'scale' of the adapter at 'dense/kernel' should be a finite number; "
        r"found nan",
    ),
    "scale true": (_static("scale", True), r"the static 'scale' .* found True"),
    "dropout edited": (
        _static("dropout", 0.25),
        r"its stored config does not make the adapter at 'dense/kernel': .*has dropout "
        r"0\.25, but config has dropout 0\.0",
    ),
    "dropout 1.5": (
        _static("dropout", 1.5),
        r"the static 'dropout' of the adapter at 'dense/kernel' should be a number in "
        r"\[0, 1\); found 1\.5",
    ),
    "dropout removed": (
        lambda m: _entry(m)["static"].pop("dropout"),
        r"the adapter at 'dense/kernel' \(kind 'lora'\) should have the static fields "
        r"\['dropout', 'layout', 'scale'\]; found \['layout', 'scale'\]",
    ),
    "layout size '8'": (
        lambda m: _entry(m)["static"]["layout"].update(inputs=["8"]),
        r"the static 'layout' of the adapter at 'dense/kernel' should be .*; found",
    ),
    "config alpha 8": (
        _config("alpha", 8.0),
        r"its stored config does not make the adapter at 'dense/kernel': .*has scale 2\.0, "
        r"but config gives that path scale 4\.0",
    ),
    "config rank 4": (
        _config("rank", 4),
        r"its stored config does not make the adapter at 'dense/kernel': .*has rank 2, but "
        r"config gives that path rank 4",
    ),
    "config rslora": (
        _config("rslora", True),
        r"its stored config does not make the adapter at 'dense/kernel': .*has scale 2\.0, "
        r"but config gives that path scale 2\.828",
    ),
    "config dtype": (
        _config("dtype", {"dtype": "bfloat16", "kind": "jax"}),
        r"its stored config does not make the adapter at 'dense/kernel': .*dtype float32, "
        r"but config\.dtype is bfloat16",
    ),
    "config use_dora": (
        _config("use_dora", True),
        r"its stored config does not make the adapter at 'dense/kernel': .*kind 'lora'\), "
        r"but config makes 'dora' adapters",
    ),
    "sha256 removed": (
        _drop_checksums,
        r"the array 'a' of the adapter at 'dense/kernel' should have its SHA-256 checksum "
        r"\('sha256', 64 hex digits: format 2 writes one for every array\); found None",
    ),
    "sha256 not hex": (
        lambda m: _entry(m)["arrays"]["b"].update(sha256="xyz"),
        r"the array 'b' of the adapter at 'dense/kernel' should have its SHA-256 .* found 'xyz'",
    ),
    "kind lora -> dora": (
        lambda m: _entry(m).update(kind="dora"),
        r"the adapter at 'dense/kernel' is a 'dora' adapter, which stores the arrays "
        r"\['a', 'b', 'm'\] and optionally the constants \['base_norm'\]; the entry has "
        r"\['a', 'b'\]",
    ),
    "kind unknown": (
        lambda m: _entry(m).update(kind="lorra"),
        r"the adapter at 'dense/kernel' has kind 'lorra': no adapter node type has kind",
    ),
    "format_version 1": (
        lambda m: m.update(format_version=1),
        r"its metadata says format version 1, but its adapter entries are not version 1's "
        r"\(KeyError: 'layout'\)",
    ),
    "format_version '2'": (
        lambda m: m.update(format_version="2"),
        r"'format_version' should be an int \(this jaxlora reads versions \[1, 2\]\); found '2'",
    ),
    "format_version true": (
        lambda m: m.update(format_version=True),
        r"'format_version' should be an int .*; found True",
    ),
    "format_version 0": (
        lambda m: m.update(format_version=0),
        r"'format_version' is 0, and jaxlora formats are versions \[1, 2\]",
    ),
    "dtype flaot": (
        lambda m: _entry(m)["arrays"]["a"].update(dtype="flaot"),
        r"the array 'a' of the adapter at 'dense/kernel' has dtype 'flaot', which is not a "
        r"dtype name",
    ),
    "shape -1": (
        lambda m: _entry(m)["arrays"]["a"].update(shape=[8, -1]),
        r"the array 'a' of the adapter at 'dense/kernel' should have a shape .*; found \[8, -1\]",
    ),
    "unknown array": (
        lambda m: _entry(m)["arrays"].update(c=_entry(m)["arrays"]["a"]),
        r"the adapter at 'dense/kernel' is a 'lora' adapter, which stores the arrays "
        r"\['a', 'b'\]; the entry has \['a', 'b', 'c'\]",
    ),
    "path disagrees with keys": (
        lambda m: _entry(m).update(path="dense/bias"),
        r"the adapter entry at 'dense/bias' should have its keys \['dense', 'kernel'\] joined "
        r"with '/' as its path",
    ),
    "entry field missing": (
        lambda m: _entry(m).pop("static"),
        r"the adapter entry at 'dense/kernel' lacks \['static'\]",
    ),
    "entry not an object": (
        lambda m: m.update(adapters=[1]),
        r"an adapter entry should be an object; found 1",
    ),
    "no entries": (
        lambda m: m.update(adapters=[]),
        r"'adapters' should be a non-empty list of entries; found \[\]",
    ),
    "duplicate entries": (
        lambda m: m["adapters"].append(dict(_entry(m))),
        r"two adapter entries have the path 'dense/kernel' or the key '0'",
    ),
    "holes not key paths": (
        lambda m: m.update(holes=[[None]]),
        r"'holes' should be a list of key paths .*; found \[\[None\]\]",
    ),
}


@pytest.mark.parametrize("edit, detail", EDITS.values(), ids=EDITS.keys())
def test_edited_metadata_is_one_damaged_error(saved, edit, detail):
    copy = _edited(saved[0], edit)
    with pytest.raises(ValueError, match=_damaged(copy, detail)):
        load_adapter(copy)


def test_edited_metadata_with_base_is_the_same_error(saved):
    """With ``base=`` (placement and the base check read the metadata first), the same error."""
    base = {"dense": {"kernel": jnp.ones((8, 6))}}
    for name in ("dtype flaot", "layout size '8'", "kind lora -> dora", "scale 2 -> 4"):
        edit, detail = EDITS[name]
        copy = _edited(saved[0], edit)
        with pytest.raises(ValueError, match=_damaged(copy, detail)):
            load_adapter(copy, base=base)


def test_unedited_round_trip(saved):
    path, delta = saved
    copy = _edited(path, lambda m: None)  # rewritten by json.dumps: still loads
    for where in (path, copy):
        loaded, config = load_adapter(where)
        assert config == CONFIG
        got, want = loaded["dense"]["kernel"], delta["dense"]["kernel"]
        assert (type(got), got.scale, got.dropout, got.layout) == (
            type(want),
            want.scale,
            want.dropout,
            want.layout,
        )
        np.testing.assert_array_equal(got.a, want.a)
        np.testing.assert_array_equal(got.b, want.b)


@pytest.mark.parametrize(
    "config",
    [
        jaxlora.LoraConfig(rank=2, targets="kernel", alpha=3.0, rslora=True, dropout=0.1),
        jaxlora.LoraConfig(
            rank=2, targets="kernel", rank_pattern={"up": 3}, alpha_pattern={"up": 5.0}
        ),
        jaxlora.LoraConfig(rank=2, targets="kernel", use_dora=True, dropout=0.05),
    ],
    ids=["rslora-dropout", "patterns", "dora"],
)
def test_round_trips_pass_the_config_check(tmp_path, config):
    """Per-path ranks and scales, rsLoRA, dropout and DoRA's constants load back exactly."""
    params = {"dense": {"kernel": jnp.ones((8, 6))}, "up": {"kernel": jnp.full((6, 4), 0.5)}}
    _, delta = jaxlora.split(params, config, key=jax.random.key(0))
    path = save_adapter(tmp_path / "adapter", delta, config=config)
    loaded, loaded_config = load_adapter(path)
    assert loaded_config == config
    assert jax.tree.structure(loaded) == jax.tree.structure(delta)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(delta), strict=True):
        np.testing.assert_array_equal(got, want)


def test_dora_constant_reference_edited(tmp_path):
    config = jaxlora.LoraConfig(rank=2, targets="kernel", use_dora=True)
    _, delta = jaxlora.split({"dense": {"kernel": jnp.ones((8, 6))}}, config, key=jax.random.key(0))
    path = save_adapter(tmp_path / "adapter", delta, config=config)
    copy = _edited(path, lambda m: _entry(m)["arrays"]["base_norm"].update(constant="0" * 64))
    with pytest.raises(
        ValueError,
        match=_damaged(
            copy,
            r"the array 'base_norm' of the adapter at 'dense/kernel' refers to the constant "
            r"'0{64}', which the checkpoint's 'constants' do not list",
        ),
    ):
        load_adapter(copy)
    copy = _edited(path, lambda m: next(iter(m["constants"].values())).update(key="../x"))
    with pytest.raises(ValueError, match=_damaged(copy, r"the constant '[0-9a-f]+' should name")):
        load_adapter(copy)


def test_save_refuses_a_node_whose_dropout_is_not_the_configs(tmp_path, saved):
    """Save checks dropout as load does, so what saves always loads."""
    node = saved[1]["dense"]["kernel"]
    delta = {"dense": {"kernel": dataclasses.replace(node, dropout=0.5)}}
    with pytest.raises(
        ValueError,
        match=r"the adapter at 'dense/kernel' has dropout 0\.5, but config has dropout 0\.0",
    ):
        save_adapter(tmp_path / "other", delta, config=CONFIG)
    assert not (tmp_path / "other").exists()


def test_format_1_checkpoint_loads(tmp_path, saved):
    """A format-1 checkpoint (LoRA only, the scale a float32 array, no checksums) still loads.

    Written here as format 1 was: alpha / rank = 16 / 3 is not a float32, so the stored
    scale array is close to, not equal to, the config's scale, which the loaded node gets.
    """
    config = jaxlora.LoraConfig(rank=3, alpha=16.0, targets="kernel", dropout=0.1)
    _, delta = jaxlora.split({"dense": {"kernel": jnp.ones((8, 6))}}, config, key=jax.random.key(0))
    delta = _randomized(delta, seed=2)
    node = delta["dense"]["kernel"]
    v2 = save_adapter(tmp_path / "v2", delta, config=config)
    stored = json.loads((v2 / "jaxlora_adapter.json").read_text())
    root = tmp_path / "v1"
    arrays = {"0": {"a": node.a, "b": node.b, "scale": np.float32(node.scale)}}
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    checkpointer.save(root / "arrays", args=ocp.args.StandardSave(arrays))
    checkpointer.close()
    layout = {"stacked": [], "inputs": [8], "outputs": [6]}
    dtypes = {"a": "float32", "b": "float32", "scale": "float32"}
    entry = {"path": "dense/kernel", "keys": ["dense", "kernel"], "key": "0", "layout": layout}
    entry.update(rank=3, dtypes=dtypes, dropout=0.1)
    config_v1 = {k: v for k, v in stored["config"].items() if k != "kind"}
    metadata = {"format": "jaxlora.adapter", "format_version": 1, "step": None}
    metadata.update(config=config_v1, adapters=[entry], holes=[])
    (root / "jaxlora_adapter.json").write_text(json.dumps(metadata))
    loaded, loaded_config = load_adapter(root)
    assert loaded_config == config
    got = loaded["dense"]["kernel"]
    assert (got.scale, got.dropout, got.rank) == (16.0 / 3, 0.1, 3)
    np.testing.assert_array_equal(got.a, node.a)
    np.testing.assert_array_equal(got.b, node.b)

    (root / "jaxlora_adapter.json").write_text(json.dumps({**metadata, "format_version": 2}))
    with pytest.raises(
        ValueError, match=_damaged(root, r"the adapter entry at 'dense/kernel' lacks")
    ):
        load_adapter(root)
