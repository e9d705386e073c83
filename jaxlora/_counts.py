"""Masks, counts, sizes and a summary of a delta."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxlora import _paths
from jaxlora._checks import delta_items, describe
from jaxlora._node import AdapterNode, is_node

__all__ = ["ParameterCount", "adapter_nbytes", "count_parameters", "summary", "trainable_mask"]


def trainable_mask(tree: Any) -> Any:
    """A bool tree that is ``True`` exactly on trainable adapter leaves.

    Every array leaf of an adapter node is trainable (fixed values such as the
    scale are static metadata, not leaves), so a plain delta needs no mask:
    ``optax.adamw(...)`` applied to it trains exactly the adapters. The mask
    is for trees that hold adapters next to other arrays, such as
    ``(base, delta)`` trained together with ``optax.masked`` or
    ``optax.transforms.partition``.

    Args:
        tree: a delta, or any tree that contains adapter nodes (such as
            ``(base, delta)``); every leaf outside a node is marked ``False``.

    Returns:
        A tree of ``tree``'s structure: ``True`` on the arrays of each adapter
        node (``a`` and ``b`` for LoRA), ``False`` on every other leaf.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
        >>> base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=1, targets="dense"),
        ...                             key=jax.random.key(0))
        >>> mask = jaxlora.trainable_mask((base, delta))
        >>> mask[1]["dense"]["kernel"].a, mask[0]["dense"]["kernel"], mask[1]["dense"]["bias"]
        (True, False, None)
    """

    def one(x: Any) -> Any:
        if is_node(x):
            return jax.tree.map(lambda _: True, x)
        return False

    if not _holds_nodes(tree):
        raise ValueError(
            f"trainable_mask got a tree that holds no adapter node ({describe(tree)}): every "
            "leaf would be frozen. Pass the delta or (base, delta), from "
            "base, delta = jaxlora.split(params, config, key=key)."
        )
    return jax.tree.map(one, tree, is_leaf=is_node)


class ParameterCount(NamedTuple):
    """Trainable and total parameter counts; ``total`` includes the adapters."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        """The trainable share of ``total``, in percent."""
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.percent:.4f}"
        )


def count_parameters(base: Any, delta: Any) -> ParameterCount:
    """Counts trainable (adapter) and total (base + adapter) parameters.

    Args:
        base: the frozen tree.
        delta: its delta.

    Returns:
        A :class:`ParameterCount`; ``str()`` of it reads like PEFT's
        ``print_trainable_parameters``.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"dense": {"kernel": jnp.ones((10, 10))}}
        >>> base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="dense"),
        ...                             key=jax.random.key(0))
        >>> jaxlora.count_parameters(base, delta)
        ParameterCount(trainable=40, total=140)
    """
    if _holds_nodes(base) and not _holds_nodes(delta):
        raise ValueError(
            "count_parameters(base, delta) got a base that holds adapter nodes and a delta "
            "that holds none: the arguments are swapped. Call "
            "jaxlora.count_parameters(base, delta) with base, delta = jaxlora.split(...)."
        )
    trainable = sum(_trainable_size(n) for n in _delta_nodes(delta, "count_parameters"))
    frozen = sum(
        int(_paths.unbox(x).size)
        for _, x in _paths.leaves_with_paths(base)
        if _is_array(_paths.unbox(x))
    )
    return ParameterCount(trainable=trainable, total=frozen + trainable)


def adapter_nbytes(delta: Any) -> int:
    """The bytes of a delta's arrays: its trainable arrays and its nodes' constants.

    That is what an adapter checkpoint stores (a constant shared by several
    nodes is counted once per node here, stored once there).

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"dense": {"kernel": jnp.ones((10, 10))}}
        >>> _, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="dense"),
        ...                          key=jax.random.key(0))
        >>> jaxlora.adapter_nbytes(delta)  # a: 10 x 2 and b: 2 x 10 in float32
        160
    """
    return sum(
        int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize
        for node in _delta_nodes(delta, "adapter_nbytes")
        for x in node.arrays().values()
    )


def summary(delta: Any) -> str:
    """A readable table of the adapted paths with their shapes, ranks and scales.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"dense": {"kernel": jnp.ones((10, 6))}}
        >>> _, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="dense"),
        ...                          key=jax.random.key(0))
        >>> print(jaxlora.summary(delta))
        path          weight   rank  scale  params
        dense/kernel  (10, 6)     2   2.00      32
        1 adapted weight, 32 trainable parameters
    """
    _delta_nodes(delta, "summary")
    rows = []
    for key_path, node in jax.tree_util.tree_flatten_with_path(delta, is_leaf=is_node)[0]:
        if not is_node(node):
            continue
        rows.append(
            (
                _paths.path_str(key_path),
                str(node.layout.shape),
                str(node.rank),
                _scale_text(node),
                str(_trainable_size(node)),
            )
        )
    header = ("path", "weight", "rank", "scale", "params")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    total = sum(int(r[4]) for r in rows)
    plural = "" if len(rows) == 1 else "s"
    lines.append(f"{len(rows)} adapted weight{plural}, {total} trainable parameters")
    return "\n".join(line.rstrip() for line in lines)


def _trainable_size(node: AdapterNode) -> int:
    """The number of trainable numbers in one adapter node: the sizes of its leaves."""
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(node))


def _scale_text(node: AdapterNode) -> str:
    scales = getattr(node, "scales", None)  # stacked nodes hold one per adapter
    if scales is not None and len(set(scales)) > 1:
        return "mixed"
    return f"{float(scales[0] if scales else node.scale):.2f}"


def _nodes_of(tree: Any) -> list[AdapterNode]:
    return [x for x in jax.tree.leaves(tree, is_leaf=is_node) if is_node(x)]


def _delta_nodes(delta: Any, what: str) -> list[AdapterNode]:
    """The nodes of a delta, each checked for shapes that fit its layout."""
    nodes = []
    for path, node in delta_items(delta, what):
        if node is not None:
            node.check_shapes(path)
            nodes.append(node)
    if not nodes:
        raise ValueError(
            f"{what} got a tree that holds no adapter node ({type(delta).__name__}); pass a "
            "delta, the second output of jaxlora.split"
        )
    return nodes


def _holds_nodes(tree: Any) -> bool:
    return bool(_nodes_of(tree))


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")
