"""The interpreter: evaluates a jaxpr in which some inputs are ``Adapted`` weights.

This package's modules are the ones that touch JAX's jaxpr data structures
(through ``jax.extend.core``) and the parameter names of its primitives. Those
names are not a stable API: the tests pin the JAX range in ``pyproject.toml``.
Here: the evaluation loop and the higher-order primitives (nested calls,
``remat``, ``scan``, ``while``, ``cond``, ``shard_map``), whose bodies are
evaluated again; the rules for single uses of a weight are in ``_uses``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore
from jax.sharding import PartitionSpec as P

from jaxlora._engine import _adapted, _uses
from jaxlora._engine._adapted import Adapted
from jaxlora._engine._context import Context, Squared, bind
from jaxlora._engine._lazy import Lazy

_INLINED_CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call"}


def evaluate(jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[Any], ctx: Context) -> list:
    """Evaluates ``jaxpr``; ``Adapted`` inputs flow through views and meet factored rules."""
    env: dict[Any, Any] = {}

    def read(var: Any) -> Any:
        return var.val if isinstance(var, jcore.Literal) else env[var]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(v, Adapted | Squared) for v in invals):
            outvals = _adapted_eqn(eqn, invals, ctx)
        else:
            outvals = bind(eqn, invals)
        for var, value in zip(eqn.outvars, outvals, strict=True):
            env[var] = value
    return [_plain(read(v), "output", ctx) for v in jaxpr.outvars]


def _plain(value: Any, primitive: str, ctx: Context) -> Any:
    if isinstance(value, Squared):
        merged = ctx.fallback(primitive, value.v)
        return merged * merged
    return ctx.fallback(primitive, value) if isinstance(value, Adapted) else value


def _adapted_eqn(eqn: Any, invals: list, ctx: Context) -> list:
    name = eqn.primitive.name
    if name != "dot_general":  # only the matmul rule reads a routed weight's pending layer
        invals = [_adapted.resolved(v) for v in invals]
    rule = _RULES.get(name)
    if rule is not None:
        out = rule(eqn, invals, ctx)
        if out is not None:
            return out
    return bind(eqn, [_plain(v, name, ctx) for v in invals])


# ------------------------------------------------------------------ control flow


def _inline(params: dict, invals: list, ctx: Context) -> list:
    """Evaluates a call's body in place (nested ``jit``, custom derivative wrappers)."""
    closed = params.get("jaxpr", params.get("call_jaxpr"))
    if isinstance(closed, jcore.ClosedJaxpr):
        return evaluate(closed.jaxpr, closed.consts, invals, ctx)
    return evaluate(closed, [], invals, ctx)


def _call(eqn: Any, invals: list, ctx: Context) -> list | None:
    return _inline(eqn.params, invals, ctx)


def _remat(eqn: Any, invals: list, ctx: Context) -> list | None:
    jaxpr = eqn.params["jaxpr"]
    key = ctx.next_key()

    def body(*args: Any) -> list:
        return evaluate(jaxpr, [], args, ctx.child(key))

    policy = eqn.params.get("policy")
    return list(
        jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True), policy=policy)(
            *invals
        )
    )


def _scan(eqn: Any, invals: list, ctx: Context) -> list | None:
    p = eqn.params
    closed, n_consts, n_carry, length = p["jaxpr"], p["num_consts"], p["num_carry"], p["length"]
    consts = invals[:n_consts]
    init = [_plain(v, "scan carry", ctx) for v in invals[n_consts : n_consts + n_carry]]
    # A routed weight's factors hold every adapter of the pool: moving their layer axis to the
    # front for scan would copy the whole pool on every call. They enter the body whole and
    # each layer indexes its own slice, which XLA fuses into the gather of the batch's adapters.
    pools = [_pooled(v) for v in invals[n_consts + n_carry :]]
    xs = [
        _sliceable(v if pool is None else pool[0], length, ctx)
        for v, pool in zip(invals[n_consts + n_carry :], pools, strict=True)
    ]
    for x, pool in zip(xs, pools, strict=True):
        if pool is not None and not isinstance(x, Adapted):  # its base could not be sliced
            ctx.fallback("scan over a quantized weight whose blocks span layers", pool[1])
    key = ctx.next_key()
    keys = None if key is None else jax.random.split(key, length)

    def body(carry: list, x: tuple) -> tuple:
        xs_i, key_i, i = x
        xs_i = [
            v if pool is None else _pool_layer(v, *pool[1:], i)
            for v, pool in zip(xs_i, pools, strict=True)
        ]
        out = evaluate(closed.jaxpr, closed.consts, [*consts, *carry, *xs_i], ctx.child(key_i))
        return out[:n_carry], out[n_carry:]

    carry, ys = lax.scan(
        body,
        init,
        (xs, keys, jnp.arange(length)),
        length=length,
        reverse=p["reverse"],
        unroll=p["unroll"],
    )
    return [*carry, *ys]


def _pooled(v: Any) -> tuple[Adapted, Adapted, int] | None:
    """``(the weight without its factors, the routed weight, its scanned stacked axis)``.

    ``None`` unless ``v`` is a routed weight scanned over a stacked axis.
    """
    if not (isinstance(v, Adapted) and v.route is not None and v.has_factors):
        return None
    group, k = v.roles[0]
    if group != "s":
        return None  # _sliceable falls back
    bare = dataclasses.replace(v, a=None, b=None, out_scale=None, route=None)
    return bare, v, k


