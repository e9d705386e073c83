"""Programs that ``tests/test_multihost.py`` runs in every process of a pod (and in one).

Each builds the same column/row-parallel MLP on a ``(data, model)`` mesh over
``jax.devices()`` (all processes' devices under ``jax.distributed``), so one
function runs unchanged on one process or many; return values are JSON.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora.io import peft

CONFIG = jaxlora.LoraConfig(rank=4, targets="kernel")
D_IN, D_HIDDEN, BATCH = 16, 32, 8


def _global(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array of a value every process knows (each places its own shards)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _mesh(shape: list[int]) -> jax.sharding.Mesh:
    return jax.make_mesh(tuple(shape), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def _base(shape: list[int]):
    mesh = _mesh(shape)
    rng = np.random.default_rng(0)
    up = rng.normal(size=(D_IN, D_HIDDEN)).astype(np.float32) / 4
    down = rng.normal(size=(D_HIDDEN, D_IN)).astype(np.float32) / 6
    params = {
        "up": {"kernel": _global(up, NamedSharding(mesh, P(None, "model")))},
        "down": {"kernel": _global(down, NamedSharding(mesh, P("model", None)))},
    }
    return mesh, params


def _model(params, x):
    return jax.nn.relu(x @ params["up"]["kernel"]) @ params["down"]["kernel"]


def _delta(params):
    """A non-trivial delta (b = 0 would hide errors), placed like its weights."""
    base, delta = jaxlora.split(params, CONFIG, key=jax.random.key(0))
    shardings = jaxlora.adapter_shardings(jax.tree.map(lambda w: w.sharding, base), delta)
    rng = np.random.default_rng(1)
    values = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32) / 4, delta)
    delta = jax.tree.map(lambda v, s: _global(v, s), values, shardings)
    return base, delta


def train_and_save(directory: str, mesh_shape: list[int]) -> dict:
    """Five Adam steps on a data-parallel batch; saves the adapter and a PEFT export."""
    mesh, params = _base(mesh_shape)
    base, delta = _delta(params)
    rng = np.random.default_rng(2)
    x = _global(rng.normal(size=(BATCH, D_IN)).astype(np.float32), NamedSharding(mesh, P("data")))
    y = _global(rng.normal(size=(BATCH, D_IN)).astype(np.float32), NamedSharding(mesh, P("data")))
    tx = optax.adamw(1e-2, weight_decay=0.1)
    apply = jaxlora.lora_apply(_model)

    @jax.jit
    def step(delta, state, base, x, y):  # global arrays are arguments, never closed over
        loss, grads = jax.value_and_grad(lambda d: jnp.mean((apply(base, d, x) - y) ** 2))(delta)
        updates, state = tx.update(grads, state, delta)
        return optax.apply_updates(delta, updates), state, loss

    state, losses = tx.init(delta), []
    for _ in range(5):
        delta, state, loss = step(delta, state, base, x, y)
        losses.append(float(loss))
    jaxlora.save_adapter(os.path.join(directory, "adapter"), delta, config=CONFIG)
    peft.save_peft(os.path.join(directory, "peft"), delta, config=CONFIG, key_map=lambda p: p)
    merged = jaxlora.merge(base, delta)
    gathered = multihost_utils.process_allgather(merged, tiled=True)
    return {
        "losses": losses,
        "processes": jax.process_count(),
        "merged_up": np.asarray(gathered["up"]["kernel"]).tolist(),
    }


def load(directory: str, mesh_shape: list[int]) -> dict:
    """Restores onto this mesh with the base's shardings; the values, and where they live."""
    _, params = _base(mesh_shape)
    base, _ = jaxlora.split(params, CONFIG, key=jax.random.key(0))
    delta, config = jaxlora.load_adapter(directory, base=base)
    out = {"config_rank": config.rank}
    for name in ("up", "down"):
        node = delta[name]["kernel"]
        gathered = multihost_utils.process_allgather({"a": node.a, "b": node.b}, tiled=True)
        out[name] = {k: np.asarray(v).tolist() for k, v in gathered.items()}
        out[name]["b_spec"] = str(node.b.sharding.spec)
        out[name]["b_fully_addressable"] = node.b.is_fully_addressable
    return out


def save_and_die(directory: str, mesh_shape: list[int]) -> dict:
    """Process 1 dies right after writing its arrays, before the save commits."""
    from jaxlora.io.checkpoint import _save

    _, params = _base(mesh_shape)
    _, delta = _delta(params)
    write = _save._orbax_save

    def write_then_die(path, tree):
        write(path, tree)
        if jax.process_index() == 1:
            os._exit(17)

    _save._orbax_save = write_then_die
    jaxlora.save_adapter(os.path.join(directory, "adapter"), delta, config=CONFIG)
    return {"committed": True}
