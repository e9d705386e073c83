"""DoRA: weight-decomposed low-rank adaptation (``LoraConfig(use_dora=True)``).

DoRA splits each adapted weight into a direction and a magnitude: with the LoRA
delta ``Δ = s·a@b`` and one trainable magnitude ``m_j`` per output unit ``j``,

    W'_:j = m_j · (W_:j + Δ_:j) / ||W_:j + Δ_:j||

where ``W_:j`` is the column of the ``(n_in, n_out)`` matrix view of ``W``
(all input axes flattened). As the paper recommends, the norm is a constant in
the backward pass (``stop_gradient``), so the gradient of the direction is
LoRA's, scaled.

At the use site the engine computes ``(x@W + s·(x@a)@b) · m / ||W + Δ||`` and
the norm never needs ``W + Δ``: per column,
``||W_:j + Δ_:j||² = ||W_:j||² + 2s·Σ_k b_kj (aᵀW)_kj + s²·Σ_kl b_kj b_lj (aᵀa)_kl``,
which costs one ``aᵀW`` product and keeps only ``(r, n_out)`` numbers.

**Unmerging.** ``merge`` leaves ``W'`` alone, and ``W'`` with ``(a, b, m)`` does
not determine ``W``: every ``W_:j = n·W'_:j/m_j - Δ_:j`` with ``n > 0`` merges
to the same ``W'``. What pins ``n`` down is the base's column norm
``||W_:j||``, which :func:`split` stores in the node (``base_norm``: a frozen
:class:`jaxlora._node.Constant` in the node's static metadata, outside the
trainable tree, one number per output unit, like ``m``); then ``n`` solves
``n² - 2n·(u·Δ_:j) + ||Δ_:j||² = ||W_:j||²`` with ``u = W'_:j/m_j``. Of its two
roots the larger one is ``W``'s whenever ``W_:j · (W_:j + Δ_:j) ≥ 0``, which holds
for every adapter whose delta column is shorter than the base column (LoRA's
regime by a wide margin). Unlike PEFT's cached norm, ``base_norm`` depends on
the base alone, so it stays valid while the adapter trains.

References:
    Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation",
    https://arxiv.org/abs/2402.09353.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._delta import LoraNode
from jaxlora._node import AdapterNode, Constant
from jaxlora._paths import Layout
from jaxlora.io.peft._format import register_codec
from jaxlora.io.peft._lora import LoraCodec
from jaxlora.quant import QuantizedArray

__all__ = ["DoraNode"]

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DoraNode(AdapterNode, kind="dora"):
    """The DoRA adapter of one weight: ``W' = m · (W + s·a@b) / ||W + s·a@b||``.

    ``jaxlora.split(params, LoraConfig(..., use_dora=True), key=key)`` puts one
    at each adapted leaf. ``m`` starts at the column norms of ``W + s·a@b``
    (``||W||`` for the default inits, where ``b = 0``), so the model starts
    where it was.

    Attributes:
        a: ``(*stacked, n_in, rank)``, trainable.
        b: ``(*stacked, rank, n_out)``, trainable.
        m: ``(*stacked, n_out)`` magnitudes, trainable; float32 whatever the
            config's ``dtype`` (a rounded ``m`` would move the model at step 0).
        scale: ``s``, a static float.
        layout: how the base weight's axes read (static).
        dropout: the dropout rate on the low-rank branch's input (static).
        base_norm: ``(*stacked, n_out)`` column norms ``||W_:j||`` of the base this
            node was split from, a static :class:`jaxlora._node.Constant` (so no
            optimizer sees it); only :meth:`unmerge_from` reads it. ``None`` when
            the node was made under tracing (``jax.eval_shape`` of ``split``): such
            a node cannot be unmerged.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> w = jax.random.normal(jax.random.key(0), (6, 4))
        >>> config = jaxlora.LoraConfig(rank=2, targets="w", use_dora=True)
        >>> base, delta = jaxlora.split({"w": w}, config, key=jax.random.key(1))
        >>> node = delta["w"]
        >>> type(node).__name__, node.m.shape, [x.shape for x in jax.tree.leaves(node)]
        ('DoraNode', (4,), [(6, 2), (2, 4), (4,)])
        >>> bool(jnp.allclose(node.m, jnp.linalg.norm(w, axis=0)))
        True
        >>> x = jnp.ones((3, 6))
        >>> f = jaxlora.lora_apply(lambda p, x: x @ p["w"])
        >>> bool(jnp.allclose(f(base, delta, x), x @ w, rtol=1e-6))  # b = 0: the base model
        True

    References:
        Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation",
        https://arxiv.org/abs/2402.09353.
    """

    axes: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "a": ("in", "rank"),
        "b": ("rank", "out"),
        "m": ("out",),
        "base_norm": ("out",),
    }

    a: jax.Array
    b: jax.Array
    m: jax.Array
    scale: float = dataclasses.field(kw_only=True, metadata=dict(static=True))
    layout: Layout = dataclasses.field(kw_only=True, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, kw_only=True, metadata=dict(static=True))
    base_norm: Constant | None = dataclasses.field(
        default=None, kw_only=True, metadata=dict(static=True)
    )

    @classmethod
    def from_lora(cls, node: LoraNode, weight: Any) -> DoraNode:
        """The DoRA node with ``node``'s factors whose magnitude starts at ``||W + s·a@b||``.

        Args:
            node: a freshly initialized LoRA node.
            weight: the (new) base weight it adapts, in its own shape; a quantized
                weight is dequantized to read its norms.

        Returns:
            A :class:`DoraNode` that leaves the model unchanged.
        """
        w = _matrix(weight, node.layout)
        merged = w + _delta_matrix(node.a, node.b, node.scale)
        return cls(
            node.a,
            node.b,
            _column_norm(merged),
            scale=node.scale,
            layout=node.layout,
            dropout=node.dropout,
            base_norm=Constant.of(_column_norm(w)),
        )

    @property
    def rank(self) -> int:
        """The adapter's rank."""
        return self.a.shape[-1]

    def stack_hint(self, field: str) -> str:
        """An adapter split under ``jax.jit`` lacks the base norms that an eager split keeps."""
        if field == "base_norm":
            return (
                "one was split under jax.jit (no base column norms) and one outside it, or "
                "from another base: restore both with jaxlora.load_adapter(path, base=base), "
                "which recomputes the norms from the base"
            )
        return super().stack_hint(field)

    def with_base(self, weight: Any) -> DoraNode:
        """This node with ``base_norm`` read from ``weight`` if it has none (and ``weight``
        is concrete): what a node split under ``jax.jit`` needs to unmerge."""
        concrete = jax.Array | np.ndarray | QuantizedArray
        if self.base_norm is not None or not isinstance(weight, concrete):
            return self
        norm = Constant.of(_column_norm(_matrix(weight, self.layout)))
        return self if norm is None else dataclasses.replace(self, base_norm=norm)

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``(a, b)``: the direction's low-rank delta is ``scale · a @ b``."""
        return self.a, self.b

    def weight_norm(self, weight: jax.Array) -> jax.Array:
        """``||W_:j + s·(a@b)_:j||`` per output unit, ``(*stacked, n_out)``, without ``W + s·a@b``.

        Computed in float32 from ``||W_:j||²``, ``aᵀW`` and ``aᵀa``; its gradient is
        not stopped here (see :meth:`output_scale`).
        """
        w = _matrix(weight, self.layout)
        a = self.a.astype(jnp.float32)
        b = self.b.astype(jnp.float32)
        s = jnp.float32(self.scale)
        w_sq = jnp.sum(w * w, axis=-2)
        a_w = jnp.einsum("...ir,...io->...ro", a, w, precision=_HIGHEST)
        a_a = jnp.einsum("...ir,...is->...rs", a, a, precision=_HIGHEST)
        cross = jnp.sum(b * a_w, axis=-2)
        quad = jnp.sum(b * jnp.einsum("...rs,...so->...ro", a_a, b, precision=_HIGHEST), axis=-2)
        return jnp.sqrt(jnp.maximum(w_sq + 2.0 * s * cross + s * s * quad, 0.0))

    def output_scale(self, weight: jax.Array) -> jax.Array:
        """``m / stop_gradient(||W + s·a@b||)`` per output unit, ``(*stacked, n_out)``.

        A zero column (norm 0) gets the multiplier 0.
        """
        return _safe_ratio(self.m, jax.lax.stop_gradient(self.weight_norm(weight)))

    def merge_into(self, weight: jax.Array) -> jax.Array:
        """``m · (W + s·a@b) / ||W + s·a@b||`` (float32 in, float32 out), the norm held constant."""
        merged = _matrix(weight, self.layout) + _delta_matrix(self.a, self.b, self.scale)
        norm = jax.lax.stop_gradient(_column_norm(merged))
        ratio = _safe_ratio(self.m, norm)
        return (merged * ratio[..., None, :]).reshape(self.layout.shape)

    def unmerge_from(self, merged: jax.Array) -> jax.Array:
        """The base weight that :meth:`merge_into` turned into ``merged``.

        Solves for each column's norm ``n = ||W_:j + Δ_:j||`` from the stored
        ``base_norm`` (see the module docstring): exact up to rounding when
        ``W_:j · (W_:j + Δ_:j) ≥ 0`` and ``m_j ≠ 0``.

        Raises:
            ValueError: if the node has no ``base_norm``.
        """
        if self.base_norm is None:
            raise ValueError(
                "this DoraNode has no base_norm (it was split under jax.jit or eval_shape), and "
                "W + s·a@b cannot be recovered from the merged weight and the delta alone: "
                "DoRA's merge divides each column by its norm. Restore the adapter with its "
                "base, jaxlora.load_adapter(path, base=base), which recomputes the norms; split "
                "outside jit; or keep the base instead of unmerging."
            )
        u = _safe_ratio(1.0, self.m)[..., None, :] * _matrix(merged, self.layout)  # (W+Δ)/n
        delta = _delta_matrix(self.a, self.b, self.scale)
        u_d = jnp.sum(u * delta, axis=-2)
        d_sq = jnp.sum(delta * delta, axis=-2)
        w_sq = jnp.square(jnp.asarray(self.base_norm.value, jnp.float32))
        n = u_d + jnp.sqrt(jnp.maximum(u_d * u_d - d_sq + w_sq, 0.0))
        return (n[..., None, :] * u - delta).reshape(self.layout.shape)


def _matrix(weight: Any, layout: Layout) -> jax.Array:
    """The weight (dequantized if quantized) as float32 ``(*stacked, n_in, n_out)`` matrices."""
    if isinstance(weight, QuantizedArray):
        weight = weight.dequantize(jnp.float32)
    return jnp.asarray(weight).astype(jnp.float32).reshape(layout.matrix_shape)


def _delta_matrix(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    return jnp.float32(scale) * jnp.matmul(
        a.astype(jnp.float32), b.astype(jnp.float32), precision=_HIGHEST
    )


def _column_norm(matrix: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(matrix * matrix, axis=-2))


def _safe_ratio(num: Any, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den != 0``, else 0 (with finite gradients everywhere)."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


register_codec("dora", LoraCodec(dora=True))  # PEFT's LoRA files with use_dora
