"""``LoraNode``, the plain LoRA adapter of one weight, and the initializers of its factors."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxlora._node import AdapterNode
from jaxlora._paths import Layout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraNode(AdapterNode, kind="lora"):
    """The low-rank adapter of one weight: ``W' = W + scale · a @ b``.

    A delta (the second output of :func:`jaxlora.split`) mirrors the parameter
    tree with a ``LoraNode`` at each adapted leaf and ``None`` elsewhere. Its two
    arrays are its only pytree leaves, so any optax optimizer applied to the
    delta trains exactly ``a`` and ``b``.

    Attributes:
        a: ``(*stacked, n_in, rank)``, trainable.
        b: ``(*stacked, rank, n_out)``, trainable.
        scale: ``alpha / rank`` (or ``alpha / sqrt(rank)``), a static float: part of the
            tree's structure, never an optimizer's leaf. Adapters of equal shapes
            and scales swap into a compiled function without recompiling; to share
            one compiled function across scales, fold them
            (:func:`jaxlora.pad_rank`, :func:`jaxlora.stack`).
        layout: how the base weight's axes read (static).
        dropout: the dropout rate on the low-rank branch's input (static).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxlora import LoraNode
        >>> from jaxlora._paths import Layout
        >>> node = LoraNode(jnp.ones((3, 2)), jnp.ones((2, 4)), scale=0.5,
        ...                 layout=Layout((), (3,), (4,)))
        >>> node.rank, node.delta_weight().shape, len(jax.tree.leaves(node))
        (2, (3, 4), 2)
    """

    axes: ClassVar[Mapping[str, tuple[str, ...]]] = {"a": ("in", "rank"), "b": ("rank", "out")}

    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(kw_only=True, metadata=dict(static=True))
    layout: Layout = dataclasses.field(kw_only=True, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, kw_only=True, metadata=dict(static=True))

    @property
    def rank(self) -> int:
        """The adapter's rank."""
        return self.a.shape[-1]

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``(a, b)``."""
        return self.a, self.b


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
