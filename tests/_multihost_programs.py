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


def _checksum(tree) -> float:
    """One number for a tree of (possibly global) arrays, equal on every process."""
    leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    return float(sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in leaves))


def public_api(directory: str, mesh_shape: list[int]) -> dict:
    """Every public function on global arrays: ``{name: {"value": ...} or {"error": ...}}``.

    In a pod the arrays span both processes' devices; the test compares each
    value with the one-process run and checks each error names what to use.
    """
    import jaxlora.plan
    from jaxlora import multi, variants
    from jaxlora.models import llama
    from jaxlora.models.gguf_lora import save_gguf_lora
    from jaxlora.variants import AdaLoraConfig, VeraConfig

    mesh, params = _base(mesh_shape)
    base, delta = _delta(params)
    x = _global(np.ones((BATCH, D_IN), np.float32), NamedSharding(mesh, P("data")))
    merged = jaxlora.merge(base, delta)
    calls = {
        "split": lambda: jaxlora.split(params, CONFIG, key=jax.random.key(0))[1],
        "split_dora": lambda: jaxlora.split(
            params,
            jaxlora.LoraConfig(rank=4, targets="kernel", use_dora=True),
            key=jax.random.key(0),
        )[1],
        "split_vera": lambda: jaxlora.split(
            params, VeraConfig(rank=4, targets="kernel"), key=jax.random.key(0)
        )[1],
        "split_pissa": lambda: jaxlora.split(
            params,
            jaxlora.LoraConfig(rank=4, targets="kernel", init="pissa"),
            key=jax.random.key(0),
        ),
        "merge": lambda: merged,
        "unmerge": lambda: jaxlora.unmerge(merged, delta),
        "lora_apply eager": lambda: jaxlora.lora_apply(_model)(base, delta, x),
        "trainable_mask": lambda: float(sum(jax.tree.leaves(jaxlora.trainable_mask(delta)))),
        "count_parameters": lambda: float(jaxlora.count_parameters(base, delta).trainable),
        "summary": lambda: float(len(jaxlora.summary(delta))),
        "adapter_nbytes": lambda: float(jaxlora.adapter_nbytes(delta)),
        "adapter_shardings": lambda: float(
            len(
                jax.tree.leaves(
                    jaxlora.adapter_shardings(jax.tree.map(lambda w: w.sharding, base), delta)
                )
            )
        ),
        "quantize": lambda: jaxlora.dequantize(jaxlora.quantize(params, block_size=16)),
        "pad_rank": lambda: multi.pad_rank(delta, 8),
        "stack": lambda: multi.stack([delta, delta]),
        "unstack": lambda: multi.unstack(multi.stack([delta, delta]))[1],
        "combine cat": lambda: multi.combine_adapters([delta, delta], [1.0, 0.5]),
        "combine svd": lambda: multi.combine_adapters(
            [delta, delta], [1.0, 0.5], method="svd", rank=2
        ),
        "adapter_pool put": lambda: multi.put(
            multi.adapter_pool(delta, capacity=2, rank=4), 1, delta
        ),
        "plan": lambda: float(
            jaxlora.plan.plan(
                _model, params, CONFIG, batch=x, optimizer=optax.adam(1e-3), mesh=mesh
            ).lora.peak_bytes
            > 0
        ),
        "split placed": lambda: jax.device_put(
            jaxlora.split(params, CONFIG, key=jax.random.key(0))[1],
            jaxlora.adapter_shardings(jax.tree.map(lambda w: w.sharding, base), delta),
        ),
        "to_lora": lambda: variants.to_lora(_adalora_step(ada_base, ada_delta, ada_config, x)),
        "adalora step": lambda: _adalora_step(ada_base, ada_delta, ada_config, x),
        "allocate_ranks": lambda: float(
            sum(
                variants.allocate_ranks(
                    lambda p, xb: jnp.sum(_model(p, xb) ** 2), params, [x], CONFIG, budget=400
                ).values()
            )
        ),
        "multi-tenant steps": lambda: _tenant_steps(base, delta, mesh),
        "load_peft": lambda: jaxlora.load_peft(
            os.path.join(directory, "peft"), base=base, key_map=lambda p: p
        )[0],
        "save_adapter": lambda: float(
            jaxlora.save_adapter(os.path.join(directory, "a"), delta, config=CONFIG) is not None
        ),
    }
    ada_config = AdaLoraConfig(targets="kernel", init_rank=4, target_rank=2, total_step=4)
    ada_base, ada_delta = jax.jit(lambda p: jaxlora.split(p, ada_config, key=jax.random.key(3)))(
        params
    )
    jaxlora.save_peft(os.path.join(directory, "peft"), delta, config=CONFIG, key_map=lambda p: p)
    config = llama.LlamaConfig.tiny()
    tokens = jnp.zeros((1, 4), jnp.int32)
    llama_params = llama.Llama(config).init(jax.random.key(0), tokens)["params"]
    replicated = NamedSharding(mesh, P())
    llama_params = jax.tree.map(lambda w: _global(np.asarray(w), replicated), llama_params)
    _, llama_delta = jaxlora.split(llama_params, jaxlora.LoraConfig(rank=4), key=jax.random.key(1))
    calls["save_gguf_lora"] = lambda: float(
        save_gguf_lora(os.path.join(directory, "a.gguf"), llama_delta, config=config) is None
    )
    out = {}
    for name, call in calls.items():
        try:
            value = call()
            out[name] = {"value": value if isinstance(value, float) else _checksum(value)}
        except Exception as e:  # the test reads the type and message
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def _adalora_step(base, delta, config, x):
    """Two AdaLoRA optimizer steps (the budget schedule and masks run on global arrays)."""
    from jaxlora import variants

    tx = variants.adalora(config, optax.adam(1e-2))
    apply = jaxlora.lora_apply(_model)
    state = tx.init(delta)
    for _ in range(2):
        grads = jax.grad(lambda d: jnp.sum(apply(base, d, x) ** 2))(delta)
        updates, state = tx.update(grads, state, delta)
        delta = optax.apply_updates(delta, updates)
    return delta


def _tenant_steps(base, delta, mesh):
    """Two multi-tenant steps: each process loads its rows (and adapter ids) of the batch."""
    from jaxlora import multi

    stacked = multi.stack([delta, jax.tree.map(lambda z: z * 0.5, delta)])
    data = NamedSharding(mesh, P("data"))
    rows = np.random.default_rng(5).normal(size=(BATCH, D_IN)).astype(np.float32)
    x = jaxlora.global_batch(jaxlora.process_rows(rows), data)
    ids = jaxlora.global_batch(jaxlora.process_rows(np.arange(BATCH, dtype=np.int32) % 2), data)
    apply = jaxlora.lora_apply(_model)
    tx = multi.per_adapter(optax.adam(1e-2))

    def loss(s, base, x, ids):
        per_example = jnp.mean(apply(base, s, x, adapter_ids=ids) ** 2, axis=-1)
        return multi.per_adapter_loss(per_example, ids, 2)[0]

    grad = jax.jit(jax.grad(loss))
    state = tx.init(stacked)
    for _ in range(2):
        updates, state = tx.update(grad(stacked, base, x, ids), state, stacked)
        stacked = optax.apply_updates(stacked, updates)
    return stacked
