"""The low-rank branch ``(x ⊗ first) ⊗ second`` with a backward pass laid out for the backend.

JAX's own derivative of the two einsums contracts the token axes of an
activation-sized array on its leading (major) axes for each factor gradient:
``xᵀ·(∂t)`` and ``tᵀ·(∂y)``. XLA:CPU's matmul kernels want the left operand
contracted on its minor axis, so XLA transposes the activation-sized operand,
and fuses that transpose into whatever produced it (a GELU's backward pass, an
attention output): on all-MiniLM-L6-v2 these transposed copies took 40% of a
LoRA train step, more than every matmul of the branch together
(``benchmarks/speed.py``). Here each factor gradient is a plain row-major
product instead, ``(rank-sized)ᵀ · (activation-sized)``: only the rank-sized
operand and the factor-sized result are transposed, and an
``optimization_barrier`` keeps XLA from folding those small transposes back
into the product. The forward pass is the plain pair of einsums.

A ``jax.custom_vjp`` has no forward-mode derivative, so ``lora_apply`` uses this
only when the caller has not asked for forward mode (``forward_mode=True``
keeps JAX's own derivative of the same einsums).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax


def low_rank(
    x_letters: str,
    first_letters: str,
    mid: str,
    second_letters: str,
    out: str,
    scale: float,
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """``f(x, first, second) = einsum(scale · einsum(x, first → mid), second → out)``.

    The letters are einsum subscripts; ``scale`` is the adapter's static
    scale. ``f`` has the custom backward pass described above; its operands
    share one dtype.
    """

    def scaled(t: jax.Array) -> jax.Array:
        return t if scale == 1.0 else t * jnp.asarray(scale, t.dtype)

    spec1 = f"{x_letters},{first_letters}->{mid}"
    spec2 = f"{mid},{second_letters}->{out}"

    def forward(x: jax.Array, first: jax.Array, second: jax.Array) -> jax.Array:
        return jnp.einsum(spec2, scaled(jnp.einsum(spec1, x, first)), second)

    def fwd(x: jax.Array, first: jax.Array, second: jax.Array) -> tuple[jax.Array, tuple]:
        t = scaled(jnp.einsum(spec1, x, first))
        return jnp.einsum(spec2, t, second), (x, first, second, t)

    def bwd(res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x, first, second, t = res
        g = g.astype(t.dtype)
        d_second = _row_major(t, mid, g, out, second_letters)
        d_t = scaled(jnp.einsum(f"{out},{second_letters}->{mid}", g, second))
        d_first = _row_major(d_t, mid, x, x_letters, first_letters)
        d_x = jnp.einsum(f"{mid},{first_letters}->{x_letters}", d_t, first)
        return _typed_like(d_x, x), _typed_like(d_first, first), _typed_like(d_second, second)

    f = jax.custom_vjp(forward)
    f.defvjp(fwd, bwd)
    return f


def _typed_like(grad: jax.Array, primal: jax.Array) -> jax.Array:
    """``grad`` with ``primal``'s varying mesh axes (in a ``shard_map`` body; else as it is).

    A factor replicated over a mesh axis gets one partial gradient per shard:
    their sum over that axis, as JAX's own transpose of the implicit ``pvary``.
    """
    have, want = _varying(grad), _varying(primal)
    if extra := tuple(sorted(have - want)):
        grad = lax.psum(grad, extra)
    if missing := tuple(sorted(want - have)):
        grad = lax.pcast(grad, missing, to="varying")
    return grad


def _varying(x: jax.Array) -> frozenset:
    """The manual mesh axes over which ``x`` varies (empty outside ``shard_map``)."""
    return getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", frozenset())


def _row_major(small: jax.Array, s: str, big: jax.Array, b: str, out: str) -> jax.Array:
    """``einsum(small, big → out)``, contracting the axes they share beyond ``out``'s, as a
    row-major product: ``small`` laid out (shared batch, kept, contracted), ``big`` as it is.
    """
    batch = "".join(c for c in s if c in b and c in out)
    contracted = "".join(c for c in s if c in b and c not in out)
    kept = "".join(c for c in s if c not in b)
    order = batch + kept + contracted
    if order != s:
        small = lax.optimization_barrier(jnp.einsum(f"{s}->{order}", small))
    natural = batch + kept + "".join(c for c in b if c not in s)
    result = jnp.einsum(f"{order},{b}->{natural}", small, big)
    if natural == out:
        return result
    return jnp.einsum(f"{natural}->{out}", lax.optimization_barrier(result))
