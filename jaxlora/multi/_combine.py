"""``combine_adapters``: one LoRA adapter of a weighted sum of adapters."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora._delta import LoraNode
from jaxlora._node import AdapterNode
from jaxlora.multi._stack import check_rank, leaf_paths, node_columns

__all__ = ["combine_adapters"]


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
        check_rank(rank, "rank")
    if not isinstance(weights, Sequence) or len(deltas) != len(weights) or not deltas:
        raise ValueError(
            f"combine_adapters needs one weight per delta; got {len(deltas)} deltas and "
            f"{len(weights) if isinstance(weights, Sequence) else weights!r} weights"
        )
    for i, x in enumerate(weights):
        number = isinstance(x, numbers.Real) or getattr(x, "shape", None) == ()
        if not number or isinstance(x, bool):
            raise TypeError(
                f"combine_adapters: weights[{i}] must be a number; got {x!r:.40} "
                f"({type(x).__name__})"
            )
        if not math.isfinite(float(x)):
            raise ValueError(f"combine_adapters: weights[{i}] must be finite; got {float(x)}")
    columns, treedef = node_columns(deltas, "combine")
    w = [float(x) for x in weights]
    out = []
    for path, column in zip(leaf_paths(deltas[0]), columns, strict=True):
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
