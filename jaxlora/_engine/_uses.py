"""Rules for the equations that view or consume an adapted weight.

Views (casts, transposes, reshapes, slices, ``pvary``, ``reshard``, a tiled
``all_gather`` of weight shards) map to cheap operations on the factors;
consumers (``dot_general``, ``ragged_dot``, ``gather``, convolutions) emit
``op(x, W) + s·term`` through ``_rules``; a weight norm (a multiplier per
output unit, a sum of squares over the inputs) stays factored. Each rule
returns the equation's outputs, or ``None`` when the use does not fit (the
interpreter then merges the weight there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding

from jaxlora._engine import _adapted, _norms, _rules
from jaxlora._engine._adapted import Adapted
from jaxlora._engine._context import Context, Squared, bind
from jaxlora._engine._lazy import Lazy, bind_at_use

_VIEW_OPS = {
    "convert_element_type",
    "copy",
    "copy_p",
    "sharding_constraint",
    "optimization_barrier",
    "pvary",  # in a shard_map body: the weight's type becomes varying over some mesh axes
}


def _view_of(eqn: Any, base: Any) -> Any:
    """The view ``eqn`` takes of a base weight (recorded, for a lazy one)."""
    return base.then(eqn) if isinstance(base, Lazy) else bind(eqn, [base])[0]


def _view(eqn: Any, invals: list, ctx: Context) -> list | None:
    (v,) = invals
    return [dataclasses.replace(v, base=_view_of(eqn, v.base))]


def _transpose(eqn: Any, invals: list, ctx: Context) -> list | None:
    (v,) = invals
    return [_adapted.transpose(v, _view_of(eqn, v.base), tuple(eqn.params["permutation"]))]


def _reshape(eqn: Any, invals: list, ctx: Context) -> list | None:
    """``reshape``, ``squeeze`` and size-preserving ``broadcast_in_dim`` (added unit axes)."""
    reordered = eqn.primitive.name == "reshape" and eqn.params.get("dimensions") not in (None, ())
    if len(invals) != 1 or reordered:
        return None
    (v,) = invals
    shape = tuple(eqn.outvars[0].aval.shape)
    if _adapted.total(shape) != _adapted.total(v.shape):
        return None  # a real broadcast
    out = _adapted.reshape(v, _view_of(eqn, v.base), shape)
    return None if out is None else [out]


def _slice(eqn: Any, invals: list, ctx: Context) -> list | None:
    """``slice`` and ``dynamic_slice`` of a weight: the factors are sliced alike.

    Taking a layer or an expert of a stack (``w[i]``, in a Python loop or a
    ``fori_loop``) slices the factors' stacked axis, and taking part of the
    inputs or outputs (a fused kernel split by columns) slices ``a`` or ``b``:
    a slice of ``a ⊗ b`` along a role axis is the product with that factor
    sliced, and only rank-sized pieces are copied.
    """
    v, *starts = invals
    if not isinstance(v, Adapted) or any(isinstance(s, Adapted | Squared) for s in starts):
        return None
    if starts and isinstance(v.base, Lazy):
        return None  # a quantized base records unary views only: dequantized at this use
    shape = v.shape  # the weight's, before the slice
    base = bind(eqn, [v.base, *starts])[0] if starts else _view_of(eqn, v.base)
    v = dataclasses.replace(v, base=base)
    if not v.has_factors:
        return [v]
    p = eqn.params
    for d, size in enumerate(shape):
        if starts:
            if p["slice_sizes"][d] == size:
                continue
            cut = lambda f, axis, d=d: lax.dynamic_slice_in_dim(
                f, starts[d], p["slice_sizes"][d], axis
            )
        else:
            start, limit = p["start_indices"][d], p["limit_indices"][d]
            stride = 1 if p["strides"] is None else p["strides"][d]
            if (start, limit, stride) == (0, size, 1):
                continue
            cut = lambda f, axis, s=start, m=limit, t=stride: lax.slice_in_dim(f, s, m, t, axis)
        v = _adapted.along_axis(v, d, cut)
    return [v]


# ------------------------------------------------------------------ consumers


def _dropped(x: jax.Array, rate: float, ctx: Context) -> jax.Array:
    key = ctx.next_key()
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def _dot_general(eqn: Any, invals: list, ctx: Context) -> list | None:
    lhs, rhs = invals
    if isinstance(lhs, Adapted) and isinstance(rhs, Adapted):
        lhs = ctx.fallback("dot_general", lhs)  # W1 @ W2: factor the second only
    weight_is_lhs = isinstance(lhs, Adapted)
    v, x = (lhs, rhs) if weight_is_lhs else (rhs, lhs)
    dimension_numbers = eqn.params["dimension_numbers"]
    if v.out_scale is not None and v.route is None:
        m = _rules.input_multiplier(
            x, v, weight_is_lhs=weight_is_lhs, dimension_numbers=dimension_numbers
        )
        if m is not None:  # the use contracts the scaled outputs (a tied embedding's x @ E.T)
            x, v = (x * m).astype(x.dtype), dataclasses.replace(v, out_scale=None)
    plain = [v.base, x] if weight_is_lhs else [x, v.base]
    y = bind_at_use(lambda ops: bind(eqn, ops), plain, 0 if weight_is_lhs else 1)[0]
    if not v.has_factors:
        return [y]
    term, out_scale = _rules.dot_general(
        _dropped(x, v.dropout, ctx),
        v,
        weight_is_lhs=weight_is_lhs,
        dimension_numbers=dimension_numbers,
        out_sharding=_rules.explicit_spec(y),
        custom_backward=not ctx.forward_mode,
    )
    if v.out_scale is not None and out_scale is None:
        return None  # the output multiplier cannot reach a contracted output axis
    y = y + term.astype(y.dtype)
    return [y if out_scale is None else (y * out_scale).astype(y.dtype)]


def _ragged_dot(eqn: Any, invals: list, ctx: Context) -> list | None:
    x, v, group_sizes = invals
    if isinstance(x, Adapted) or isinstance(group_sizes, Adapted) or not isinstance(v, Adapted):
        return None
    y = bind_at_use(lambda ops: bind(eqn, ops), [x, v.base, group_sizes], 1)[0]
    if not v.has_factors:
        return [y]
    params = {k: p for k, p in eqn.params.items() if k != "out_sharding"}
    x = _dropped(x, v.dropout, ctx)
    term = _rules.ragged_dot(x, v, group_sizes, explicit_out=_rules.explicit_spec(y), **params)
    return None if term is None else [y + term.astype(y.dtype)]


def _gather(eqn: Any, invals: list, ctx: Context) -> list | None:
    v, indices = invals
    if not isinstance(v, Adapted) or isinstance(indices, Adapted):
        return None
    y = lambda: bind_at_use(lambda ops: bind(eqn, ops), [v.base, indices], 0)[0]
    if not v.has_factors:
        return [y()]
    found = _rules.gather(indices, v, **eqn.params)
    if found is None:
        return None
    term, out_scale = found
    out = y()
    out = out + term.astype(out.dtype)
    return [out if out_scale is None else (out * out_scale).astype(out.dtype)]


def _conv(eqn: Any, invals: list, ctx: Context) -> list | None:
    x, v = invals
    if isinstance(x, Adapted) or not isinstance(v, Adapted):
        return None
    y = lambda: bind_at_use(lambda ops: bind(eqn, ops), [x, v.base], 1)[0]
    if not v.has_factors:
        return [y()]
    found = _rules.conv(_dropped(x, v.dropout, ctx), v, **eqn.params)
    if found is None:
        return None
    term, out_scale = found
    out = y()
    out = out + term.astype(out.dtype)
    return [out if out_scale is None else (out * out_scale).astype(out.dtype)]


# ------------------------------------------------------------------ weight norms


def _scaled_by(v: Adapted, m: Any, eqn: Any) -> list | None:
    """``v * m`` for a multiplier ``m`` per output unit: it joins ``out_scale``."""
    if not v.has_factors or v.route is not None or isinstance(m, Adapted | Squared):
        return None
    if tuple(eqn.outvars[0].aval.shape) != v.shape:
        return None  # the product broadcasts the weight itself
    mult = _norms.output_multiplier(v, m)
    if mult is None:
        return None
    out_scale = mult if v.out_scale is None else v.out_scale * mult
    return [dataclasses.replace(v, out_scale=out_scale)]


def _mul(eqn: Any, invals: list, ctx: Context) -> list | None:
    x, y = invals
    if isinstance(x, Adapted) and x is y:
        return [Squared(x)]
    if isinstance(x, Adapted):
        return _scaled_by(x, y, eqn)
    if isinstance(y, Adapted):
        return _scaled_by(y, x, eqn)
    return None


def _div(eqn: Any, invals: list, ctx: Context) -> list | None:
    x, y = invals
    if not isinstance(x, Adapted) or isinstance(y, Adapted | Squared):
        return None
    return _scaled_by(x, 1 / jnp.asarray(y), eqn)


def _square(eqn: Any, invals: list, ctx: Context) -> list | None:
    (v,) = invals
    if eqn.primitive.name == "integer_pow" and eqn.params["y"] != 2:
        return None
    return [Squared(v)] if isinstance(v, Adapted) else None


def _reduce_sum(eqn: Any, invals: list, ctx: Context) -> list | None:
    (sq,) = invals
    if not isinstance(sq, Squared) or not sq.v.has_factors:
        return None
    norms = _norms.squared_norms(sq.v, tuple(eqn.params["axes"]))
    return None if norms is None else [norms]


def _all_gather(eqn: Any, invals: list, ctx: Context) -> list | None:
    """``all_gather`` of a weight's shards (FSDP in a ``shard_map`` body), factors alike.

    Gathering ``W`` along one axis gathers the factor that holds that axis's
    role (both factors, for a stacked axis): the gathered factors' product is
    the gathered weight's delta, and only rank-sized shards move.
    """
    (v,) = invals
    p = eqn.params
    if not p["tiled"] or p["axis_index_groups"] is not None or v.route is not None:
        return None
    base = _view_of(eqn, v.base)
    if not v.has_factors:
        return [dataclasses.replace(v, base=base)]
    gather = lambda f, axis: lax.all_gather(f, p["axis_name"], axis=axis, tiled=True)
    gathered = _adapted.along_axis(v, p["all_gather_dimension"], gather)
    return [dataclasses.replace(gathered, base=base)]


def _reshard(eqn: Any, invals: list, ctx: Context) -> list | None:
    """``reshard`` of a weight (FSDP on an ``Explicit`` mesh gathers it before its use).

    Each factor is resharded like the weight's axes of its role (the rank axis
    whole): ``a ⊗ b`` then has the weight's new sharding, and only rank-sized
    shards move.
    """
    (v,) = invals
    if v.route is not None:
        return None
    dst = eqn.params["dst_sharding"]
    base = _view_of(eqn, v.base)
    if not v.has_factors:
        return [dataclasses.replace(v, base=base)]
    moved = [
        jax.sharding.reshard(f, NamedSharding(dst.mesh, spec))
        for f, spec in _adapted.factor_specs(v, dst.spec)[1:]
    ]
    a, b, *out_scale = moved
    return [
        dataclasses.replace(v, base=base, a=a, b=b, out_scale=out_scale[0] if out_scale else None)
    ]


RULES: dict[str, Callable[[Any, list, Context], list | None]] = {
    **{name: _view for name in _VIEW_OPS},
    "transpose": _transpose,
    "reshape": _reshape,
    "squeeze": _reshape,
    "broadcast_in_dim": _reshape,
    "slice": _slice,
    "dynamic_slice": _slice,
    "all_gather": _all_gather,
    "reshard": _reshard,
    "dot_general": _dot_general,
    "gather": _gather,
    "ragged_dot_general": _ragged_dot,
    "conv_general_dilated": _conv,
    "mul": _mul,
    "div": _div,
    "square": _square,
    "integer_pow": _square,
    "reduce_sum": _reduce_sum,
}
