"""Weight norms of an adapted weight, from its factors.

A weight-normalized layer (``flax.linen.WeightNorm``: ``g · V / ||V||`` over
the inputs) multiplies its weight by a factor per output unit and sums its
squares over the inputs. For an adapted weight both stay factored:
``output_multiplier`` folds the multiplier into the view's ``out_scale`` and
``squared_norms`` computes ``sum((W + s·a⊗b)², inputs)`` without the merged
weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlora._engine._adapted import Adapted, letters_for
from jaxlora._engine._lazy import value_of


def output_multiplier(v: Adapted, m: jax.Array) -> jax.Array | None:
    """``m`` (a multiplier of the view, broadcast) laid out as ``out_scale``: ``(*S, *O)``.

    ``None`` unless ``m`` is constant along every input axis of the view: a
    multiplier per output unit (and per stacked layer) scales the matmul's
    output, ``x @ ((W + s·a⊗b) * m) = (x @ (W + s·a⊗b)) * m``; one along the
    inputs would not.
    """
    m = jnp.asarray(m)
    if m.ndim > len(v.roles):
        return None
    m = m.reshape((1,) * (len(v.roles) - m.ndim) + m.shape)
    if any(g == "i" and m.shape[d] != 1 for d, (g, _) in enumerate(v.roles)):
        return None
    keep = [(g, k) for g, k in v.roles if g != "i"]
    order = sorted(range(len(keep)), key=lambda j: (keep[j][0] != "s", keep[j][1]))
    m = jnp.squeeze(m, [d for d, (g, _) in enumerate(v.roles) if g == "i"])
    ns = v.n_stacked
    return jnp.broadcast_to(jnp.transpose(m, order), (*v.a.shape[:ns], *v.b.shape[ns + 1 :]))


def squared_norms(v: Adapted, axes: tuple[int, ...]) -> jax.Array | None:
    """``sum((W + s·a⊗b)², axes)`` from the factors, when ``axes`` hold the view's inputs.

    ``ΣW² + 2s·Σ W⊙(a⊗b) + s²·bᵀ(aᵀa)b`` per output (and stacked) unit: weight
    sized reads, rank-sized intermediates, no merged weight (a weight norm,
    ``W / ||W||`` over the inputs, as in ``flax.linen.WeightNorm``). Further
    axes in ``axes`` (an L2 penalty sums over all of them) are summed after.
    """
    inputs = sorted(d for d, (g, _) in enumerate(v.roles) if g == "i")
    if not set(inputs) <= set(axes) or v.out_scale is not None or v.route is not None:
        return None
    kept = [d for d in range(len(v.roles)) if d not in inputs]
    after = tuple(kept.index(d) for d in sorted(set(axes) - set(inputs)))
    norms = _column_norms(v, inputs)
    return jnp.sum(norms, axis=after) if after else norms


def _column_norms(v: Adapted, inputs: list[int]) -> jax.Array:
    """``sum((W + s·a⊗b)², inputs)``, in the view's order of the other axes."""
    letters = letters_for(len(v.roles) + 2)
    rank, rank2 = letters[-2], letters[-1]
    view = "".join(letters[: len(v.roles)])
    role_l = dict(zip(v.roles, view, strict=True))
    sa, sb = v.factor_letters(role_l, rank)
    _, sb2 = v.factor_letters(role_l, rank2)
    sa2 = sa.replace(rank, rank2)
    out = "".join(c for d, c in enumerate(view) if d not in inputs)
    w = value_of(v.base).astype(jnp.float32)
    a, b = v.a.astype(jnp.float32), v.b.astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    plain = jnp.sum(w * w, axis=tuple(inputs))
    cross = jnp.einsum(f"{view},{sa},{sb}->{out}", w, a, b, precision=hp)
    gram = jnp.einsum(f"{sa},{sa2}->{sa[: v.n_stacked]}{rank}{rank2}", a, a, precision=hp)
    s = v.scale
    stacked = sa[: v.n_stacked]
    square = jnp.einsum(f"{sb},{stacked}{rank}{rank2},{sb2}->{out}", b, gram, b, precision=hp)
    return (plain + 2 * s * cross + s * s * square).astype(v.dtype)
