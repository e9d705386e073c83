"""``infer_layout``: each weight's stacked, input and output axes, read from how a function uses it.

A weight's layout (``LoraConfig(stacked_axes=..., input_axes=...)``) says which
of its axes index stacked layers or experts, which the layer contracts with its
input, and which it produces. A program states all three where it uses the
weight: ``dot_general`` contracts some axes and batches others, a convolution
names its kernel's input-feature and spatial axes, a gather indexes rows, and
``scan`` slices a stacked axis off for each layer. This module traces the
function once and follows every weight through the views it takes (casts,
transposes, reshapes, slices, nested calls, ``scan``/``cond``/``while``/``remat``/
``shard_map`` bodies) to those uses.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jcore

from jaxlora import _paths

_STACKED, _INPUT, _OUTPUT = "s", "i", "o"
_PASS_THROUGH = {
    "convert_element_type",
    "copy",
    "copy_p",
    "sharding_constraint",
    "optimization_barrier",
    "reduce_precision",
    # elementwise with another operand of the same shape or a broadcast one: a weight norm
    # or a scale multiplies the weight before its use, which keeps its axes
    "mul",
    "div",
    "add",
    "sub",
    "neg",
}
_CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call"}


@dataclasses.dataclass(frozen=True)
class _Track:
    """A view of weight ``weight``: view axis ``k`` covers the weight's axes ``groups[k]``."""

    weight: int
    groups: tuple[tuple[int, ...], ...]
    fixed: tuple[tuple[int, str], ...] = ()  # roles set on the way (a scan's sliced axis)


@dataclasses.dataclass
class _Uses:
    """What the traced program did with each weight."""

    roles: dict[int, list[dict[int, str]]]
    conflicted: set[int]  # a use that gives one weight axis two roles: no layout for it

    def add(self, track: _Track, roles: dict[int, str]) -> None:
        found = dict(track.fixed)
        for k, role in roles.items():
            for axis in track.groups[k]:
                if found.get(axis, role) != role:
                    self.conflicted.add(track.weight)
                found[axis] = role
        self.roles.setdefault(track.weight, []).append(found)


