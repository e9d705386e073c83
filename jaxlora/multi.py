"""Many adapters on one base: padding, stacking, per-example routing and combining.

* :func:`pad_rank` pads a delta's adapters with zero rank components and, by
  default, folds each scale into its output-side factor: padded adapters of
  equal ranks then have equal tree structures (the scale is static metadata),
  so they swap into a compiled function without recompiling.
* :func:`stack` turns ``n`` deltas into one whose adapters carry a leading
  adapter axis (:class:`StackedNode`); ``lora_apply(fn)(base, stacked, x,
  adapter_ids=ids)`` then gives example ``i`` of the batch adapter ``ids[i]``
  (``-1``: the bare base model), in one pass with gathered low-rank factors.
  Any node type stacks (LoRA, DoRA, VeRA, AdaLoRA) as long as the stacked
  adapters agree on their static metadata.
* :func:`combine_adapters` merges several additive adapters into one.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxlora import _paths
from jaxlora._delta import LoraNode
from jaxlora._node import AdapterNode, is_delta_leaf, is_node, node_type

__all__ = ["StackedNode", "combine_adapters", "pad_rank", "select", "stack"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedNode(AdapterNode, kind="stacked"):
    """``n`` adapters of one weight, stacked along a leading adapter axis.

    Attributes:
        inner: one node of the adapters' type whose every array has a leading
            axis of size ``n`` (its static fields are the adapters' common ones).
        scales: the adapters' scales, one per adapter, when they differ; ``None``
            when every adapter uses ``inner.scale`` (static).

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"w": jnp.ones((4, 3))}
        >>> deltas = [jaxlora.split(params, jaxlora.LoraConfig(rank=r, targets="w"),
        ...                         key=jax.random.key(r))[1] for r in (1, 2)]
        >>> node = jaxlora.stack(deltas)["w"]
        >>> node.n_adapters, node.inner.a.shape
        (2, (2, 4, 2))
    """

    axes: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    inner: AdapterNode
    scales: tuple[float, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def layout(self) -> _paths.Layout:  # type: ignore[override]
        return self.inner.layout

    @property
    def dropout(self) -> float:  # type: ignore[override]
        return self.inner.dropout

    @property
    def scale(self) -> float:  # type: ignore[override]
        if self.scales is not None:
            raise ValueError("the stacked adapters have different scales; see .scales")
        return self.inner.scale

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def n_adapters(self) -> int:
        """How many adapters are stacked."""
        return int(jax.tree.leaves(self.inner)[0].shape[0])

    def select(self, index: int) -> AdapterNode:
        """The ``index``-th adapter, as a node of the stacked type."""
        node = jax.tree.map(lambda x: x[index], self.inner)
        return node if self.scales is None else node.with_scale(self.scales[index])

    def per_example(self, ids: jax.Array, weight: Any) -> tuple[jax.Array, jax.Array, Any]:
        """Factors for a batch: example ``i`` gets adapter ``ids[i]``, none where ``ids[i] < 0``.

        Returns ``(a, b, output_scale)``: ``a: (batch, *stacked, n_in, r)`` with
        each adapter's scale folded in, ``b: (batch, *stacked, r, n_out)``, and
        ``None`` or the per-example output multiplier ``(batch, *stacked, n_out)``
        (``1`` where ``ids[i] < 0``) when ``weight`` is given.
        """
        n = self.n_adapters
        safe = jnp.clip(ids, 0, n - 1)
        on = ids >= 0
        a, b = jax.vmap(lambda node: node.factors())(self.inner)
        scales = jnp.asarray(self.scales if self.scales else (self.inner.scale,) * n, jnp.float32)
        scale = jnp.where(on, scales[safe], 0.0)
        a = a[safe]
        a = a * scale.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype)
        out_scale = None
        if weight is not None:
            if self.scales is None:
                per = jax.vmap(lambda node: node.output_scale(weight))(self.inner)
            else:
                per = jnp.stack([self.select(i).output_scale(weight) for i in range(n)])
            per = per[safe]
            out_scale = jnp.where(on.reshape((-1,) + (1,) * (per.ndim - 1)), per, 1.0)
        return a, b[safe], out_scale

    def factors(self) -> tuple[jax.Array, jax.Array]:
        raise ValueError(
            "a stacked delta holds several adapters: pass adapter_ids= to the function from "
            "jaxlora.lora_apply, or pick one with jaxlora.multi.select(stacked, i)"
        )

    def with_scale(self, scale: float) -> StackedNode:
        raise TypeError("a stacked node has one scale per adapter; stack adapters of that scale")

    def layer(self, index: tuple[int, ...]) -> StackedNode:
        inner = self.inner
        updates = {}
        for name in inner.axes:
            value = getattr(inner, name)
            if value is None:
                continue
            constant = name in inner.constant_fields()  # constants have no adapter axis
            updates[name] = value[tuple(index)] if constant else value[(slice(None), *index)]
        layout = _paths.Layout((), inner.layout.inputs, inner.layout.outputs)
        return dataclasses.replace(
            self,
            inner=dataclasses.replace(inner, layout=layout, **updates),  # type: ignore[call-arg]
        )

    def shardings(self, spec_for: Callable[[tuple[str, ...]], Any]) -> StackedNode:
        return dataclasses.replace(
            self, inner=self.inner.shardings(lambda roles: spec_for(("adapter", *roles)))
        )

    def arrays(self) -> dict[str, Any]:
        return self.inner.arrays()

    def static_metadata(self) -> dict[str, Any]:
        return {
            "inner_kind": self.inner.kind,
            "inner": self.inner.static_metadata(),
            "scales": None if self.scales is None else list(self.scales),
        }

    @classmethod
    def from_saved(cls, arrays: Mapping[str, Any], metadata: Mapping[str, Any]) -> StackedNode:
        inner = node_type(metadata["inner_kind"]).from_saved(arrays, metadata["inner"])
        scales = metadata["scales"]
        return cls(inner, None if scales is None else tuple(float(s) for s in scales))


def _flatten(delta: Any) -> tuple[list, Any]:
    return jax.tree.flatten(delta, is_leaf=is_delta_leaf)


def _with_paths(delta: Any) -> list[tuple[str, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(delta, is_leaf=is_delta_leaf)[0]
    return [(_paths.path_str(p), n) for p, n in flat]


def _check_rank(rank: Any, what: str) -> None:
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
    _check_rank(rank, "rank")
    out = []
    for path, node in _with_paths(delta):
        if node is None:
            out.append(None)
            continue
        if not is_node(node):
            raise TypeError(
                f"delta holds {type(node).__name__} at {path!r}; pass a delta from jaxlora.split"
            )
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
    columns, treedef = _columns(deltas, "stack")
    rank = max(n.rank for column in columns if column for n in column)
    out = []
    for path, column in zip(_adapted_paths(deltas[0]), columns, strict=True):
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
        out.append(StackedNode(inner, None if len(set(scales)) == 1 else scales))
    return treedef.unflatten(out)


def _adapted_paths(delta: Any) -> list[str]:
    return [p for p, _ in _with_paths(delta)]


def _columns(deltas: Sequence[Any], what: str) -> tuple[list[list | None], Any]:
    """Per leaf of the first delta, the nodes of every delta there (``None`` for holes)."""
    if not isinstance(deltas, Sequence) or not deltas:
        raise ValueError(f"{what} needs a non-empty list of deltas; got {deltas!r:.80}")
    structures = [jax.tree.structure(d, is_leaf=is_delta_leaf) for d in deltas]
    per_path = [dict(_with_paths(d)) for d in deltas]
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
                    "stacked adapters share; "
                    + (
                        "VeRA adapters stack only when they were made with the same "
                        "projection_key (they share the frozen projections)"
                        if field.name == "projection"
                        else "make them with the same config"
                    )
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


def combine_adapters(
    deltas: Sequence[Any],
    weights: Sequence[float],
    *,
    method: str = "cat",
    rank: int | None = None,
) -> Any:
    """One LoRA adapter whose weight delta combines ``Σ w_i · ΔW_i``.

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

    Any additive adapter combines (LoRA, VeRA, AdaLoRA, through their
    factors); DoRA rescales the whole weight and is not additive.

    Args:
        deltas: deltas of the same parameters and targets.
        weights: one weight per delta.
        method: ``"cat"``, ``"svd"`` or ``"linear"``.
        rank: the rank for ``"svd"`` (default: the largest input rank), at least 1.

    Returns:
        A delta of :class:`jaxlora.LoraNode` adapters.

    Raises:
        ValueError: for mismatched inputs, an unknown method, a rank below 1, or
            a node with an output multiplier (DoRA).
        TypeError: for a rank that is not an int.

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
    if rank is not None:
        _check_rank(rank, "rank")
    if not isinstance(weights, Sequence) or len(deltas) != len(weights) or not deltas:
        raise ValueError(
            f"combine_adapters needs one weight per delta; got {len(deltas)} deltas and "
            f"{len(weights) if isinstance(weights, Sequence) else weights!r} weights"
        )
    columns, treedef = _columns(deltas, "combine")
    w = [float(x) for x in weights]
    out = []
    for path, column in zip(_adapted_paths(deltas[0]), columns, strict=True):
        if column is None:
            out.append(None)
            continue
        for node in column:
            if type(node).output_scale is not AdapterNode.output_scale:
                raise ValueError(
                    f"combine_adapters sums weight deltas, but {path!r} holds a "
                    f"{type(node).__name__}, which rescales the whole weight (DoRA) and is not "
                    "additive. Merge each adapter and combine the merged weights instead."
                )
        out.append(_combine(column, w, method, rank))
    return treedef.unflatten(out)