def _pool_layer(sliced: Adapted, v: Adapted, k: int, i: jax.Array) -> Adapted:
    """Layer ``i`` of the routed weight ``v`` (stacked axis ``k``), on the scan's base slice.

    The layer is only recorded in the route; the matmul rule picks it together
    with the batch's adapters, other uses first (``_adapted.resolved``).
    """
    roles = tuple((g, j - (g == "s" and j > k)) for g, j in v.roles[1:])
    route = dataclasses.replace(v.route, layer=i, layer_axis=v.n_lead + k)
    return dataclasses.replace(v, base=sliced.base, roles=roles, route=route)


def _sliceable(v: Any, length: int, ctx: Context) -> Any:
    """An ``Adapted`` scanned over its leading axis, arranged so that ``scan`` can slice it."""
    if not isinstance(v, Adapted):
        return v
    if v.out_scale is not None and v.has_factors and v.roles[0][0] == "s":
        axis = v.n_lead + v.roles[0][1]
        v = dataclasses.replace(v, out_scale=jnp.moveaxis(v.out_scale, axis, 0))
    base = v.base
    if isinstance(base, Lazy):
        base = base.per_layer(length)
        if base is None:
            return ctx.fallback("scan over a quantized weight whose blocks span layers", v)
    if not v.has_factors:
        return dataclasses.replace(v, base=base)
    group, k = v.roles[0]
    if group != "s":
        return ctx.fallback("scan over a non-stacked axis", v)
    a = jnp.moveaxis(v.a, v.n_lead + k, 0)
    b = jnp.moveaxis(v.b, v.n_lead + k, 0)
    roles = tuple((g, j - (g == "s" and j > k)) for g, j in v.roles[1:])
    return dataclasses.replace(v, base=base, a=a, b=b, roles=roles)


def _while(eqn: Any, invals: list, ctx: Context) -> list | None:
    p = eqn.params
    cond, body = p["cond_jaxpr"], p["body_jaxpr"]
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts = invals[:nc], invals[nc : nc + nb]
    init = [_plain(v, "while carry", ctx) for v in invals[nc + nb :]]
    key = ctx.next_key()

    def cond_fun(state: tuple) -> Any:
        _i, carry = state
        return evaluate(cond.jaxpr, cond.consts, [*cond_consts, *carry], ctx.child(None))[0]

    def body_fun(state: tuple) -> tuple:
        i, carry = state
        key_i = None if key is None else jax.random.fold_in(key, i)
        # JAX differentiates a while loop in forward mode only: no custom_vjp in its body
        body_ctx = ctx.child(key_i, forward_mode=True)
        return i + 1, evaluate(body.jaxpr, body.consts, [*body_consts, *carry], body_ctx)

    _, out = lax.while_loop(cond_fun, body_fun, (jnp.int32(0), init))
    return list(out)


def _cond(eqn: Any, invals: list, ctx: Context) -> list | None:
    index, *ops = invals
    key = ctx.next_key()
    branches = [
        (lambda *args, br=br: evaluate(br.jaxpr, br.consts, args, ctx.child(key)))
        for br in eqn.params["branches"]
    ]
    return list(lax.switch(index, branches, *ops))


def _shard_map(eqn: Any, invals: list, ctx: Context) -> list | None:
    """A ``shard_map`` body run on each shard's slice of the weight and of its factors.

    The factors are split like the weight's axes of their roles
    (``_adapted.factor_specs``), so that a shard's slice of ``a ⊗ b`` is the
    delta of its slice of ``W``. Collectives in the body then reduce the
    low-rank terms with the frozen ones.
    """
    p = eqn.params
    unsliced = lambda v: isinstance(v.base, Lazy) or v.route is not None
    if any(isinstance(v, Adapted) and unsliced(v) for v in invals):
        return None  # a quantized base's blocks and a pool of adapters are not sliced here
    operands, specs, slots = [], [], []
    for v, spec in zip(invals, p["in_specs"], strict=True):
        if not isinstance(v, Adapted):
            slots.append(len(operands))
            operands.append(v)
            specs.append(spec)
            continue
        parts = _adapted.factor_specs(v, spec)
        slots.append((v, len(operands), len(parts)))
        operands.extend(part for part, _ in parts)
        specs.extend(s for _, s in parts)
    key = ctx.next_key()
    key_data = None if key is None else jax.random.key_data(key)
    manual = tuple(sorted(p["newly_manual_axes"]))

    def body(*args: Any) -> tuple:
        *args, raw = args
        inner_key = None
        if raw is not None:  # a different dropout mask on each shard
            inner_key = jax.random.wrap_key_data(raw)
            for name in manual:
                inner_key = jax.random.fold_in(inner_key, lax.axis_index(name))
        values = []
        for slot in slots:
            if isinstance(slot, int):
                values.append(args[slot])
                continue
            v, start, n = slot
            local = args[start : start + n]
            out_scale = local[3] if n == 4 else None
            values.append(
                dataclasses.replace(v, base=local[0], a=local[1], b=local[2], out_scale=out_scale)
            )
        return tuple(evaluate(p["jaxpr"], [], values, ctx.child(inner_key)))

    mapped = jax.shard_map(
        body,
        mesh=p["mesh"],
        in_specs=(*specs, P()),
        out_specs=tuple(p["out_specs"]),
        check_vma=p["check_vma"],
        axis_names=set(manual),
    )
    return list(mapped(*operands, key_data))


_RULES: dict[str, Callable[[Any, list, Context], list | None]] = {
    **_uses.RULES,
    **{name: _call for name in _INLINED_CALLS},
    "remat2": _remat,
    "checkpoint": _remat,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
    "shard_map": _shard_map,
}