def infer_layout(fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any) -> dict:
    """Reads each weight's layout from how ``fn(params, *args, **kwargs)`` uses it.

    Traces ``fn`` once (abstractly: ``params`` and ``args`` may be arrays or
    ``jax.ShapeDtypeStruct``) and follows every floating-point weight of two or
    more axes to where it is used: the axes a matmul or ``ragged_dot`` contracts
    are inputs and the ones it batches (or a ``scan`` slices per layer) are
    stacked; a convolution's spatial and input-feature axes are inputs; a
    lookup's indexed axis is the input. The result goes straight into
    :class:`~jaxlora.LoraConfig`, so scanned layers, attention output kernels
    ``(heads, head_dim, d_model)`` and convolution kernels need no flags.

    Only layouts that differ from the default (no stacked axis, one input axis)
    are listed. A weight is left out when its uses disagree (a tied embedding
    looked up by rows and multiplied by its transpose), when its axes are not
    ordered ``[stacked..., inputs..., outputs...]`` (a ``(out, in)`` kernel),
    or when ``fn`` uses it in a way this reader does not follow; such a weight
    keeps the default or what the config states.

    Args:
        fn: the function ``lora_apply`` will wrap, ``fn(params, *args, **kwargs)``.
        params: the parameter tree (the same paths ``split`` sees).
        *args: example positional arguments (shapes and dtypes are what matter).
        **kwargs: example keyword arguments.

    Returns:
        ``{"stacked_axes": {regex: int}, "input_axes": {regex: int}}``, with one
        anchored regex per weight whose layout is not the default; pass it as
        ``LoraConfig(..., **layout)``.

    Raises:
        TypeError: if ``fn`` is not callable.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"layers": {"kernel": jnp.ones((3, 8, 8))},
        ...           "out": {"kernel": jnp.ones((2, 4, 8))}}
        >>> def fn(params, x):
        ...     x, _ = jax.lax.scan(lambda h, w: (h @ w, None), x, params["layers"]["kernel"])
        ...     return jnp.einsum("bhd,hdo->bo", x.reshape(-1, 2, 4), params["out"]["kernel"])
        >>> layout = jaxlora.infer_layout(fn, params, jnp.ones((5, 8)))
        >>> layout
        {'stacked_axes': {'^layers/kernel$': 1}, 'input_axes': {'^out/kernel$': 2}}
        >>> config = jaxlora.LoraConfig(rank=2, targets="kernel", **layout)
        >>> base, delta = jaxlora.split(params, config, key=jax.random.key(0))
        >>> delta["layers"]["kernel"].a.shape, delta["out"]["kernel"].a.shape
        ((3, 8, 2), (8, 2))
    """
    if not callable(fn):
        raise TypeError(f"infer_layout needs a callable fn(params, *args); got {fn!r}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_paths.is_box)
    arrays = [i for i, (_, leaf) in enumerate(flat) if _is_array(_paths.unbox(leaf))]

    # example arguments: arrays (or shapes) are traced, anything else (a flag) stays static
    arg_leaves, arg_def = jax.tree.flatten((args, kwargs))
    arg_arrays = [k for k, x in enumerate(arg_leaves) if _is_array(x)]

    def traced(values: list, arg_values: list) -> Any:
        slots = [_paths.rebox(leaf, _paths.unbox(leaf)) for _, leaf in flat]
        for i, value in zip(arrays, values, strict=True):
            slots[i] = _paths.rebox(slots[i], value)
        leaves = list(arg_leaves)
        for k, value in zip(arg_arrays, arg_values, strict=True):
            leaves[k] = value
        call_args, call_kwargs = arg_def.unflatten(leaves)
        return fn(treedef.unflatten(slots), *call_args, **call_kwargs)

    avals = [_abstract(_paths.unbox(flat[i][1])) for i in arrays]
    closed = jax.make_jaxpr(traced)(avals, [_abstract(arg_leaves[k]) for k in arg_arrays])
    uses = _Uses(roles={}, conflicted=set())
    weights = [k for k, a in enumerate(avals) if _paths.is_float_array(a) and len(a.shape) >= 2]
    inputs = [
        _Track(k, tuple((axis,) for axis in range(len(a.shape)))) if k in weights else None
        for k, a in enumerate(avals)
    ]
    inputs += [None] * (len(closed.jaxpr.invars) - len(inputs))
    _walk(closed.jaxpr, inputs, uses)

    stacked: dict[str, int] = {}
    input_axes: dict[str, int] = {}
    for k in weights:
        layout = _counts(uses, k, len(avals[k].shape), avals[k].shape)
        if layout is None:
            continue
        n_stacked, n_input = layout
        pattern = f"^{re.escape(_paths.path_str(flat[arrays[k]][0]))}$"
        if n_stacked:
            stacked[pattern] = n_stacked
        if n_input != 1 or len(avals[k].shape) - n_stacked >= 4:
            input_axes[pattern] = n_input
    return {"stacked_axes": stacked, "input_axes": input_axes}


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _counts(uses: _Uses, k: int, ndim: int, shape: Sequence[int]) -> tuple[int, int] | None:
    """``(stacked, inputs)`` for weight ``k``, or ``None`` (unused or inconsistent)."""
    if k in uses.conflicted or k not in uses.roles:
        return None
    roles: dict[int, str] = {}
    for found in uses.roles[k]:
        for axis, role in found.items():
            if roles.setdefault(axis, role) != role:
                return None
    order = []
    for axis in range(ndim):
        role = roles.get(axis)
        if role is None:
            if shape[axis] != 1:
                return None
            role = order[-1] if order else _INPUT  # a unit axis joins its neighbour
        order.append(role)
    text = "".join(order)
    match = re.fullmatch(r"(s*)(i+)(o+)", text)
    if match is None:
        return None
    return len(match.group(1)), len(match.group(2))


# ------------------------------------------------------------------ the walk


def _walk(jaxpr: jcore.Jaxpr, inputs: Sequence[Any], uses: _Uses) -> list:
    """Evaluates ``jaxpr`` on tracks (``None`` for values not derived from a weight)."""
    env: dict[Any, Any] = {}
    for var, value in zip(jaxpr.invars, inputs, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [None if isinstance(v, jcore.Literal) else env.get(v) for v in eqn.invars]
        outs = _eqn(eqn, invals, uses) if any(invals) else [None] * len(eqn.outvars)
        for var, value in zip(eqn.outvars, outs, strict=True):
            env[var] = value
    return [None if isinstance(v, jcore.Literal) else env.get(v) for v in jaxpr.outvars]


def _eqn(eqn: Any, invals: list, uses: _Uses) -> list:
    name = eqn.primitive.name
    outs = [None] * len(eqn.outvars)
    handler = _HANDLERS.get(name)
    if handler is not None:
        return handler(eqn, invals, uses)
    if name in _PASS_THROUGH:
        for j, out in enumerate(eqn.outvars):
            same = [t for t in invals if t is not None]
            shape = tuple(out.aval.shape)
            if name == "optimization_barrier":
                outs[j] = invals[j]
            elif len(same) == 1 and _shape_of(eqn, invals, same[0]) == shape:
                outs[j] = same[0]
    # anything else (a weight norm's sum of squares, a reduction) does not decide the layout
    return outs


def _shape_of(eqn: Any, invals: list, track: _Track) -> tuple[int, ...]:
    index = next(k for k, t in enumerate(invals) if t is track)
    return tuple(eqn.invars[index].aval.shape)


def _transpose(eqn: Any, invals: list, uses: _Uses) -> list:
    (t,) = invals
    perm = eqn.params["permutation"]
    return [dataclasses.replace(t, groups=tuple(t.groups[p] for p in perm))]


def _reshape(eqn: Any, invals: list, uses: _Uses) -> list:
    t = invals[0]
    if t is None or any(invals[1:]):
        return [None]
    if eqn.primitive.name == "broadcast_in_dim":
        shape_in = tuple(eqn.invars[0].aval.shape)
        dims = eqn.params["broadcast_dimensions"]
        shape = tuple(eqn.outvars[0].aval.shape)
        if any(shape[d] != shape_in[k] for k, d in enumerate(dims)):
            return [None]  # a real broadcast
        groups = [()] * len(shape)
        for k, d in enumerate(dims):
            groups[d] = t.groups[k]
        if any(not g and shape[d] != 1 for d, g in enumerate(groups)):
            return [None]
        return [dataclasses.replace(t, groups=tuple(groups))]
    groups = _regroup(tuple(eqn.invars[0].aval.shape), tuple(eqn.outvars[0].aval.shape), t.groups)
    return [None if groups is None else dataclasses.replace(t, groups=groups)]


def _regroup(
    shape_in: tuple[int, ...], shape_out: tuple[int, ...], groups: tuple[tuple[int, ...], ...]
) -> tuple[tuple[int, ...], ...] | None:
    """The weight axes each output axis of a reshape covers (merged runs and split axes)."""
    out: list[tuple[int, ...]] = []
    i = j = 0
    while i < len(shape_in) or j < len(shape_out):
        if j < len(shape_out) and shape_out[j] == 1:
            out.append(())
            j += 1
            continue
        if i < len(shape_in) and shape_in[i] == 1:
            i += 1
            continue
        if i == len(shape_in) or j == len(shape_out):
            return None
        i0, j0 = i, j
        p_in, p_out = shape_in[i], shape_out[j]
        i, j = i + 1, j + 1
        while p_in != p_out:
            if p_in < p_out:
                if i == len(shape_in):
                    return None
                p_in *= shape_in[i]
                i += 1
            else:
                if j == len(shape_out):
                    return None
                p_out *= shape_out[j]
                j += 1
        covered = tuple(axis for g in groups[i0:i] for axis in g)
        out.extend([covered] * (j - j0))
    return tuple(out) if math.prod(shape_in) == math.prod(shape_out) else None


def _slice(eqn: Any, invals: list, uses: _Uses) -> list:
    """``slice``/``dynamic_slice``: an axis cut down to one entry indexes a stack (``w[i]``)."""
    t = invals[0]
    if t is None or any(invals[1:]):
        return [None]
    shape_in, shape_out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    picked = [d for d, (n, m) in enumerate(zip(shape_in, shape_out, strict=True)) if m == 1 < n]
    fixed = (*t.fixed, *((axis, _STACKED) for d in picked for axis in t.groups[d]))
    groups = tuple(() if d in picked else g for d, g in enumerate(t.groups))
    return [_Track(t.weight, groups, fixed)]


def _dot_general(eqn: Any, invals: list, uses: _Uses) -> list:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for t, contract, batch in zip(invals, (lc, rc), (lb, rb), strict=True):
        if t is not None:
            roles = {k: _OUTPUT for k in range(len(t.groups))}
            roles.update({k: _INPUT for k in contract})
            roles.update({k: _STACKED for k in batch})
            uses.add(t, roles)
    return [None]


def _ragged_dot(eqn: Any, invals: list, uses: _Uses) -> list:
    t = invals[1]
    if invals[0] is not None or invals[2] is not None:
        return [None]
    if t is not None:
        dn = eqn.params["ragged_dot_dimension_numbers"]
        (_, rc), (_, rb) = dn.dot_dimension_numbers
        roles = {k: _OUTPUT for k in range(len(t.groups))}
        roles.update({k: _INPUT for k in rc})
        roles.update({k: _STACKED for k in (*rb, *dn.rhs_group_dimensions)})
        uses.add(t, roles)
    return [None]


def _conv(eqn: Any, invals: list, uses: _Uses) -> list:
    t = invals[1]
    if t is not None and invals[0] is None:
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
        roles = {k: _INPUT for k in rhs_spec[1:]}
        roles[rhs_spec[0]] = _OUTPUT
        uses.add(t, roles)
    return [None]


def _gather(eqn: Any, invals: list, uses: _Uses) -> list:
    t = invals[0]
    if t is not None and invals[1] is None:
        indexed = set(eqn.params["dimension_numbers"].start_index_map)
        uses.add(t, {k: _INPUT if k in indexed else _OUTPUT for k in range(len(t.groups))})
    return [None]


def _body(closed: Any) -> tuple[jcore.Jaxpr, Any]:
    if isinstance(closed, jcore.ClosedJaxpr):
        return closed.jaxpr, closed
    return closed, closed


def _call(eqn: Any, invals: list, uses: _Uses) -> list:
    p = eqn.params
    jaxpr, _ = _body(p.get("jaxpr", p.get("call_jaxpr")))
    return _walk(jaxpr, invals, uses)


def _scan(eqn: Any, invals: list, uses: _Uses) -> list:
    p = eqn.params
    jaxpr, _ = _body(p["jaxpr"])
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    inner = list(invals)
    for k in range(n_consts, n_consts + n_carry):
        inner[k] = None  # a weight in the carry changes per step: not a layout use
    for k in range(n_consts + n_carry, len(invals)):
        t = invals[k]
        if t is not None:
            fixed = (*t.fixed, *((axis, _STACKED) for axis in t.groups[0]))
            inner[k] = _Track(t.weight, t.groups[1:], fixed)
    _walk(jaxpr, inner, uses)
    return [None] * len(eqn.outvars)


def _while(eqn: Any, invals: list, uses: _Uses) -> list:
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    body, _ = _body(p["body_jaxpr"])
    n_carry = len(invals) - nc - nb
    _walk(body, [*invals[nc : nc + nb], *[None] * n_carry], uses)
    return [None] * len(eqn.outvars)


def _cond(eqn: Any, invals: list, uses: _Uses) -> list:
    for branch in eqn.params["branches"]:
        jaxpr, _ = _body(branch)
        _walk(jaxpr, invals[1:], uses)
    return [None] * len(eqn.outvars)


def _shard_map(eqn: Any, invals: list, uses: _Uses) -> list:
    jaxpr, _ = _body(eqn.params["jaxpr"])
    _walk(jaxpr, invals, uses)
    return [None] * len(eqn.outvars)


_HANDLERS: dict[str, Callable[[Any, list, _Uses], list]] = {
    "transpose": _transpose,
    "reshape": _reshape,
    "squeeze": _reshape,
    "expand_dims": _reshape,
    "broadcast_in_dim": _reshape,
    "slice": _slice,
    "dynamic_slice": _slice,
    "dot_general": _dot_general,
    "ragged_dot_general": _ragged_dot,
    "conv_general_dilated": _conv,
    "gather": _gather,
    **{name: _call for name in _CALLS},
    "remat2": _call,
    "checkpoint": _call,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
    "shard_map": _shard_map,
}
