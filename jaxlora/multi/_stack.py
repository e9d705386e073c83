"""``pad_rank``, ``stack`` and ``select``: adapters of one shape, stacked, and picked again."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora import _paths
from jaxlora._checks import delta_items
from jaxlora._node import AdapterNode, is_delta_leaf, is_node
from jaxlora.multi._stacked import StackedNode

__all__ = [
    "check_rank",
    "leaf_paths",
    "node_columns",
    "pad_rank",
    "select",
    "stack",
    "with_paths",
]


def _flatten(delta: Any) -> tuple[list, Any]:
    return jax.tree.flatten(delta, is_leaf=is_delta_leaf)


def with_paths(delta: Any) -> list[tuple[str, Any]]:
    """``(path, node or None)`` for every leaf of a delta."""
    flat = jax.tree_util.tree_flatten_with_path(delta, is_leaf=is_delta_leaf)[0]
    return [(_paths.path_str(p), n) for p, n in flat]


def stacked_nodes(
    stacked: Any,
    what: str,
    needs: str = "a stacked delta from jaxlora.stack([delta_1, ..., delta_n])",
) -> list[StackedNode]:
    """The stacked nodes of ``stacked``, or a ``ValueError`` naming what it holds instead."""
    nodes = [n for _, n in with_paths(stacked) if n is not None]
    if not nodes or not all(isinstance(n, StackedNode) for n in nodes):
        kinds = sorted({type(n).__name__ for n in nodes}) or ["no adapters"]
        raise ValueError(f"{what} needs {needs}; got {', '.join(kinds)}")
    return nodes


def check_rank(rank: Any, what: str) -> None:
    """Raises unless ``rank`` is an int >= 1 (``what`` names the argument)."""
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool):
        raise TypeError(f"{what} must be an int; got {rank!r} ({type(rank).__name__})")
    if rank < 1:
        raise ValueError(f"{what} must be >= 1; got {rank}")


def pad_rank(delta: Any, rank: int, *, fold_scale: bool = True) -> Any:
    """Pads every adapter of ``delta`` to ``rank`` with zero rank components.

    The new columns of ``a`` meet zero rows of ``b``, so the padded adapter
    computes the same weight. By default each adapter's scale is also folded
    into its output-side factor (``b`` becomes ``scale · b`` and the scale 1):
    the scale is static metadata, part of a delta's tree structure, so only
    adapters of equal ranks *and* scales share a compiled function, and
    folding makes any two padded adapters of equal rank interchangeable. The
    fold rounds ``scale · b`` to ``b``'s dtype once (exact when the scale is a
    power of two, as with the default ``alpha = 2 · rank``).

    Args:
        delta: a delta from :func:`jaxlora.split` (LoRA, DoRA or AdaLoRA nodes;
            VeRA's rank is that of its shared projections and cannot change).
        rank: the target rank; at least every adapter's rank.
        fold_scale: fold scales into the factors (see above); ``False`` keeps them.

    Returns:
        The padded delta.

    Raises:
        ValueError: if an adapter's rank exceeds ``rank``, or ``rank < 1``.
        TypeError: if ``rank`` is not an int, or for a node type that cannot be padded.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> _, delta = jaxlora.split({"w": jnp.ones((4, 3))},
        ...                          jaxlora.LoraConfig(rank=1, targets="w"), key=jax.random.key(0))
        >>> padded = jaxlora.pad_rank(delta, 3)["w"]
        >>> padded.b.shape, padded.scale
        ((3, 3), 1.0)
    """
    check_rank(rank, "rank")
    out = []
    for path, node in delta_items(delta, "pad_rank"):
        if node is None:
            out.append(None)
            continue
        node.check_shapes(path)
        if node.rank > rank:
            raise ValueError(
                f"{path!r} has rank {node.rank}, more than the requested rank {rank}; "
                "pad to at least the largest rank"
            )
        try:
            padded = node.pad_rank(rank) if node.rank < rank else node
            out.append(padded.fold_scale() if fold_scale else padded)
        except TypeError as e:
            raise TypeError(f"pad_rank at {path!r}: {e}") from None
    return _flatten(delta)[1].unflatten(out)


def stack(deltas: Sequence[Any], *, fold_scales: bool = True) -> Any:
    """Stacks ``n`` deltas of one base into one with a leading adapter axis.

    Ranks are padded to the largest (exact). Use the result with
    ``lora_apply(fn)(base, stacked, x, adapter_ids=ids)``: example ``i`` of the
    batch (axis 0 of every activation that meets an adapted weight) gets
    adapter ``ids[i]``, and ``-1`` the bare base model.

    Args:
        deltas: deltas from :func:`jaxlora.split` of the same parameters, with the
            same adapted paths and, at each path, nodes of one type.
        fold_scales: fold every adapter's scale into its output-side factor (see
            :func:`pad_rank`), so that stacks of any scales share one compiled
            function. ``False`` keeps the scales as static metadata: exact, and
            each adapter's gradient is the one it gets when trained alone.

    Returns:
        A delta of :class:`StackedNode` adapters.

    Raises:
        ValueError: if no delta is given, the deltas adapt different paths or
            layouts, or two adapters at one path differ in something that cannot
            be stacked (their node type, or static metadata such as VeRA's
            projection seed or DoRA's base norms).

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"w": jax.random.normal(jax.random.key(0), (4, 3))}
        >>> config = jaxlora.LoraConfig(rank=2, targets="w", init="pissa")
        >>> base, d0 = jaxlora.split(params, config, key=jax.random.key(0))
        >>> stacked = jaxlora.stack([d0, jax.tree.map(lambda x: -x, d0)])
        >>> f = jaxlora.lora_apply(lambda p, x: x @ p["w"])
        >>> x = jnp.ones((3, 4))
        >>> y = f(base, stacked, x, adapter_ids=jnp.array([0, 1, -1]))
        >>> bool(jnp.allclose(y[0], f(base, d0, x)[0], atol=1e-5))
        True
    """
    columns, treedef = node_columns(deltas, "stack")
    rank = max(n.rank for column in columns if column for n in column)
    out = []
    for path, column in zip(leaf_paths(deltas[0]), columns, strict=True):
        if column is None:
            out.append(None)
            continue
        try:
            nodes = [n.pad_rank(rank) if n.rank < rank else n for n in column]
            if fold_scales:
                nodes = [n.fold_scale() for n in nodes]
        except TypeError as e:
            raise ValueError(f"stack at {path!r}: {e}") from None
        scales = tuple(float(n.scale) for n in nodes)
        common = scales[0] if len(set(scales)) == 1 else 1.0
        nodes = [n if n.scale == common else n.with_scale(common) for n in nodes]
        _check_stackable(path, nodes)
        inner = jax.tree.map(lambda *xs: jnp.stack(xs), *nodes)
        ranks = tuple(n.rank for n in column)
        out.append(
            StackedNode(
                inner,
                None if len(set(scales)) == 1 else scales,
                None if len(set(ranks)) == 1 and ranks[0] == rank else ranks,
            )
        )
    return treedef.unflatten(out)


def leaf_paths(delta: Any) -> list[str]:
    """The path of every leaf of a delta, holes included, in tree order."""
    return [p for p, _ in with_paths(delta)]


def node_columns(deltas: Sequence[Any], what: str) -> tuple[list[list | None], Any]:
    """Per leaf of the first delta, the nodes of every delta there (``None`` for holes)."""
    if not isinstance(deltas, Sequence) or not deltas:
        raise ValueError(f"{what} needs a non-empty list of deltas; got {deltas!r:.80}")
    structures = [jax.tree.structure(d, is_leaf=is_delta_leaf) for d in deltas]
    per_path = [dict(with_paths(d)) for d in deltas]
    first = {p for p, n in per_path[0].items() if n is not None}
    for i, (structure, nodes) in enumerate(zip(structures, per_path, strict=True)):
        for path, node in nodes.items():
            if node is not None and not is_node(node):
                raise TypeError(
                    f"deltas[{i}] holds {type(node).__name__} at {path!r}; pass deltas from "
                    "jaxlora.split"
                )
            if node is not None and node.n_adapters is not None:
                raise ValueError(
                    f"deltas[{i}] is already stacked at {path!r}; pass unstacked deltas "
                    "(jaxlora.multi.select picks one)"
                )
            if node is not None:
                node.check_shapes(f"deltas[{i}]: {path}")
        adapted = {p for p, n in nodes.items() if n is not None}
        if structure != structures[0] or adapted != first:
            diff = sorted(adapted ^ first) or ["(tree structure)"]
            raise ValueError(
                f"deltas[{i}] adapts other paths than deltas[0] (first difference: {diff[0]!r}); "
                f"{what} deltas split from the same parameters with the same targets"
            )
        for path in adapted:
            if nodes[path].layout != per_path[0][path].layout:
                raise ValueError(
                    f"deltas[{i}] and deltas[0] read {path!r} with different layouts "
                    f"({nodes[path].layout} vs {per_path[0][path].layout})"
                )
    leaves = [_flatten(d)[0] for d in deltas]
    columns = [None if col[0] is None else list(col) for col in zip(*leaves, strict=True)]
    return columns, _flatten(deltas[0])[1]


def _check_stackable(path: str, nodes: list[AdapterNode]) -> None:
    first = nodes[0]
    for i, node in enumerate(nodes[1:], start=1):
        if type(node) is not type(first):
            raise ValueError(
                f"deltas[{i}] holds a {type(node).__name__} at {path!r} and deltas[0] a "
                f"{type(first).__name__}; stacked adapters of one weight must be of one type"
            )
        if jax.tree.structure(node) == jax.tree.structure(first):
            continue
        for field in dataclasses.fields(first):  # type: ignore[arg-type]
            mine, theirs = getattr(node, field.name), getattr(first, field.name)
            if field.metadata.get("static") and mine != theirs:
                raise ValueError(
                    f"deltas[{i}] and deltas[0] hold {type(first).__name__}s at {path!r} that "
                    f"differ in their static {field.name!r} ({mine!r} vs {theirs!r}), which all "
                    f"stacked adapters share; {first.stack_hint(field.name)}"
                )
        raise ValueError(
            f"deltas[{i}] and deltas[0] hold adapters at {path!r} of different structures"
        )


def select(stacked: Any, index: int) -> Any:
    """The ``index``-th delta of a stacked delta.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> _, d = jaxlora.split({"w": jnp.ones((4, 3))},
        ...                      jaxlora.LoraConfig(rank=1, targets="w"), key=jax.random.key(0))
        >>> jaxlora.multi.select(jaxlora.stack([d, d]), 1)["w"].a.shape
        (4, 1)
    """

    def one(node: Any) -> Any:
        if node is None:
            return None
        if not is_node(node) or node.n_adapters is None:
            raise ValueError("select needs a delta from jaxlora.stack")
        if not isinstance(index, numbers.Integral) or not 0 <= index < node.n_adapters:
            raise ValueError(
                f"index must be an int in [0, {node.n_adapters}) for a stack of "
                f"{node.n_adapters} adapters; got {index!r}"
            )
        return node.select(int(index))

    return jax.tree.map(one, stacked, is_leaf=is_delta_leaf)
