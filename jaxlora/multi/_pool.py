"""An adapter pool for serving: fixed-capacity slots, filled and cleared without recompiling.

A pool is a stacked delta (:class:`StackedNode` adapters of scale 1) with
``capacity`` slots of rank ``rank``. :func:`put` writes any additive adapter
of rank up to ``rank`` into a slot (its scale folded into its output factor,
its rank padded with zeros), :func:`clear` zeroes a slot (it then computes the
bare base model). Neither changes the pool's shapes or tree structure, so a
compiled server step (``lora_apply(fn)(base, pool, x, adapter_ids=ids)``)
keeps running on the new pool without recompiling, and the write itself is one
compiled function for every slot, rank and scale.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora._delta import LoraNode
from jaxlora._node import AdapterNode, is_delta_leaf, is_node
from jaxlora.multi._stack import check_rank, stacked_nodes, with_paths
from jaxlora.multi._stacked import StackedNode

__all__ = ["adapter_pool", "clear", "put"]


def adapter_pool(like: Any, *, capacity: int, rank: int, dtype: Any = None) -> Any:
    """An empty pool of ``capacity`` adapters of rank up to ``rank``, shaped like ``like``.

    Args:
        like: a delta from :func:`jaxlora.split` of the base to serve: the pool
            adapts the same weights, read with the same layouts.
        capacity: the number of slots, at least 1.
        rank: the largest rank a slot holds, at least 1.
        dtype: the factors' dtype (default: each of ``like``'s adapters' ``a``).

    Returns:
        A stacked delta whose every slot is empty (zero factors: the base model).

    Raises:
        TypeError: for a non-int capacity or rank, or a ``like`` that is not a delta.
        ValueError: for a capacity or rank below 1, or a ``like`` without adapters.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"w": jnp.ones((4, 3))}
        >>> _, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="w"),
        ...                          key=jax.random.key(0))
        >>> pool = jaxlora.multi.adapter_pool(delta, capacity=8, rank=4)
        >>> pool["w"].n_adapters, pool["w"].inner.a.shape
        (8, (8, 4, 4))
    """
    check_rank(capacity, "capacity")
    check_rank(rank, "rank")

    def empty(path: str, node: Any) -> Any:
        if node is None:
            return None
        if not is_node(node) or node.n_adapters is not None:
            raise TypeError(
                f"adapter_pool needs an unstacked delta from jaxlora.split; {path!r} holds "
                f"{type(node).__name__}"
            )
        a, _ = node.factors()
        layout = node.layout
        kind = dtype if dtype is not None else a.dtype
        inner = LoraNode(
            jnp.zeros((capacity, *layout.stacked, layout.n_in, rank), kind),
            jnp.zeros((capacity, *layout.stacked, rank, layout.n_out), kind),
            scale=1.0,
            layout=layout,
        )
        return StackedNode(inner)

    pairs = with_paths(like)
    if not any(node is not None for _, node in pairs):
        raise ValueError("adapter_pool needs a delta with at least one adapter")
    leaves = [empty(path, node) for path, node in pairs]
    return jax.tree.structure(like, is_leaf=is_delta_leaf).unflatten(leaves)


def put(pool: Any, slot: int, delta: Any) -> Any:
    """``pool`` with ``delta``'s adapter in ``slot`` (replacing what was there).

    The adapter's scale is folded into its output factor and its rank padded
    to the pool's, so the pool keeps its shapes: a function compiled for the
    pool runs on the new one without recompiling. Any additive adapter fits
    (LoRA, rsLoRA, PiSSA, OLoRA, VeRA and AdaLoRA, through their factors);
    DoRA rescales the weight and has no place in a pool of additive slots.

    Args:
        pool: from :func:`adapter_pool`.
        slot: the slot, in ``[0, capacity)``.
        delta: a delta of the same weights (from :func:`jaxlora.split` or
            :func:`jaxlora.load_adapter`), of ranks up to the pool's.

    Returns:
        The new pool (``pool`` itself is unchanged).

    Raises:
        ValueError: for a slot out of range, a delta of other weights or
            layouts, a rank above the pool's, or a DoRA adapter.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"w": jax.random.normal(jax.random.key(0), (4, 3))}
        >>> base, d = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="w", init="pissa"),
        ...                         key=jax.random.key(0))
        >>> pool = jaxlora.multi.put(jaxlora.multi.adapter_pool(d, capacity=4, rank=8), 2, d)
        >>> f = jaxlora.lora_apply(lambda p, x: x @ p["w"])
        >>> x = jnp.ones((2, 4))
        >>> y = f(base, pool, x, adapter_ids=jnp.array([2, -1]))
        >>> bool(jnp.allclose(y[0], f(base, d, x)[0], atol=1e-5))
        True
    """
    capacity = _capacity(pool, "put")
    _check_slot(slot, capacity)
    pool_pairs, pairs = with_paths(pool), with_paths(delta)
    adapted = {p for p, n in pool_pairs if n is not None}
    given = {p for p, n in pairs if n is not None}
    if adapted != given:
        diff = sorted(adapted ^ given)
        raise ValueError(
            f"put needs a delta of the pool's weights; {diff[0]!r} is adapted in "
            f"{'the pool' if diff[0] in adapted else 'the delta'} only"
        )
    nodes = dict(pairs)
    rows = []
    for path, slots in pool_pairs:
        rows.append(None if slots is None else _row(path, nodes[path], slots))
    rows_tree = jax.tree.structure(pool, is_leaf=is_delta_leaf).unflatten(rows)
    return _write(pool, jnp.asarray(slot, jnp.int32), rows_tree)


def clear(pool: Any, slot: int) -> Any:
    """``pool`` with ``slot`` emptied (zero factors: the bare base model).

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> _, d = jaxlora.split({"w": jnp.ones((4, 3))}, jaxlora.LoraConfig(rank=2, targets="w"),
        ...                      key=jax.random.key(0))
        >>> pool = jaxlora.multi.put(jaxlora.multi.adapter_pool(d, capacity=2, rank=2), 0, d)
        >>> float(jnp.abs(jaxlora.multi.clear(pool, 0)["w"].inner.a[0]).max())
        0.0
    """
    _check_slot(slot, _capacity(pool, "clear"))
    rows = jax.tree.map(
        lambda n: None if n is None else jax.tree.map(lambda x: jnp.zeros_like(x[0]), n.inner),
        pool,
        is_leaf=is_delta_leaf,
    )
    return _write(pool, jnp.asarray(slot, jnp.int32), rows)


def _capacity(pool: Any, what: str) -> int:
    needs = "a pool (pass a pool from jaxlora.multi.adapter_pool)"
    return stacked_nodes(pool, what, needs)[0].n_adapters


def _check_slot(slot: Any, capacity: int) -> None:
    if isinstance(slot, jax.core.Tracer):
        return
    if not isinstance(slot, numbers.Integral) or isinstance(slot, bool):
        raise TypeError(f"slot must be an int; got {slot!r} ({type(slot).__name__})")
    if not 0 <= slot < capacity:
        raise ValueError(f"slot must be in [0, {capacity}) for a pool of {capacity}; got {slot}")


def _row(path: str, node: Any, slots: StackedNode) -> LoraNode:
    """``node`` as one slot of ``slots``: scale folded, rank padded, the pool's dtype."""
    if not is_node(node) or node.n_adapters is not None:
        raise ValueError(
            f"put needs an unstacked delta; {path!r} holds {type(node).__name__} "
            "(jaxlora.multi.unstack or select picks one adapter of a stack)"
        )
    if type(node).output_scale is not AdapterNode.output_scale:
        raise ValueError(
            f"{path!r} holds a {type(node).__name__}, which rescales the whole weight (DoRA): "
            "a pool's slots are additive. Merge it for serving, or serve it unstacked."
        )
    inner = slots.inner
    if node.layout != inner.layout:
        raise ValueError(
            f"the delta reads {path!r} with layout {node.layout}, the pool with {inner.layout}"
        )
    if node.rank > inner.rank:
        raise ValueError(
            f"{path!r} has rank {node.rank}, more than the pool's rank {inner.rank}; make a "
            "pool of a larger rank"
        )
    a, b = node.factors()
    b = jnp.float32(node.scale) * b.astype(jnp.float32)
    row = LoraNode(a.astype(jnp.float32), b, scale=1.0, layout=node.layout)
    row = row.pad_rank(inner.rank) if row.rank < inner.rank else row
    return dataclasses.replace(row, a=row.a.astype(inner.a.dtype), b=row.b.astype(inner.b.dtype))


@jax.jit
def _write(pool: Any, slot: jax.Array, rows: Any) -> Any:
    def one(slots: Any, row: Any) -> Any:
        if slots is None:
            return None
        inner = jax.tree.map(lambda x, r: x.at[slot].set(r), slots.inner, row)
        return dataclasses.replace(slots, inner=inner)

    return jax.tree.map(one, pool, rows, is_leaf=is_delta_leaf)
