"""Where the planner puts abstract parameters, batches and optimizer state on a mesh."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora import _paths
from jaxlora.quant import is_quantized, quantize


def find_mesh(tree: Any) -> Mesh | None:
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
            if sharding.mesh.size > 1:
                return sharding.mesh
    return None


def replicated(mesh: Mesh | None) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def batch_sharding(x: Any, mesh: Mesh | None) -> NamedSharding | None:
    if mesh is None:
        return None
    axis = mesh.axis_names[0]
    if jnp.ndim(x) and jnp.shape(x)[0] % mesh.shape[axis] == 0:
        return NamedSharding(mesh, PartitionSpec(axis))
    return replicated(mesh)


def place(tree: Any, mesh: Mesh | None, default: Callable[[Any], Any]) -> Any:
    """``tree`` as ShapeDtypeStructs: with their own NamedSharding on ``mesh``, or ``default``."""

    def one(x: Any) -> Any:
        sharding = None
        if mesh is not None:
            own = getattr(x, "sharding", None)
            sharding = own if isinstance(own, NamedSharding) and own.mesh.size > 1 else default(x)
        return jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def like(tree: Any, reference: Any) -> Any:
    """``tree``'s shapes with ``reference``'s shardings (same structure)."""
    return jax.tree.map(
        lambda x, r: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=r.sharding), tree, reference
    )


def with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def state_like(state: Any, params: Any, mesh: Mesh | None) -> Any:
    """Optimizer state placed like the parameter each leaf mirrors (matched by key path)."""
    if mesh is None:
        return state
    by_path = {
        tuple(_paths.key_str(k) for k in path): x
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }

    def one(path: Any, x: Any) -> Any:
        keys = tuple(_paths.key_str(k) for k in path)
        for start in range(len(keys)):
            match = by_path.get(keys[start:])
            if match is not None and tuple(match.shape) == tuple(x.shape):
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=match.sharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh))

    return jax.tree_util.tree_map_with_path(one, state)


def quantized(base: Any, options: dict[str, Any], mesh: Mesh | None) -> Any:
    qbase = jax.eval_shape(lambda b: quantize(b, **options), base)
    if mesh is None:
        return qbase

    def place(q: Any, weight: Any) -> Any:
        if not is_quantized(q):
            return jax.ShapeDtypeStruct(q.shape, q.dtype, sharding=weight.sharding)
        spec = weight.sharding.spec if isinstance(weight.sharding, NamedSharding) else ()
        names = tuple(n for e in spec for n in ((e,) if isinstance(e, str) else e or ()))
        devices = math.prod(mesh.shape[n] for n in names)

        def leaf(x: Any) -> Any:
            split_ok = names and x.ndim == 1 and x.shape[0] % devices == 0
            sharding = NamedSharding(mesh, PartitionSpec(names) if split_ok else PartitionSpec())
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        return jax.tree.map(leaf, q)

    return jax.tree.map(place, qbase, base, is_leaf=is_quantized)
