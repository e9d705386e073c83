"""Many adapters on one base: padding, stacking, per-example routing and combining.

* :func:`pad_rank` pads a delta's adapters with zero rank components. The
  padded adapter computes exactly the same weights, and adapters of equal
  shapes swap into a compiled function without recompiling (scales are array
  leaves too).
* :func:`stack` turns ``n`` deltas into one whose adapters carry a leading
  adapter axis; ``lora_apply(fn)(base, stacked, x, adapter_ids=ids)`` then gives
  example ``i`` of the batch adapter ``ids[i]`` (``-1``: the bare base model),
  in one pass with gathered low-rank factors.
* :func:`combine_adapters` merges several adapters into one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora import _paths
from jaxlora._delta import AdapterNode, LoraNode, is_delta_leaf, is_node


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedLoraNode(AdapterNode):
    """``n`` LoRA adapters of one weight, stacked along a leading adapter axis.

    Attributes:
        a: ``(n, *stacked, n_in, rank)``.
        b: ``(n, *stacked, rank, n_out)``.
        scale: ``(n,)`` float32.
        layout: the base weight's layout (static).
        dropout: the dropout rate (static).

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"w": jnp.ones((4, 3))}
        >>> deltas = [jaxlora.split(params, jaxlora.LoraConfig(rank=r, targets="w"),
        ...                         key=jax.random.key(r))[1] for r in (1, 2)]
        >>> jaxlora.stack(deltas)["w"].a.shape
        (2, 4, 2)
    """

    a: jax.Array
    b: jax.Array
    scale: jax.Array
    layout: _paths.Layout = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def n_adapters(self) -> int:
        """How many adapters are stacked."""
        return self.a.shape[0]

    def select(self, index: int) -> LoraNode:
        """The ``index``-th adapter as a plain :class:`LoraNode`."""
        return LoraNode(
            self.a[index],
            self.b[index],
            self.scale[index],
            layout=self.layout,
            dropout=self.dropout,
        )

    def per_example(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Factors for a batch: example ``i`` gets adapter ``ids[i]``, none where ``ids[i] < 0``.

        Returns ``(a, b)`` of shapes ``(batch, *stacked, n_in, r)`` and
        ``(batch, *stacked, r, n_out)``, the (frozen) scale folded into ``a``.
        """
        safe = jnp.clip(ids, 0, self.n_adapters - 1)
        scale = jnp.where(ids >= 0, jax.lax.stop_gradient(self.scale)[safe], 0.0)
        a = self.a[safe]
        a = a * scale.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype)
        return a, self.b[safe]

    def factors(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        raise ValueError(
            "a stacked delta holds several adapters: pass adapter_ids= to the function from "
            "jaxlora.lora_apply, or pick one with jaxlora.multi.select(stacked, i)"
        )

    def trainable_mask(self) -> StackedLoraNode:
        return dataclasses.replace(self, a=True, b=True, scale=False)  # type: ignore[arg-type]


def _nodes(delta: Any) -> tuple[list, Any]:
    return jax.tree.flatten(delta, is_leaf=is_delta_leaf)


def pad_rank(delta: Any, rank: int) -> Any:
    """Pads every LoRA adapter of ``delta`` to ``rank`` with zero rank components.

    The padded delta computes the same weights exactly (the new columns of
    ``a`` meet zero rows of ``b``), so adapters padded to equal ranks swap into
    a jitted function without recompiling.

    Args:
        delta: a delta of :class:`LoraNode` adapters.
        rank: the target rank; at least every adapter's rank.

    Returns:
        The padded delta.

    Raises:
        ValueError: if an adapter's rank exceeds ``rank``.
        TypeError: for adapters other than plain LoRA.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> _, delta = jaxlora.split({"w": jnp.ones((4, 3))},
        ...                          jaxlora.LoraConfig(rank=1, targets="w"), key=jax.random.key(0))
        >>> jaxlora.pad_rank(delta, 3)["w"].b.shape
        (3, 3)
    """
    _, treedef = _nodes(delta)
    out = []
    for path, node in _with_paths(delta):
        if node is None:
            out.append(None)
            continue
        if type(node) is not LoraNode:
            raise TypeError(f"pad_rank pads LoRA adapters; {path!r} holds {type(node).__name__}")
        if node.rank > rank:
            raise ValueError(
                f"{path!r} has rank {node.rank}, more than the requested rank {rank}; "
                "pad to at least the largest rank"
            )
        extra = rank - node.rank
        a = jnp.pad(node.a, [(0, 0)] * (node.a.ndim - 1) + [(0, extra)])
        b = jnp.pad(node.b, [(0, 0)] * (node.b.ndim - 2) + [(0, extra), (0, 0)])
        out.append(dataclasses.replace(node, a=a, b=b))
    return treedef.unflatten(out)


def stack(deltas: Sequence[Any]) -> Any:
    """Stacks ``n`` deltas of one base into one with a leading adapter axis.

    Ranks are padded to the largest (exact). Use the result with
    ``lora_apply(fn)(base, stacked, x, adapter_ids=ids)``: example ``i`` of the
    batch (axis 0 of every activation that meets an adapted weight) gets
    adapter ``ids[i]``, and ``-1`` the bare base model.

    Args:
        deltas: deltas from :func:`jaxlora.split` of the same parameters, with the
            same adapted paths.

    Returns:
        A delta of :class:`StackedLoraNode` adapters.

    Raises:
        ValueError: if the deltas adapt different paths or layouts, or none are given.

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
    if not deltas:
        raise ValueError("stack needs at least one delta")
    structures = [jax.tree.structure(d, is_leaf=is_delta_leaf) for d in deltas]
    per_path = [dict(_with_paths(d)) for d in deltas]
    for i, (structure, nodes) in enumerate(zip(structures, per_path, strict=True)):
        adapted = {p for p, n in nodes.items() if n is not None}
        first = {p for p, n in per_path[0].items() if n is not None}
        if structure != structures[0] or adapted != first:
            diff = sorted(adapted ^ first) or ["(tree structure)"]
            raise ValueError(
                f"deltas[{i}] adapts other paths than deltas[0] (first difference: {diff[0]!r}); "
                "stack deltas split from the same parameters with the same targets"
            )
        for path in adapted:
            if nodes[path].layout != per_path[0][path].layout:
                raise ValueError(
                    f"deltas[{i}] and deltas[0] read {path!r} with different layouts "
                    f"({nodes[path].layout} vs {per_path[0][path].layout})"
                )
    rank = max(n.rank for nodes in per_path for n in nodes.values() if n is not None)
    padded = [pad_rank(d, rank) for d in deltas]
    leaves = [_nodes(d)[0] for d in padded]
    treedef = _nodes(padded[0])[1]
    out = []
    for column in zip(*leaves, strict=True):
        if column[0] is None:
            out.append(None)
            continue
        out.append(
            StackedLoraNode(
                jnp.stack([n.a for n in column]),
                jnp.stack([n.b for n in column]),
                jnp.stack([jnp.asarray(n.scale, jnp.float32) for n in column]),
                layout=column[0].layout,
                dropout=column[0].dropout,
            )
        )
    return treedef.unflatten(out)


def select(stacked: Any, index: int) -> Any:
    """The ``index``-th delta of a stacked delta.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> _, d = jaxlora.split({"w": jnp.ones((4, 3))},
        ...                      jaxlora.LoraConfig(rank=1, targets="w"), key=jax.random.key(0))
        >>> jaxlora.multi.select(jaxlora.stack([d, d]), 1)["w"].a.shape
        (4, 1)
    """
    return jax.tree.map(
        lambda n: n if n is None else n.select(index), stacked, is_leaf=is_delta_leaf
    )


def combine_adapters(
    deltas: Sequence[Any],
    weights: Sequence[float],
    *,
    method: str = "cat",
    rank: int | None = None,
) -> Any:
    """One adapter whose weight delta combines ``Σ w_i · ΔW_i``.

    Methods:
        * ``"cat"``: exact. ``a = [w_1 s_1 a_1, ..., w_n s_n a_n]`` and
          ``b = [b_1; ...; b_n]`` with scale 1: the rank adds up.
        * ``"svd"``: the exact weighted sum, truncated to ``rank`` by an SVD (the
          best rank-``rank`` approximation; exact when ``rank`` is at least the
          sum of the ranks). Costs one SVD of each ``(n_in, n_out)`` weight.
        * ``"linear"``: PEFT's linear combination, ``a = Σ sqrt(w_i s_i) a_i``,
          ``b = Σ sqrt(w_i s_i) b_i`` (ranks padded to the largest). It is *not* the
          weighted sum: the products ``a_i b_j`` for ``i ≠ j`` add cross terms.
          Kept for compatibility; prefer ``"cat"`` or ``"svd"``.

    Args:
        deltas: LoRA deltas of the same parameters and targets.
        weights: one weight per delta.
        method: ``"cat"``, ``"svd"`` or ``"linear"``.
        rank: the rank for ``"svd"`` (default: the largest input rank).

    Returns:
        A LoRA delta.

    Raises:
        ValueError: for mismatched inputs or an unknown method.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"w": jax.random.normal(jax.random.key(0), (5, 4))}
        >>> config = jaxlora.LoraConfig(rank=2, targets="w", init="pissa")
        >>> base, d = jaxlora.split(params, config, key=jax.random.key(0))
        >>> both = jaxlora.combine_adapters([d, d], [0.5, 0.5], method="cat")
        >>> both["w"].rank, bool(jnp.allclose(jaxlora.merge(base, both)["w"], params["w"],
        ...                                   atol=1e-5))
        (4, True)
    """
    if method not in ("cat", "svd", "linear"):
        raise ValueError(f"method must be 'cat', 'svd' or 'linear'; got {method!r}")
    if len(deltas) != len(weights) or not deltas:
        raise ValueError(
            f"combine_adapters needs one weight per delta; got {len(deltas)} deltas and "
            f"{len(weights)} weights"
        )
    stacked = stack(deltas)  # validates paths and layouts; pads ranks (used by "linear")
    w = jnp.asarray(weights, jnp.float32)
    originals = [_nodes(d)[0] for d in deltas]
    leaves, treedef = _nodes(stacked)
    out = []
    for index, node in enumerate(leaves):
        if node is None:
            out.append(None)
            continue
        column = [nodes[index] for nodes in originals]
        out.append(_combine(node, column, w, method, rank))
    return treedef.unflatten(out)


def _combine(
    stacked: StackedLoraNode, nodes: list, w: jax.Array, method: str, rank: int | None
) -> LoraNode:
    coef = w * jax.lax.stop_gradient(stacked.scale)  # (n,)
    like = dict(layout=stacked.layout, dropout=stacked.dropout)
    if method == "linear":
        root = jnp.sqrt(jnp.abs(coef))
        a = jnp.einsum("n,n...->...", root * jnp.sign(coef), stacked.a)
        b = jnp.einsum("n,n...->...", root, stacked.b)
        return LoraNode(a, b, jnp.float32(1.0), **like)
    a = jnp.concatenate([coef[i] * n.a for i, n in enumerate(nodes)], axis=-1)
    b = jnp.concatenate([n.b for n in nodes], axis=-2)
    if method == "cat":
        return LoraNode(a, b, jnp.float32(1.0), **like)
    k = rank if rank is not None else max(n.rank for n in nodes)
    dense = jnp.matmul(
        a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    u, s, vt = jnp.linalg.svd(dense, full_matrices=False)
    k = min(k, s.shape[-1])
    root = jnp.sqrt(s[..., :k])
    a_k = (u[..., :, :k] * root[..., None, :]).astype(stacked.a.dtype)
    b_k = (root[..., :, None] * vt[..., :k, :]).astype(stacked.b.dtype)
    return LoraNode(a_k, b_k, jnp.float32(1.0), **like)


def _with_paths(delta: Any) -> list[tuple[str, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(delta, is_leaf=is_delta_leaf)[0]
    return [(_paths.path_str(p), n) for p, n in flat]


__all__ = ["StackedLoraNode", "combine_adapters", "is_node", "pad_rank", "select", "stack"]
