"""``Lazy``: a quantized weight (and the views the program takes of it), dequantized at use.

The interpreter never dequantizes a quantized base weight ahead of time.
Views (transpose, reshape, cast) are recorded, and the op that consumes the
weight runs inside ``jax.checkpoint`` together with the dequantization, so
that the backward pass recomputes the dequantized weight from its 4-bit codes
instead of keeping it: at any time at most the weights of the op at hand
exist in full precision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.quant import QuantizedArray


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Lazy:
    """``ops(dequantize(q))``; ``shape`` and ``dtype`` are those of the result."""

    q: QuantizedArray
    ops: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    dtype: Any = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def of(cls, q: QuantizedArray) -> Lazy:
        return cls(q, (), tuple(q.shape), jnp.dtype(q.dtype))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def value(self) -> jax.Array:
        """The dequantized weight with the recorded views applied."""
        x = self.q.dequantize()
        for primitive, params in self.ops:
            x = primitive.bind(x, **dict(params))
        return x

    def then(self, eqn: Any) -> Lazy:
        """This weight with one more view (the unary ``eqn``) recorded."""
        aval = eqn.outvars[0].aval
        op = (eqn.primitive, tuple(sorted(eqn.params.items())))
        return Lazy(self.q, (*self.ops, op), tuple(aval.shape), aval.dtype)

    def per_layer(self, length: int) -> Lazy | None:
        """This weight arranged so that ``scan`` slices it along its first axis.

        Possible when no view was taken yet, the layer axis is stored first
        (``axes``, if any, keeps it in front) and the blocks never span two
        layers. Returns ``None`` otherwise. Where double quantization's groups
        of block scales span layers, the block scales are dequantized here, for
        the whole stack (float32: 4 bytes per block, 1/16 byte per weight with
        blocks of 64), and each layer gets its own; the codes stay 4-bit.
        """
        q = self.q
        if self.ops or q.shape[0] != length or (q.axes is not None and q.axes[0] != 0):
            return None
        per_layer = q.size // length
        n_blocks = per_layer // q.block_size
        if per_layer % q.block_size:
            return None
        if q.double_quant and n_blocks % q.scale_block_size:
            q = dataclasses.replace(
                q,
                scales=q.block_scales(),
                scale_scales=None,
                scale_mean=None,
                scale_block_size=None,
            )
        split = lambda x: None if x is None else x.reshape(length, -1)
        mean = None if q.scale_mean is None else jnp.broadcast_to(q.scale_mean, (length,))
        sliced = dataclasses.replace(
            q,
            codes=split(q.codes),
            scales=split(q.scales),
            scale_scales=split(q.scale_scales),
            scale_mean=mean,
            minimums=split(q.minimums),
            shape=tuple(q.shape[1:]),
            axes=None if q.axes is None else tuple(a - 1 for a in q.axes[1:]),
        )
        return Lazy(sliced, (), tuple(q.shape[1:]), self.dtype)


def value_of(base: Any) -> Any:
    """The array a base stands for (dequantized if it is lazy)."""
    return base.value() if isinstance(base, Lazy) else base


def bind_at_use(bind: Callable[[list], list], operands: list, index: int) -> list:
    """``bind(operands)``, where ``operands[index]`` may be a lazy (quantized) weight.

    The ops that consume a weight (``dot_general``, ``conv_general_dilated``,
    ``gather``) are linear in their float operands and the frozen weight gets
    no gradient. So the backward pass needs neither the dequantized weight
    nor the other operands' values: it dequantizes the weight again from its
    codes, only once the incoming cotangent exists (an optimization barrier
    orders the two), and transposes the op. At most the weights of the op at
    hand are ever held in full precision.
    """
    base = operands[index]
    if not isinstance(base, Lazy):
        return bind(operands)
    others = [x for i, x in enumerate(operands) if i != index]

    def apply(q: QuantizedArray, others: list) -> list:
        args = list(others)
        args.insert(index, dataclasses.replace(base, q=_after(q, others)).value())
        return bind(args)

    @jax.custom_vjp
    def use(q: QuantizedArray, others: list) -> list:
        return apply(q, others)

    shapes = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in others]

    def forward(q: QuantizedArray, others: list) -> tuple[list, tuple]:
        return apply(q, others), (q,)

    def backward(residuals: tuple, cotangents: list) -> tuple:
        (q,) = residuals
        q = _after(q, cotangents)  # apply() adds the zero-valued operands' dependency too
        floats = [i for i, s in enumerate(shapes) if jnp.issubdtype(s.dtype, jnp.inexact)]
        at_zero = [jnp.zeros(s.shape, s.dtype) for s in shapes]

        def linear(*float_args: Any) -> list:
            args = list(at_zero)
            for i, x in zip(floats, float_args, strict=True):
                args[i] = x
            return apply(q, args)

        _, transpose = jax.vjp(linear, *(at_zero[i] for i in floats))
        grads = iter(transpose(cotangents))
        d_others = [
            next(grads) if i in floats else np.zeros(s.shape, jax.dtypes.float0)
            for i, s in enumerate(shapes)
        ]
        return _zero_cotangent(q), d_others

    use.defvjp(forward, backward)
    return use(base.q, others)


def _after(q: QuantizedArray, values: Any) -> QuantizedArray:
    """``q`` made to depend on ``values``, so that its dequantization waits for them.

    In the forward pass ``values`` are the op's other operands (the layer's
    input), in the backward pass the cotangents: each weight is then
    dequantized just before its use, and the backward pass's dequantization is
    not merged with the forward pass's. ``lax.optimization_barrier`` would say
    this, but the CPU backend expands barriers away before common-subexpression
    elimination and schedules all dequantizations together. Adding ``0 · v``
    (``v`` one float element of ``values``) to the codes is a real data
    dependency that IEEE arithmetic does not let XLA fold away. It goes on the
    codes, the input of every step of the dequantization (the table lookup
    included), so no part of it can be hoisted or shared.
    """
    floats = [x for x in jax.tree.leaves(values) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not floats:
        return q
    zero = 0.0 * jax.lax.stop_gradient(floats[0].reshape(-1)[0]).astype(jnp.float32)
    return dataclasses.replace(q, codes=q.codes + zero.astype(q.codes.dtype))


def _zero_cotangent(tree: Any) -> Any:
    def zero(x: jax.Array) -> Any:
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(x.shape, jax.dtypes.float0)

    return jax.tree.map(zero, tree)