def _combine(nodes: list, w: list[float], method: str, rank: int | None) -> LoraNode:
    first = nodes[0]
    like = dict(layout=first.layout, dropout=first.dropout, scale=1.0)
    factors = [n.factors() for n in nodes]
    coef = [wi * float(n.scale) for wi, n in zip(w, nodes, strict=True)]
    if method == "linear":
        r = max(a.shape[-1] for a, _ in factors)
        pad_a = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, r - a.shape[-1])])
        pad_b = lambda b: jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, r - b.shape[-2]), (0, 0)])
        root = [abs(c) ** 0.5 for c in coef]
        a = sum(
            rt * (1 if c >= 0 else -1) * pad_a(a)
            for rt, c, (a, _) in zip(root, coef, factors, strict=True)
        )
        b = sum(rt * pad_b(b) for rt, (_, b) in zip(root, factors, strict=True))
        return LoraNode(a, b, **like)
    a = jnp.concatenate([c * a for c, (a, _) in zip(coef, factors, strict=True)], axis=-1)
    b = jnp.concatenate([b for _, b in factors], axis=-2)
    if method == "cat":
        return LoraNode(a, b, **like)
    k = rank if rank is not None else max(n.rank for n in nodes)
    dense = jnp.matmul(
        a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    u, s, vt = jnp.linalg.svd(dense, full_matrices=False)
    k = min(k, s.shape[-1])
    root = jnp.sqrt(s[..., :k])
    a_k = (u[..., :, :k] * root[..., None, :]).astype(a.dtype)
    b_k = (root[..., :, None] * vt[..., :k, :]).astype(b.dtype)
    return LoraNode(a_k, b_k, **like)
