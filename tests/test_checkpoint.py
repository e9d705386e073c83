"""save_adapter / load_adapter: bit-exact round trips, steps, atomicity, shardings, errors."""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora.io.checkpoint import load_adapter, save_adapter
from tests.helpers import is_node, normal

REPO = pathlib.Path(__file__).resolve().parents[1]


class Block(nn.Module):
    """q/v DenseGeneral (8, 2, 4), an output DenseGeneral (2, 4, 8), an MLP layer."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 4), name="query")(x)
        v = nn.DenseGeneral((2, 4), name="value")(x)
        o = nn.DenseGeneral(8, axis=(-2, -1), name="out")(q * v)
        return nn.Dense(16, name="fc1")(o)


LINEN_CONFIG = jaxlora.LoraConfig(
    rank=2,
    alpha=3.0,
    targets=("query/kernel", "value/kernel", "out/kernel", "fc1/kernel"),
    rank_pattern={"value": 3, "fc1": 4},
    alpha_pattern={"fc1": 8.0},
    input_axes={"out/kernel": 2},
    dropout=0.1,
)


def ones(*shape, value=1.0):
    return jnp.asarray(np.full(shape, value, np.float32))


def randomize_b(delta, seed):
    """``delta`` with random ``b`` factors (they start at zero)."""
    leaves, treedef = jax.tree.flatten(delta, is_leaf=is_node)
    leaves = [
        dataclasses.replace(n, b=normal(n.b.shape, seed=seed + i, dtype=n.b.dtype))
        if is_node(n)
        else n
        for i, n in enumerate(leaves)
    ]
    return treedef.unflatten(leaves)


@pytest.fixture(scope="module")
def linen_setup():
    params = Block().init(jax.random.key(1), jnp.ones((1, 8)))
    base, delta = jaxlora.split(params, LINEN_CONFIG, key=jax.random.key(0))
    return base, randomize_b(delta, 2)


def nodes_by_path(delta):
    flat = jax.tree_util.tree_flatten_with_path(delta, is_leaf=is_node)[0]
    return {jaxlora._paths.path_str(p): n for p, n in flat if is_node(n)}


def assert_same(loaded, expected):
    """Same tree structure (layouts and dropout included), then the same bits in every array."""
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_linen_round_trip_with_rank_pattern(tmp_path, linen_setup):
    base, delta = linen_setup
    path = save_adapter(tmp_path / "adapter", delta, config=LINEN_CONFIG)
    assert path == tmp_path / "adapter"
    ranks = {p: n.rank for p, n in nodes_by_path(delta).items()}
    assert ranks == {
        "params/query/kernel": 2,
        "params/value/kernel": 3,
        "params/out/kernel": 2,
        "params/fc1/kernel": 4,
    }
    loaded, config = load_adapter(path)  # nested dicts, holes included
    assert_same(loaded, delta)
    assert config == LINEN_CONFIG
    with_base, _ = load_adapter(path, base=base)
    assert_same(with_base, delta)


def test_nnx_state_round_trip(tmp_path, key):
    _, state = nnx.split(nnx.Linear(6, 5, rngs=nnx.Rngs(0)))
    config = jaxlora.LoraConfig(rank=3, targets="kernel", init="kaiming")
    base, delta = jaxlora.split(state, config, key=key)
    delta = randomize_b(delta, 3)
    path = save_adapter(tmp_path / "adapter", delta, config=config)
    loaded, loaded_config = load_adapter(path, base=base)
    assert isinstance(loaded, nnx.State)
    assert_same(loaded, delta)
    assert loaded_config == config
    plain, _ = load_adapter(path)
    assert set(plain) == {"kernel", "bias"} and plain["bias"] is None
    assert_same(plain["kernel"], delta["kernel"])


def test_stacked_layouts_bfloat16_round_trip(tmp_path, key):
    bf16 = jnp.bfloat16
    params = {
        "layers": {
            "attn": {"qkv": {"kernel": normal((3, 8, 2, 4), seed=0, dtype=bf16)}},
            "o": {"kernel": normal((3, 2, 4, 8), seed=1, dtype=bf16)},
            "mlp": {"up": {"kernel": normal((3, 8, 16), seed=2, dtype=bf16)}},
        }
    }
    config = jaxlora.LoraConfig(
        rank=2,
        targets="all-linear",
        stacked_axes=1,
        input_axes={"o/kernel": 2, ".*": 1},
        dtype=jnp.bfloat16,
        rslora=True,
    )
    base, delta = jaxlora.split(params, config, key=key)
    delta = randomize_b(delta, 5)
    layouts = {p: n.layout for p, n in nodes_by_path(delta).items()}
    assert layouts["layers/o/kernel"] == jaxlora._paths.Layout((3,), (2, 4), (8,))
    assert layouts["layers/attn/qkv/kernel"] == jaxlora._paths.Layout((3,), (8,), (2, 4))
    path = save_adapter(tmp_path, delta, config=config, step=0)
    for loaded in (load_adapter(tmp_path)[0], load_adapter(path, base=base)[0]):
        assert_same(loaded, delta)
    assert load_adapter(tmp_path)[1] == config


CONFIGS = {
    "defaults": jaxlora.LoraConfig(),
    "full": jaxlora.LoraConfig(
        rank=4,
        alpha=16,
        targets=["query", r"mlp/.*/kernel"],
        exclude=(r"layers_9/",),
        dropout=0.05,
        init="kaiming",
        rslora=True,
        rank_pattern={"query": 2, "up": 3},
        alpha_pattern={"up": 0.5},
        stacked_axes={"nothing": 1},
        input_axes=1,
        dtype=jnp.bfloat16,
    ),
    "numpy-dtype": jaxlora.LoraConfig(targets="mlp", exclude="up", dtype=np.dtype("float32")),
    "numpy-type": jaxlora.LoraConfig(targets="mlp", dtype=np.float32, stacked_axes=0),
    "str-dtype": jaxlora.LoraConfig(targets="all-linear", dtype="float32", alpha=1.5),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trip(tmp_path, key, name):
    config = CONFIGS[name]
    params = {
        "layers_0": {
            "query": {"kernel": normal((8, 8), seed=0)},
            "mlp": {"up": {"kernel": ones(8, 8)}, "down": {"kernel": ones(8, 8)}},
        }
    }
    _, delta = jaxlora.split(params, config, key=key)
    _, loaded = load_adapter(save_adapter(tmp_path / name, delta, config=config))
    assert loaded == config
    for field in dataclasses.fields(config):
        assert type(getattr(loaded, field.name)) is type(getattr(config, field.name)), field.name
    assert list(loaded.rank_pattern.items()) == list(config.rank_pattern.items())  # order matters
    assert hash(loaded) == hash(config)


def test_callable_targets_come_back_as_escaped_paths(tmp_path, key):
    params = {"a.b": {"kernel": ones(4, 4)}, "c": {"kernel": ones(4, 4)}}
    config = jaxlora.LoraConfig(
        rank=1, targets=lambda path, leaf: "kernel" in path, exclude=lambda p, x: p[0] == "c"
    )
    _, delta = jaxlora.split(params, config, key=key)
    _, loaded = load_adapter(save_adapter(tmp_path / "x", delta, config=config))
    assert loaded.targets == (r"^a\.b/kernel$",) and loaded.exclude is None
    assert dataclasses.replace(loaded, targets=config.targets, exclude=config.exclude) == config
    _, again = jaxlora.split(params, loaded, key=key)  # the same weights are adapted
    assert jax.tree.structure(again) == jax.tree.structure(delta)


def small_delta(key, value):
    config = jaxlora.LoraConfig(rank=1, targets="dense")
    _, delta = jaxlora.split({"dense": {"kernel": ones(3, 2)}}, config, key=key)
    node = delta["dense"]["kernel"]
    node = dataclasses.replace(node, b=ones(*node.b.shape, value=value))
    return {"dense": {"kernel": node}}, config


def test_steps(tmp_path, key):
    for step in (1, 10, 2):  # step_10 sorts before step_2 as text
        delta, config = small_delta(key, float(step))
        assert save_adapter(tmp_path, delta, config=config, step=step) == tmp_path / f"step_{step}"
    (tmp_path / "step_11").mkdir()  # not committed: ignored by "latest"
    (tmp_path / "notes.txt").write_text("hi")
    latest, _ = load_adapter(tmp_path)
    assert float(latest["dense"]["kernel"].b[0, 0]) == 10.0
    second, _ = load_adapter(str(tmp_path), step=2)
    assert float(second["dense"]["kernel"].b[0, 0]) == 2.0
    assert float(load_adapter(tmp_path / "step_1")[0]["dense"]["kernel"].b[0, 0]) == 1.0
    with pytest.raises(FileNotFoundError, match=r"no step 3 .*committed steps: \[1, 2, 10\]"):
        load_adapter(tmp_path, step=3)
    with pytest.raises(ValueError, match=r"step_11' is not a jaxlora adapter checkpoint"):
        load_adapter(tmp_path, step=11)
    with pytest.raises(FileExistsError, match=r"step 2 exists already"):
        save_adapter(tmp_path, delta, config=config, step=2)
    with pytest.raises(ValueError, match=r"step must be >= 0"):
        save_adapter(tmp_path, delta, config=config, step=-1)
    for bad in ("3", True, 1.0):
        with pytest.raises(TypeError, match=r"step must be an int"):
            save_adapter(tmp_path, delta, config=config, step=bad)
    with pytest.raises(TypeError, match=r"step must be an int"):
        load_adapter(tmp_path, step="2")


def test_single_checkpoint_and_steps_do_not_mix(tmp_path, key):
    delta, config = small_delta(key, 1.0)
    (tmp_path / "empty").mkdir()
    path = save_adapter(tmp_path / "empty", delta, config=config)  # an empty directory is fine
    with pytest.raises(FileExistsError, match=r"exists and is not empty"):
        save_adapter(path, delta, config=config)
    with pytest.raises(ValueError, match=r"is a single checkpoint"):
        save_adapter(path, delta, config=config, step=1)
    with pytest.raises(ValueError, match=r"is a single checkpoint"):
        load_adapter(path, step=1)


def test_not_a_delta_and_config_mismatches(tmp_path, key):
    params = {"dense": {"kernel": ones(4, 3), "bias": ones(3, value=0.0)}}
    config = jaxlora.LoraConfig(rank=2, targets="dense")
    base, delta = jaxlora.split(params, config, key=key)
    with pytest.raises(TypeError, match=r"delta holds an array .* at 'dense/bias'"):
        save_adapter(tmp_path / "x", base, config=config)
    with pytest.raises(ValueError, match=r"delta holds no adapter node"):
        save_adapter(tmp_path / "x", jax.tree.map(lambda _: None, params), config=config)
    with pytest.raises(
        TypeError, match=r"config must be the adapter config the delta was made with"
    ):
        save_adapter(tmp_path / "x", delta, config={"rank": 2, "targets": "dense"})
    with pytest.raises(TypeError, match=r"a of dtype float32, but config.dtype is bfloat16"):
        save_adapter(tmp_path / "x", delta, config=dataclasses.replace(config, dtype=jnp.bfloat16))
    with pytest.raises(ValueError, match=r"has rank 2, but config gives that path rank 1"):
        save_adapter(tmp_path / "x", delta, config=dataclasses.replace(config, rank=1))
    node = delta["dense"]["kernel"]
    broken = {"dense": {"kernel": dataclasses.replace(node, a=node.a[:3])}}
    with pytest.raises(ValueError, match=r"has a of shape \(3, 2\).* need \{'a': \(4, 2\)"):
        save_adapter(tmp_path / "x", broken, config=config)
    assert not (tmp_path / "x").exists()


def test_base_mismatches(tmp_path, linen_setup):
    base, delta = linen_setup
    path = save_adapter(tmp_path / "adapter", delta, config=LINEN_CONFIG)
    wrong = jax.tree.map(lambda x: x, base)
    wrong["params"]["value"]["kernel"] = ones(8, 2, 5)
    with pytest.raises(
        ValueError,
        match=re.escape("'params/value/kernel' for a weight of shape (8, 2, 4), but base holds")
        + r" \(8, 2, 5\)",
    ):
        load_adapter(path, base=wrong)
    del wrong["params"]["value"]
    with pytest.raises(ValueError, match=r"at 'params/value/kernel' .* base has no such path"):
        load_adapter(path, base=wrong)
    with pytest.raises(TypeError, match=r"base holds an adapter node at \['params'\]"):
        load_adapter(path, base=delta)
    with pytest.raises(ValueError, match=r"shardings has no sharding .* 'params/fc1/kernel'"):
        load_adapter(path, shardings={"params": {"query": {"kernel": None}}})

    class SplitSharding:  # neither a NamedSharding nor replicated (e.g. an internal GSPMD one)
        is_fully_replicated = False

    class Weight:
        def __init__(self, shape):
            self.shape, self.sharding = shape, SplitSharding()

    odd = jax.tree.map(lambda x: Weight(x.shape), base)
    with pytest.raises(ValueError, match=r"has a SplitSharding, .* Pass shardings="):
        load_adapter(path, base=odd)


def write_metadata(path, edit):
    file = path / "jaxlora_adapter.json"
    metadata = json.loads(file.read_text())
    edit(metadata)
    file.write_text(json.dumps(metadata))


def test_directory_errors(tmp_path, key):
    delta, config = small_delta(key, 1.0)
    with pytest.raises(FileNotFoundError, match=r"no adapter checkpoint at"):
        load_adapter(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"neither jaxlora_adapter.json nor step_<n>"):
        load_adapter(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"is a file"):
        load_adapter(tmp_path / "file")
    path = save_adapter(tmp_path / "ok", delta, config=config)

    def broken(edit):
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(path, copy)
        edit(copy)
        return copy

    copy = broken(lambda c: write_metadata(c, lambda m: m.update(format_version=3)))
    with pytest.raises(
        ValueError, match=r"format version 3, and this jaxlora reads versions \[1, 2\]"
    ):
        load_adapter(copy)
    copy = broken(lambda c: write_metadata(c, lambda m: m.update(format="other")))
    with pytest.raises(ValueError, match=r"does not describe a jaxlora adapter"):
        load_adapter(copy)
    copy = broken(lambda c: (c / "jaxlora_adapter.json").write_text("{not json"))
    with pytest.raises(ValueError, match=r"cannot be read as JSON"):
        load_adapter(copy)
    copy = broken(lambda c: write_metadata(c, lambda m: m.pop("adapters")))
    with pytest.raises(ValueError, match=r"lacks \['adapters'\]; the checkpoint is damaged"):
        load_adapter(copy)
    copy = broken(lambda c: shutil.rmtree(c / "arrays"))
    with pytest.raises(ValueError, match=r"no arrays/ directory; the checkpoint is damaged"):
        load_adapter(copy)
    copy = broken(lambda c: write_metadata(c, lambda m: m["config"]["fields"].update(rank="8")))
    with pytest.raises(ValueError, match=r"config stored in .* is invalid: TypeError: rank must"):
        load_adapter(copy)
    copy = broken(lambda c: write_metadata(c, lambda m: m["config"]["fields"].update(lr=1)))
    with pytest.raises(ValueError, match=r"is invalid: ValueError: unknown fields \['lr'\]"):
        load_adapter(copy)


def test_incomplete_saves_are_refused(tmp_path, key):
    delta, config = small_delta(key, 1.0)
    done = save_adapter(tmp_path / "steps", delta, config=config, step=1)
    # An interrupted save of step 2 that got as far as its arrays: no metadata, not renamed.
    tmp = tmp_path / "steps" / "step_2.jaxlora-tmp"
    shutil.copytree(done, tmp)
    (tmp / "jaxlora_adapter.json").unlink()
    with pytest.raises(ValueError, match=r"temporary directory of a save that did not finish"):
        load_adapter(tmp)
    with pytest.raises(ValueError, match=r"step 2 .* is incomplete: its save was interrupted"):
        load_adapter(tmp_path / "steps", step=2)
    assert float(load_adapter(tmp_path / "steps")[0]["dense"]["kernel"].b[0, 0]) == 1.0
    # The same, renamed into place by hand: arrays but no metadata.
    shutil.copytree(tmp, tmp_path / "steps" / "step_3")
    with pytest.raises(ValueError, match=r"has arrays/ but no jaxlora_adapter.json: an incomplete"):
        load_adapter(tmp_path / "steps" / "step_3")
    assert load_adapter(tmp_path / "steps")[0]["dense"]["kernel"].b[0, 0] == 1.0
    # A directory of steps where nothing committed.
    shutil.rmtree(done)
    with pytest.raises(ValueError, match=r"only the temporary directories \['step_2.jaxlora-tmp"):
        load_adapter(tmp_path / "steps")
    # An interrupted single checkpoint: only its temporary sibling exists.
    shutil.copytree(tmp, tmp_path / "single.jaxlora-tmp")
    with pytest.raises(FileNotFoundError, match=r"a save that was interrupted before it completed"):
        load_adapter(tmp_path / "single")
    # The next save of the same target replaces the leftover temporary directory.
    delta, config = small_delta(key, 5.0)
    save_adapter(tmp_path / "steps", delta, config=config, step=2)
    assert not tmp.exists()
    assert load_adapter(tmp_path / "steps")[0]["dense"]["kernel"].b[0, 0] == 5.0


CHILD = """
import sys
import jax, jax.numpy as jnp
import jaxlora
from jaxlora._paths import Layout
from jaxlora.io.checkpoint import save_adapter

