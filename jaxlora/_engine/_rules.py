"""Factored rules for the primitives that consume a weight.

Each rule returns the primitive's output for ``op(x, W + s·Δ)`` as
``op(x, W) + s · term`` where ``term`` is computed from the factors without
building ``Δ = a ⊗_r b``, or ``None`` when the use does not fit the rule (the
interpreter then materializes the weight at that use). Where the weight carries
an output multiplier (DoRA's ``m / ||W + s·Δ||``, a weight norm's ``g / ||V||``),
the rules also return it laid out for the output (``_norms`` computes a weight
norm's pieces from the factors).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec

from jaxlora._engine import _adapted, _backward, _routing
from jaxlora._engine._adapted import Adapted, broadcast_out_scale, letters_for, scaled


def _low_rank_einsum(
    x: jax.Array,
    x_letters: str,
    v: Adapted,
    v_letters: str,
    out_letters: str,
    *,
    lead: str = "",
    weights: tuple[jax.Array, str] | None = None,
    out_sharding: Any = None,
    custom_backward: bool = False,
) -> jax.Array:
    """``einsum(x, Δ)`` with ``Δ`` the view's delta, contracting ``x`` with a factor first.

    ``v_letters`` name the view's axes; the factors get the same letters on
    their role axes plus one for the rank (and ``lead`` for their leading axis,
    when routed). ``x`` meets the factor with which it contracts more elements
    first, so the intermediate has a rank-sized axis. ``weights``, an array and
    its letters, multiplies that intermediate (per-example scales, slot masks).
    ``out_sharding`` (on a mesh of ``Explicit`` axes: the use's output spec) is
    stated on the last einsum; the rank-sized intermediate keeps the shardings
    of the axes it takes from ``x`` and the first factor, its rank axis whole.
    ``custom_backward`` (without ``weights`` or ``out_sharding``) computes the
    same with the backward pass of ``_backward``.
    """
    rank = letters_for(1, skip=x_letters + v_letters + out_letters + lead)[0]
    letters = dict(zip(v.roles, v_letters, strict=True))
    sa, sb = v.factor_letters(letters, rank, lead=lead)
    contracted = set(x_letters) - set(out_letters)
    size = dict(zip(x_letters, x.shape, strict=True))

    def shared(factor: str) -> int:
        n = 1
        for c in contracted & set(factor):
            n *= size[c]
        return n

    first, second = (v.a, sa), (v.b, sb)
    if shared(sb) > shared(sa):
        first, second = second, first
    dtype = jnp.promote_types(x.dtype, v.a.dtype)
    keep = set(second[1]) | set(out_letters)
    mid = "".join(dict.fromkeys(c for c in x_letters + first[1] if c in keep))
    # (a batch axis shared with the factors, as in an expert einsum, keeps JAX's derivative:
    # XLA:CPU 0.10 aborts on some batched layouts of the custom one)
    batched = set(x_letters) & set(out_letters) & (set(sa) | set(sb))
    if custom_backward and weights is None and out_sharding is None and not batched:
        f = _backward.low_rank(x_letters, first[1], mid, second[1], out_letters, v.scale)
        return f(x.astype(dtype), first[0].astype(dtype), second[0].astype(dtype))
    mid_sharding = None
    if out_sharding is not None:
        mid_sharding = _spec_for(mid, (x, x_letters), (first[0], first[1]), skip=rank)
    t = jnp.einsum(
        f"{x_letters},{first[1]}->{mid}",
        x.astype(dtype),
        first[0].astype(dtype),
        out_sharding=mid_sharding,
    )
    # the scale goes on the rank-sized intermediate: no pass over the activation-sized output,
    # and no scaled copy of a factor for the backward pass to keep
    t = scaled(v, t)
    if weights is not None:
        w, w_letters = weights  # its letters are among the intermediate's
        t = jnp.einsum(f"{mid},{w_letters}->{mid}", t, w.astype(t.dtype), out_sharding=mid_sharding)
    return jnp.einsum(
        f"{mid},{second[1]}->{out_letters}",
        t,
        second[0].astype(dtype),
        out_sharding=out_sharding,
    )


def explicit_spec(y: jax.Array) -> Any:
    """``y``'s partition spec when it lives on a mesh with ``Explicit`` axes, else ``None``."""
    sharding = jax.typeof(y).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    return sharding.spec


def _spec_for(letters: str, *operands: tuple[jax.Array, str], skip: str) -> PartitionSpec:
    """A spec for an einsum output of ``letters``: each axis sharded as in the first operand
    that has it (no mesh axis twice), ``skip`` (the rank) whole."""
    by_letter: dict[str, Any] = {}
    for array, names in operands:
        spec = tuple(jax.typeof(array).sharding.spec)
        spec = spec + (None,) * (len(names) - len(spec))
        for c, entry in zip(names, spec, strict=True):
            by_letter.setdefault(c, entry)
    used: set[str] = set()
    out = []
    for c in letters:
        entry = None if c == skip else by_letter.get(c)
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        if any(a in used for a in axes):
            entry, axes = None, ()
        used.update(axes)
        out.append(entry)
    return PartitionSpec(*out)


def _routed_term(
    x: jax.Array, xl: str, v: Adapted, vl: str, out: str
) -> tuple[jax.Array, jax.Array | None]:
    """The low-rank term of a routed weight: each example with its own adapter (``_routing``).

    Returns ``(term, out_scale)`` with the output multiplier (DoRA) gathered per
    example and laid out for the output.
    """
    route = v.route
    ids, scales = _routing.safe_ids(route), _routing.example_scales(route)
    example = xl[0]
    out_scale = None
    if v.out_scale is not None:
        per = route.rows(v.out_scale, ids)
        on = (route.ids >= 0).reshape((-1,) + (1,) * (per.ndim - 1))
        v = dataclasses.replace(v, out_scale=jnp.where(on, per, jnp.ones((), per.dtype)))
        out_scale = broadcast_out_scale(v, vl, out, example=example)

    def gathered() -> jax.Array:
        each = dataclasses.replace(v, a=route.rows(v.a, ids), b=route.rows(v.b, ids))
        return _low_rank_einsum(x, xl, each, vl, out, lead=example, weights=(scales, example))

    def grouped(k: int) -> jax.Array:
        slots, one_hot = _routing.compact(ids, k)
        slot = letters_for(1, skip=xl + vl + out)[0]
        each = dataclasses.replace(v, a=route.rows(v.a, slots), b=route.rows(v.b, slots))
        w = one_hot * scales[:, None]
        return _low_rank_einsum(x, xl, each, vl, out, lead=slot, weights=(w, example + slot))

    contracted = set(xl) - set(out)
    tokens = 1
    for c, n in zip(xl[1:], x.shape[1:], strict=True):
        tokens *= 1 if c in contracted else n
    sizes, with_gather = _routing.buckets(route, x.shape[0], tokens)
    branches = [functools.partial(grouped, k) for k in sizes] + [gathered] * with_gather
    if len(branches) == 1:
        return branches[0](), out_scale
    # the smallest bucket that holds the batch's distinct adapters, else the gather
    index = jnp.searchsorted(jnp.asarray(sizes), _routing.distinct(ids))
    return lax.switch(index, branches), out_scale


def dot_general(
    x: jax.Array,
    v: Adapted,
    *,
    weight_is_lhs: bool,
    dimension_numbers: Any,
    out_sharding: Any = None,
    custom_backward: bool = False,
    **_: Any,
) -> tuple[jax.Array, jax.Array | None]:
    """The low-rank term of ``dot_general(x, W)`` (or ``dot_general(W, x)``).

    Returns ``(term, out_scale)``: ``out_scale`` is the node's output multiplier
    laid out for the output (``None`` without one, or when the weight's output
    axes are contracted and it cannot be applied).
    """
    x_letters, v_letters, out = _dot_letters(x, v, weight_is_lhs, dimension_numbers)
    if v.route is not None:
        n_ids = v.route.ids.shape[0]
        contracted = x_letters[0] not in out
        if contracted or x.shape[0] != n_ids:
            found = "is contracted" if contracted else f"has {x.shape[0]} entries, not {n_ids}"
            raise ValueError(
                f"adapter_ids select one adapter per example along axis 0 of the activations, "
                f"but {v.path!r} meets an input of shape {x.shape} whose axis 0 {found}. "
                "Pass adapter_ids with one id per example of the batch the model sees."
            )
        return _routed_term(x, x_letters, v, v_letters, out)
    term = _low_rank_einsum(
        x, x_letters, v, v_letters, out, out_sharding=out_sharding, custom_backward=custom_backward
    )
    if v.out_scale is None:
        return term, None
    return term, broadcast_out_scale(v, v_letters, out)


def input_multiplier(
    x: jax.Array, v: Adapted, *, weight_is_lhs: bool, dimension_numbers: Any, **_: Any
) -> jax.Array | None:
    """The node's output multiplier laid out on ``x``, where the use contracts the weight's outputs.

    A tied embedding read as an output layer (``x @ E.T``) contracts the
    features that DoRA's multiplier scales: ``x @ (m·W)ᵀ = (x·m) @ Wᵀ``, so the
    multiplier scales the input instead. ``None`` when an axis it spans is
    neither contracted with ``x`` nor shared with it.
    """
    x_letters, v_letters, _ = _dot_letters(x, v, weight_is_lhs, dimension_numbers)
    return broadcast_out_scale(v, v_letters, x_letters)


def _dot_letters(
    x: jax.Array, v: Adapted, weight_is_lhs: bool, dimension_numbers: Any
) -> tuple[str, str, str]:
    """Einsum subscripts of ``x``, the weight's view and the output of their ``dot_general``."""
    (lc, rc), (lb, rb) = dimension_numbers
    if weight_is_lhs:
        (xc, vc), (xb, vb) = (rc, lc), (rb, lb)
    else:
        (xc, vc), (xb, vb) = (lc, rc), (lb, rb)
    letters = letters_for(x.ndim + v.base.ndim)
    xl = letters[: x.ndim]
    vl = letters[x.ndim :]
    for i, j in zip(xc, vc, strict=True):
        vl[j] = xl[i]
    for i, j in zip(xb, vb, strict=True):
        vl[j] = xl[i]
    batch = "".join(xl[i] for i in xb)
    x_free = "".join(c for k, c in enumerate(xl) if k not in xc and k not in xb)
    v_free = "".join(c for k, c in enumerate(vl) if k not in vc and k not in vb)
    out = batch + (v_free + x_free if weight_is_lhs else x_free + v_free)
    return "".join(xl), "".join(vl), out


_EXPERTS = (("s", 0), ("i", 0), ("o", 0))  # (experts, in, out): one stacked axis


def ragged_dot(
    x: jax.Array,
    v: Adapted,
    group_sizes: jax.Array,
    *,
    ragged_dot_dimension_numbers: Any,
    group_offset: Any = None,
    explicit_out: Any = None,
    **_: Any,
) -> jax.Array | None:
    """The low-rank term of a grouped matmul ``ragged_dot(x, W, group_sizes)``.

    Fits mixture-of-experts layers: ``x`` is ``(tokens, in)`` sorted by expert,
    ``W`` is ``(experts, in, out)`` with the experts as its stacked axis
    (``stacked_axes=1``), and ``group_sizes[e]`` rows of ``x`` go to expert
    ``e``. Each expert's factors then act on its own rows, with the same
    grouped matmul: ``ragged_dot(ragged_dot(x, a, g), b, g)``, the
    intermediate ``(tokens, rank)``. Other layouts return ``None``. On an
    ``Explicit`` mesh, ``explicit_out`` is the use's output spec; the
    intermediate keeps the tokens' sharding.
    """
    dn = ragged_dot_dimension_numbers
    fits = (
        v.route is None
        and v.out_scale is None
        and group_offset is None
        and v.roles == _EXPERTS
        and x.ndim == 2
        and dn.dot_dimension_numbers == (((1,), (1,)), ((), ()))
        and tuple(dn.lhs_ragged_dimensions) == (0,)
        and tuple(dn.rhs_group_dimensions) == (0,)
    )
    if not fits:
        return None
    dtype = jnp.promote_types(x.dtype, v.a.dtype)
    mid = None if explicit_out is None else _spec_for("tr", (x, "ti"), skip="r")
    t = lax.ragged_dot(x.astype(dtype), v.a.astype(dtype), group_sizes, out_sharding=mid)
    return lax.ragged_dot(scaled(v, t), v.b.astype(dtype), group_sizes, out_sharding=explicit_out)


def gather(
    indices: jax.Array, v: Adapted, **params: Any
) -> tuple[jax.Array, jax.Array | None] | None:
    """The low-rank term of an embedding lookup ``gather(W, indices)`` and DoRA's multiplier.

    Fits lookups that index only input axes (each with slice size 1, all of
    them collapsed) and take whole output and stacked axes: then
    ``gather(Δ, ids) = gather(a, ids) ⊗_r b``.
    """
    dnums = params["dimension_numbers"]
    if dnums.operand_batching_dims or dnums.start_indices_batching_dims:
        return None
    if v.route is not None:
        return None
    inputs = [d for d, (g, _) in enumerate(v.roles) if g == "i"]
    if sorted(dnums.collapsed_slice_dims) != inputs or not set(dnums.start_index_map) <= set(
        inputs
    ):
        return None
    slice_sizes = params["slice_sizes"]
    for d, n in enumerate(v.shape):
        if d not in inputs and slice_sizes[d] != n:
            return None
    # gather rows of `a`, laid out as the view's stacked + input axes in view order, then rank
    ns = v.n_stacked
    view_axes = [d for d, (g, _) in enumerate(v.roles) if g != "o"]
    a_axis = {("s", k): k for k in range(ns)} | {("i", k): ns + k for k in range(v.a.ndim - ns - 1)}
    a = jnp.transpose(v.a, [a_axis[v.roles[d]] for d in view_axes] + [v.a.ndim - 1])
    new_pos = {d: p for p, d in enumerate(view_axes)}
    rank = v.a.shape[-1]
    out_rank = indices.ndim - 1 + (a.ndim - len(inputs))
    offset = tuple(range(out_rank - (a.ndim - len(inputs)), out_rank))
    a_dnums = lax.GatherDimensionNumbers(
        offset_dims=offset,
        collapsed_slice_dims=tuple(new_pos[d] for d in inputs),
        start_index_map=tuple(new_pos[d] for d in dnums.start_index_map),
    )
    a_slices = (*tuple(1 if d in inputs else slice_sizes[d] for d in view_axes), rank)
    rows = lax.gather(
        a,
        indices,
        a_dnums,
        a_slices,
        indices_are_sorted=params["indices_are_sorted"],
        unique_indices=params["unique_indices"],
        mode=params["mode"],
        fill_value=0,
    )
    # rows: (*batch, *stacked-in-view-order, r); contract r with b, then lay out like the gather
    n_batch = indices.ndim - 1
    letters = letters_for(n_batch + v.base.ndim + 1)
    batch_l, view_l, r = letters[:n_batch], letters[n_batch:-1], letters[-1]
    rows_l = "".join(batch_l) + "".join(view_l[d] for d in view_axes if d not in inputs) + r
    role_letters = {v.roles[d]: view_l[d] for d in range(v.base.ndim)}
    _, sb = v.factor_letters(role_letters | {("i", k): "" for k in range(v.a.ndim - ns - 1)}, r)
    # output of the original gather: offset dims hold the view's non-collapsed axes in order
    kept = [view_l[d] for d in range(v.base.ndim) if d not in inputs]
    out_l, it_b, it_k = [], iter(batch_l), iter(kept)
    for p in range(n_batch + len(kept)):
        out_l.append(next(it_k) if p in dnums.offset_dims else next(it_b))
    dtype = jnp.promote_types(rows.dtype, v.b.dtype)
    term = jnp.einsum(f"{rows_l},{sb}->{''.join(out_l)}", rows.astype(dtype), v.b.astype(dtype))
    if v.out_scale is None:
        return scaled(v, term), None
    out_scale = broadcast_out_scale(v, "".join(view_l), "".join(out_l))
    return None if out_scale is None else (scaled(v, term), out_scale)


def conv(x: jax.Array, v: Adapted, **params: Any) -> tuple[jax.Array, jax.Array | None] | None:
    """The low-rank term of ``conv_general_dilated(x, W)`` and the output multiplier (DoRA's).

    Fits kernels whose only output axis is the conv's output-feature axis and
    whose other axes are all inputs (PEFT's conv LoRA). Without feature or batch
    groups the term is a conv to ``r`` channels, then ``b``. A grouped conv
    (depthwise: ``feature_group_count`` = channels) has no cheaper factored
    form: each group's ``r`` hidden channels would cost ``r`` times the conv.
    Its kernel is small (``in / groups`` input channels), so the term is the
    same conv with the delta kernel ``s·a⊗b``, built at the use (as a weight,
    never as an activation).
    """
    dnums = params["dimension_numbers"]
    if v.route is not None:
        return None
    out_axis = dnums.rhs_spec[0]
    if v.roles[out_axis] != ("o", 0) or v.b.ndim != 2 or v.n_stacked:
        return None
    grouped = params["feature_group_count"] != 1 or params["batch_group_count"] != 1
    conv_params = {
        k: params[k] for k in ("window_strides", "padding", "lhs_dilation", "rhs_dilation")
    }
    if grouped:
        delta = _adapted.delta(v)
        dtype = jnp.promote_types(x.dtype, v.a.dtype)
        term = lax.conv_general_dilated(
            x.astype(dtype),
            delta.astype(dtype),
            dimension_numbers=dnums,
            feature_group_count=params["feature_group_count"],
            batch_group_count=params["batch_group_count"],
            **conv_params,
        )
    else:
        # `a` as a kernel of the view's layout with `r` output features
        order = [v.roles[d][1] for d in range(v.base.ndim) if d != out_axis]
        a = jnp.transpose(v.a, [*order, v.a.ndim - 1])
        a = jnp.moveaxis(a, -1, out_axis)
        dtype = jnp.promote_types(x.dtype, a.dtype)
        hidden = lax.conv_general_dilated(
            x.astype(dtype), a.astype(dtype), dimension_numbers=dnums, **conv_params
        )
        feature = dnums.out_spec[1]
        hidden = jnp.moveaxis(hidden, feature, -1)
        term = scaled(v, jnp.moveaxis(hidden @ v.b.astype(dtype), -1, feature))
    if v.out_scale is None:
        return term, None
    letters = letters_for(v.base.ndim + term.ndim)
    view_l = "".join(letters[: v.base.ndim])
    out_l = list(letters[v.base.ndim :])
    out_l[dnums.out_spec[1]] = view_l[out_axis]
    out_scale = broadcast_out_scale(v, view_l, "".join(out_l))
    return None if out_scale is None else (term, out_scale)
