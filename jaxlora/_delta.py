"""``LoraNode``, the adapter held at each adapted leaf of a delta, and its initializers."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora._paths import Layout


class AdapterNode:
    """What every adapter node type provides (LoRA, and the variants built on it).

    Subclasses are frozen dataclasses registered as pytrees, with static
    ``layout`` and ``dropout`` fields. The use-site engine and ``merge`` only
    talk to a node through these methods, so a variant is a node type:

    * :meth:`factors`: effective ``(a, b, scale)`` with the weight's delta
      ``scale · a @ b`` (``a: (*stacked, n_in, r)``, ``b: (*stacked, r, n_out)``);
    * :meth:`output_scale`: ``None``, or a per-output-unit multiplier
      ``(*stacked, n_out)`` applied to ``x @ (W + delta)`` (DoRA's ``m / ||W + delta||``);
    * :meth:`merge_into` / :meth:`unmerge_from`: the merged weight and back,
      in float32 and the weight's shape;
    * :meth:`trainable_mask`: the node with ``True`` on its trainable leaves.
    """

    layout: Layout
    dropout: float

    def factors(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        raise NotImplementedError

    def output_scale(self, weight: jax.Array) -> jax.Array | None:
        return None

    def delta_weight(self, dtype: Any = jnp.float32) -> jax.Array:
        """``scale · a @ b`` in the base weight's shape, computed in float32."""
        a, b, scale = self.factors()
        scale = jax.lax.stop_gradient(scale).astype(jnp.float32)
        delta = scale * jnp.matmul(
            a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )
        return delta.reshape(self.layout.shape).astype(dtype)

    def merge_into(self, weight: jax.Array) -> jax.Array:
        """``W + scale · a @ b`` (float32 in, float32 out)."""
        return weight + self.delta_weight(jnp.float32)

    def unmerge_from(self, merged: jax.Array) -> jax.Array:
        """The inverse of :meth:`merge_into`."""
        return merged - self.delta_weight(jnp.float32)

    def trainable_mask(self) -> Any:
        raise NotImplementedError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraNode(AdapterNode):
    """The low-rank adapter of one weight: ``W' = W + scale · a @ b``.

    A delta (the second output of :func:`jaxlora.split`) mirrors the parameter
    tree with a ``LoraNode`` at each adapted leaf and ``None`` elsewhere.

    Attributes:
        a: ``(*stacked, n_in, rank)``, trainable.
        b: ``(*stacked, rank, n_out)``, trainable.
        scale: a float32 scalar array, ``alpha / rank``; frozen (the engine stops its
            gradient) and an array so that adapters with other alphas swap in
            without recompiling.
        layout: how the base weight's axes read (static).
        dropout: the dropout rate on the low-rank branch's input (static).

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxlora import LoraNode
        >>> from jaxlora._paths import Layout
        >>> node = LoraNode(jnp.ones((3, 2)), jnp.ones((2, 4)), jnp.float32(0.5),
        ...                 layout=Layout((), (3,), (4,)))
        >>> node.rank, node.delta_weight().shape
        (2, (3, 4))
    """

    a: jax.Array
    b: jax.Array
    scale: jax.Array
    layout: Layout = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def rank(self) -> int:
        """The adapter's rank."""
        return self.a.shape[-1]

    def factors(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(a, b, scale)``."""
        return self.a, self.b, self.scale

    def trainable_mask(self) -> LoraNode:
        """This node's structure with ``True`` on ``a`` and ``b`` and ``False`` on ``scale``."""
        return dataclasses.replace(self, a=True, b=True, scale=False)  # type: ignore[arg-type]


def is_node(x: Any) -> bool:
    """Whether ``x`` is an adapter node (the leaf type of a delta)."""
    return isinstance(x, AdapterNode)


def is_delta_leaf(x: Any) -> bool:
    """``is_leaf`` for walking a delta: adapter nodes and holes (``None``)."""
    return x is None or is_node(x)


def init_factors(
    key: jax.Array,
    weight: jax.Array,
    layout: Layout,
    *,
    rank: int,
    scale: float,
    init: str,
    dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Initial ``(a, b, new_weight)``; ``new_weight`` is ``None`` unless the init moves the base.

    ``"gaussian"``: ``a ~ N(0, std=1/rank)``; ``"kaiming"``: ``a ~ U(-1/sqrt(n_in),
    1/sqrt(n_in))`` (PyTorch's kaiming-uniform with ``a=sqrt(5)``, as PEFT); both
    start ``b`` at zero. ``"pissa"`` takes the top ``rank`` singular triplets of
    ``W = U S Vᵀ``: ``a = U_r sqrt(S_r) / sqrt(s)``, ``b = sqrt(S_r) V_rᵀ / sqrt(s)``;
    ``"olora"`` takes ``Wᵀ = Q R``: ``b = Q_rᵀ``, ``a = R_rᵀ / s``. Both return the
    base ``W - s·a@b`` (float32, cast back) so the model starts where it was.
    """
    a_shape = (*layout.stacked, layout.n_in, rank)
    b_shape = (*layout.stacked, rank, layout.n_out)
    if init == "gaussian":
        a = jax.random.normal(key, a_shape, jnp.float32) / rank
        return a.astype(dtype), jnp.zeros(b_shape, dtype), None
    if init == "kaiming":
        bound = 1.0 / math.sqrt(layout.n_in)
        a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
        return a.astype(dtype), jnp.zeros(b_shape, dtype), None
    w = jnp.asarray(weight, jnp.float32).reshape(layout.matrix_shape)
    if init == "pissa":
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        root = jnp.sqrt(s[..., :rank] / scale)
        a = u[..., :, :rank] * root[..., None, :]
        b = root[..., :, None] * vt[..., :rank, :]
    elif init == "olora":
        q, r = jnp.linalg.qr(jnp.swapaxes(w, -1, -2))
        a = jnp.swapaxes(r[..., :rank, :], -1, -2) / scale
        b = jnp.swapaxes(q[..., :, :rank], -1, -2)
    else:
        raise ValueError(f"unknown init {init!r}")
    a, b = a.astype(dtype), b.astype(dtype)
    product = jnp.matmul(
        a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    new_weight = (w - scale * product).reshape(layout.shape).astype(weight.dtype)
    return a, b, new_weight