root, n, rank, d = sys.argv[1], 64, 64, 1024
config = jaxlora.LoraConfig(rank=rank, targets="dense")

def delta(n, value):
    out = {}
    for i in range(n):
        a = jax.random.normal(jax.random.key(i), (d, rank))
        node = jaxlora.LoraNode(a, jnp.full((rank, d), value), scale=2.0,
                                layout=Layout((), (d,), (d,)))
        out[f"layer_{i}"] = {"dense": {"kernel": node}}
    return jax.block_until_ready(out)

save_adapter(root, delta(1, 1.0), config=config, step=1)
big = delta(n, 2.0)
print("saving", flush=True)
save_adapter(root, big, config=config, step=2)
print("saved", flush=True)
"""


def _orbax_data_written(tmp):
    """Whether Orbax has begun writing array data (files under ``.../d/``) into its temp dir."""
    try:
        return any(
            f.parent.name == "d" and "orbax-checkpoint-tmp" in str(f) for f in tmp.rglob("*")
        )
    except OSError:  # a directory vanished while we walked it
        return False


@pytest.mark.parametrize(
    "kill_when",
    [
        pytest.param(lambda tmp: tmp.exists(), id="tmp-dir-created"),
        pytest.param(_orbax_data_written, id="orbax-writing"),
    ],
)
def test_killed_save_never_loads_as_complete(tmp_path, kill_when):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    root = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    child = subprocess.Popen(
        [sys.executable, str(script), str(root)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    tmp = root / "step_2.jaxlora-tmp"
    deadline = time.monotonic() + 60
    try:
        while not kill_when(tmp) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
    finally:
        out, err = child.communicate(timeout=30)
    assert b"saving" in out, err.decode()[-2000:]
    killed_mid_save = b"saved" not in out
    assert killed_mid_save == (not (root / "step_2").exists())
    delta, config = load_adapter(root)
    assert config.rank == 64
    if killed_mid_save:  # the previous complete step, never the partial one
        assert list(delta) == ["layer_0"]
        assert float(delta["layer_0"]["dense"]["kernel"].b[0, 0]) == 1.0
        with pytest.raises(ValueError, match=r"step 2 .* is incomplete"):
            load_adapter(root, step=2)
    else:  # the kill came too late: the save completed, and loads in full
        assert len(delta) == 64
        assert float(delta["layer_63"]["dense"]["kernel"].b[-1, -1]) == 2.0


def test_sharded_round_trip(tmp_path, key):
    n = jax.device_count()
    if n < 2:
        pytest.skip("needs several devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    P = jax.sharding.PartitionSpec
    x = 4 if n >= 8 else 1
    mesh = jax.sharding.Mesh(np.array(jax.devices()[: 2 * x]).reshape(x, 2), ("x", "y"))
    shard = lambda spec: jax.sharding.NamedSharding(mesh, spec)
    params = {
        "q": {"kernel": jax.device_put(normal((16, 8), seed=0), shard(P("x", "y")))},
        "o": {  # (heads, head_dim, d_model), one head per "x" device: a's input is ("x", "y")
            "kernel": jax.device_put(normal((x, 2, 16), seed=1), shard(P("x", "y")))
        },
        "o2": {  # two heads per "x" device: flattening breaks the blocks, a is replicated
            "kernel": jax.device_put(normal((2 * x, 2, 16), seed=4), shard(P("x", "y")))
        },
        "v": {  # input axes (1, 8) flatten with a size-1 unsharded axis first: still sharded
            "kernel": jax.device_put(normal((1, 8, 16), seed=2), shard(P(None, "y")))
        },
        "stacked": {  # stacked over "x"; its inputs (8, 2) with "y" on the second: replicated
            "kernel": jax.device_put(normal((4, 8, 2, 8), seed=3), shard(P("x", None, "y", None)))
        },
    }
    config = jaxlora.LoraConfig(
        rank=2,
        targets="kernel",
        input_axes={"o2?/": 2, "v/": 2, "stacked/": 2},
        stacked_axes={"stacked/": 1},
    )
    base, delta = jaxlora.split(params, config, key=key)
    delta = randomize_b(delta, 6)
    expected = {
        "q": (P("x", None), P(None, "y")),
        "o": (P(("x", "y"), None), P(None, None)),
        "o2": (P(None, None), P(None, None)),
        "v": (P("y", None), P(None, None)),
        "stacked": (P("x", None, None), P("x", None, None)),
    }
    placed = {
        name: {
            "kernel": dataclasses.replace(
                delta[name]["kernel"],
                a=jax.device_put(delta[name]["kernel"].a, shard(spec_a)),
                b=jax.device_put(delta[name]["kernel"].b, shard(spec_b)),
            )
        }
        for name, (spec_a, spec_b) in expected.items()
    }
    path = save_adapter(tmp_path / "adapter", placed, config=config)
    loaded, _ = load_adapter(path, base=base)
    assert_same(loaded, delta)
    for name, (spec_a, spec_b) in expected.items():
        node = loaded[name]["kernel"]
        assert node.a.sharding.is_equivalent_to(shard(spec_a), node.a.ndim), name
        assert node.b.sharding.is_equivalent_to(shard(spec_b), node.b.ndim), name
    # Explicit shardings win over base's: a tree like the delta, or one sharding for all.
    given = jax.tree.map(lambda x: shard(P()), delta)
    given["q"]["kernel"] = dataclasses.replace(given["q"]["kernel"], a=shard(P("y", None)))
    loaded, _ = load_adapter(path, base=base, shardings=given)
    assert_same(loaded, delta)
    assert loaded["q"]["kernel"].a.sharding.is_equivalent_to(shard(P("y", None)), 2)
    assert loaded["o"]["kernel"].a.sharding.is_fully_replicated
    loaded, _ = load_adapter(path, shardings=shard(P()))
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(loaded))
    assert len(loaded["q"]["kernel"].a.sharding.device_set) == mesh.size
    # Without base or shardings: one device.
    loaded, _ = load_adapter(path)
    assert_same(loaded, delta)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(loaded))
