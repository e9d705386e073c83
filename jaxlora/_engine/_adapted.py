"""``Adapted``: a view of an adapted weight, kept in factored form.

The interpreter holds one of these wherever the traced program holds a
targeted weight ``W`` or a view of it (a transpose, reshape, cast, squeeze).
It never builds ``W + s·a@b``; it keeps

* ``base``: the view of the frozen weight, exactly as the program computes it;
* ``a``: ``(*S, *I, r)`` and ``b``: ``(*S, r, *O)``: the low-rank factors, whose
  stacked (``S``), input (``I``) and output (``O``) axes are the *role axes*;
* ``roles``: for each axis of the view, which role axis it is.

so that the view's value is ``base + scale · (a ⊗_r b)`` with the role axes
arranged in the view's order. View ops that keep each role's axes together
(and in order) map to cheap reshapes of the factors; rules for the ops that
consume a weight (``dot_general``, ``gather``, ``conv``) read the roles to
emit the factored computation.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxlora._engine._lazy import Lazy, value_of
from jaxlora._engine._routing import Route
from jaxlora._node import AdapterNode
from jaxlora.quant import QuantizedArray

Role = tuple[str, int]  # ("s" | "i" | "o", index within that role's axes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapted:
    """A (view of an) adapted weight in factored form; see the module docstring."""

    base: Any  # an array, or a Lazy quantized weight
    a: jax.Array | None  # None: a quantized weight without an adapter
    b: jax.Array | None
    scale: float = dataclasses.field(metadata=dict(static=True))  # the node's (static) scale
    roles: tuple[Role, ...] = dataclasses.field(metadata=dict(static=True))
    path: str = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    out_scale: jax.Array | None = None  # ([N], *S, *O): multiplies the adapted weight's outputs
    # several adapters in one batch (adapter_ids): a, b and out_scale carry a leading pool
    # axis N, one entry per adapter, and the route says which example uses which (_routing)
    route: Any = None

    @property
    def has_factors(self) -> bool:
        return self.a is not None

    @property
    def n_stacked(self) -> int:
        return sum(1 for g, _ in self.roles if g == "s")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self) -> Any:
        return self.base.dtype

    @property
    def n_lead(self) -> int:
        """1 when the factors carry a leading pool axis (routed adapters), else 0."""
        return int(self.route is not None)

    def factor_letters(
        self, letters: dict[Role, str], rank: str, lead: str = ""
    ) -> tuple[str, str]:
        """Einsum subscripts of ``a`` and ``b`` given a letter for every role axis.

        ``lead`` names the factors' leading axis when they have one (routed).
        """
        e = lead if self.n_lead else ""
        skip = self.n_lead + self.n_stacked
        s = "".join(letters[("s", k)] for k in range(self.n_stacked))
        i = "".join(letters[("i", k)] for k in range(self.a.ndim - skip - 1))
        o = "".join(letters[("o", k)] for k in range(self.b.ndim - skip - 1))
        return e + s + i + rank, e + s + rank + o


def from_node(
    weight: Any,
    node: AdapterNode,
    path: str,
    adapter_ids: jax.Array | None = None,
    routing: str = "auto",
) -> Adapted:
    """The ``Adapted`` value of a weight as the program first sees it.

    With ``adapter_ids`` (a stacked node), the factors keep the stack's leading
    pool axis and a :class:`~jaxlora._engine._routing.Route` says that example
    ``i`` uses adapter ``adapter_ids[i]``, computed the ``routing`` way.
    """
    layout = node.layout
    routed = adapter_ids is not None
    base = _lazy_if_quantized(weight)
    route = None
    if routed:
        a, b, scales, out_scale = node.pooled(value_of(base) if _needs_weight(node) else None)
        route = Route(jnp.asarray(adapter_ids, jnp.int32), scales, routing)
        scale = 1.0  # each adapter's scale is applied per example, from route.scales
    else:
        a, b = node.factors()
        scale = float(node.scale)
        out_scale = node.output_scale(value_of(base)) if _needs_weight(node) else None
    rank = a.shape[-1]
    lead = a.shape[:1] if routed else ()
    if out_scale is not None:
        out_scale = out_scale.reshape(*lead, *layout.stacked, *layout.outputs)
    ns, ni = len(layout.stacked), len(layout.inputs)
    roles = (
        [("s", k) for k in range(ns)]
        + [("i", k) for k in range(ni)]
        + [("o", k) for k in range(len(layout.outputs))]
    )
    a = a.reshape(*lead, *layout.stacked, *layout.inputs, rank)
    b = b.reshape(*lead, *layout.stacked, rank, *layout.outputs)
    return Adapted(base, a, b, scale, tuple(roles), path, node.dropout, out_scale, route)


def resolved(v: Any) -> Any:
    """``v`` with a routed weight's pending layer picked (for uses other than a matmul)."""
    if not isinstance(v, Adapted) or v.route is None or v.route.layer is None:
        return v
    route = v.route
    return dataclasses.replace(
        v,
        a=route.picked(v.a),
        b=route.picked(v.b),
        out_scale=route.picked(v.out_scale),
        route=dataclasses.replace(route, layer=None, layer_axis=0),
    )


def _needs_weight(node: AdapterNode) -> bool:
    """Whether the node multiplies its outputs by something computed from the weight (DoRA)."""
    inner = getattr(node, "inner", node)  # a stacked node's adapters
    return type(inner).output_scale is not AdapterNode.output_scale


def from_quantized(weight: Any, path: str) -> Adapted:
    """A quantized base weight without an adapter: only dequantized at its uses."""
    return Adapted(Lazy.of(weight), None, None, 1.0, (), path)


def _lazy_if_quantized(weight: Any) -> Any:
    return Lazy.of(weight) if isinstance(weight, QuantizedArray) else weight


def letters_for(n: int, *, skip: str = "") -> list[str]:
    """``n`` distinct einsum letters, none of them in ``skip``."""
    pool = [c for c in string.ascii_letters if c not in skip]
    if n > len(pool):
        raise ValueError(f"an einsum with {n} axes is beyond this engine's {len(pool)} letters")
    return pool[:n]


def scaled(v: Adapted, x: jax.Array) -> jax.Array:
    """``x`` times the view's (static) scale, in ``x``'s dtype; no op for scale 1."""
    return x if v.scale == 1.0 else x * jnp.asarray(v.scale, x.dtype)


def delta(v: Adapted) -> jax.Array:
    """``scale · a⊗b`` in the view's axis order, in float32 (a weight-sized array)."""
    letters = dict(zip(v.roles, letters_for(len(v.roles) + 1), strict=False))
    rank = letters_for(len(v.roles) + 1)[-1]
    sa, sb = v.factor_letters(letters, rank)
    out = "".join(letters[role] for role in v.roles)
    product = jnp.einsum(
        f"{sa},{sb}->{out}",
        v.a.astype(jnp.float32),
        v.b.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return scaled(v, product)


def materialize(v: Adapted) -> jax.Array:
    """``base + scale · a@b`` in the view's axis order, computed in float32, cast back."""
    base = value_of(v.base)
    if not v.has_factors:
        return base
    letters = dict(zip(v.roles, letters_for(len(v.roles) + 1), strict=False))
    merged = base.astype(jnp.float32) + delta(v)
    if v.out_scale is not None:
        view = "".join(letters[role] for role in v.roles)
        merged = merged * broadcast_out_scale(v, view, view)
    return merged.astype(base.dtype)


def broadcast_out_scale(
    v: Adapted, v_letters: str, out_letters: str, example: str = ""
) -> jax.Array | None:
    """``v.out_scale`` laid out for an output with einsum subscripts ``out_letters``.

    ``v_letters`` name the view's axes and ``example`` the activations' example
    axis (routed adapters: ``v.out_scale`` has been gathered per example).
    ``None`` when an output axis of the weight does not reach the output (it
    is contracted).
    """
    assert v.out_scale is not None
    letters = dict(zip(v.roles, v_letters, strict=True))
    ns, e = v.n_stacked, v.n_lead
    n_out = v.out_scale.ndim - ns - e
    so = (
        (example if e else "")
        + "".join(letters[("s", k)] for k in range(ns))
        + "".join(letters[("o", k)] for k in range(n_out))
    )
    if any(c not in out_letters for c in so):
        return None
    order = "".join(c for c in out_letters if c in so)
    t = jnp.einsum(f"{so}->{order}", v.out_scale)
    return t.reshape([t.shape[order.index(c)] if c in so else 1 for c in out_letters])


def along_axis(v: Adapted, d: int, op: Any) -> Adapted:
    """``v`` with ``op(array, axis)`` applied to each factor that holds view axis ``d``.

    An input axis lives in ``a``, an output axis in ``b`` (and ``out_scale``), a
    stacked axis in all of them. Ops that act on one axis independently of the
    others (slicing it, gathering its shards) then act on ``a ⊗ b`` alike.
    """
    group, k = v.roles[d]
    e, ns = v.n_lead, v.n_stacked
    a, b, out_scale = v.a, v.b, v.out_scale
    if group in ("s", "i"):
        a = op(a, e + k if group == "s" else e + ns + k)
    if group in ("s", "o"):
        b = op(b, e + k if group == "s" else e + ns + 1 + k)
        if out_scale is not None:
            out_scale = op(out_scale, e + k if group == "s" else e + ns + k)
    return dataclasses.replace(v, a=a, b=b, out_scale=out_scale)


def factor_specs(v: Adapted, spec: Any) -> list[tuple[Any, PartitionSpec]]:
    """``[(base, spec), (a, spec_a), (b, spec_b)]`` (and DoRA's ``out_scale``) for ``spec``.

    Each factor axis is sharded like the weight's axis of the same role (``a``'s
    input axes like the weight's inputs, ``b``'s outputs like its outputs, both
    stacked axes like its stacked ones; the rank axis whole), so that each
    shard's slice of ``a ⊗ b`` is the delta of its slice of the weight.
    """
    spec = PartitionSpec(*spec)
    if not v.has_factors:
        return [(v.base, spec)]
    entries = (*spec, *(None,) * (len(v.shape) - len(spec)))
    by_role = dict(zip(v.roles, entries, strict=True))
    ns = v.n_stacked
    n_in, n_out = v.a.ndim - ns - 1, v.b.ndim - ns - 1
    stacked = [by_role[("s", k)] for k in range(ns)]
    inputs = [by_role[("i", k)] for k in range(n_in)]
    outputs = [by_role[("o", k)] for k in range(n_out)]
    parts = [
        (v.base, spec),
        (v.a, PartitionSpec(*stacked, *inputs, None)),
        (v.b, PartitionSpec(*stacked, None, *outputs)),
    ]
    if v.out_scale is not None:
        parts.append((v.out_scale, PartitionSpec(*stacked, *outputs)))
    return parts


# ------------------------------------------------------------------ view ops


def transpose(v: Adapted, base: Any, permutation: tuple[int, ...]) -> Adapted:
    if not v.has_factors:
        return dataclasses.replace(v, base=base)
    return dataclasses.replace(v, base=base, roles=tuple(v.roles[p] for p in permutation))


def reshape(v: Adapted, base: Any, new_shape: tuple[int, ...]) -> Adapted | None:
    """The view after a row-major reshape, or ``None`` if the reshape mixes role axes.

    Size-1 axes are dropped from the factors; the new shape's size-1 axes become
    new size-1 output axes. The other axes are grouped into runs whose sizes
    multiply to the same number on both sides. Each run must hold axes of one
    role that are consecutive, in order, within that role: then reshaping the
    factors reshapes the weight's delta the same way.
    """
    if not v.has_factors:
        return dataclasses.replace(v, base=base)
    ns, e = v.n_stacked, v.n_lead
    lead = v.a.shape[:e]
    sizes = {"s": v.a.shape[e : e + ns], "i": v.a.shape[e + ns : -1], "o": v.b.shape[e + ns + 1 :]}
    live = {kind: [k for k, n in enumerate(ks) if n != 1] for kind, ks in sizes.items()}
    old = [(n, (g, live[g].index(k))) for n, (g, k) in zip(v.shape, v.roles, strict=True) if n != 1]
    runs = _runs([n for n, _ in old], [n for n in new_shape if n != 1])
    if runs is None:
        return None
    pieces: dict[str, list[tuple[int, list[int]]]] = {"s": [], "i": [], "o": []}
    run_roles = []
    position = 0
    for n_old, new_sizes in runs:
        group = [role for _, role in old[position : position + n_old]]
        position += n_old
        kind, first = group[0]
        if group != [(kind, first + m) for m in range(n_old)]:
            return None
        pieces[kind].append((first, new_sizes))
        run_roles.append((kind, first))
    new_sizes_of: dict[str, list[int]] = {}
    start_of: dict[tuple[str, int], int] = {}
    for kind, runs_of_kind in pieces.items():
        flat: list[int] = []
        for first, new_sizes in sorted(runs_of_kind):
            start_of[(kind, first)] = len(flat)
            flat.extend(new_sizes)
        new_sizes_of[kind] = flat
    roles: list[Role] = []
    run_iter = iter(zip(run_roles, [r[1] for r in runs], strict=True))
    pending: list[Role] = []
    for n in new_shape:
        if n == 1:
            roles.append(("o", len(new_sizes_of["o"])))
            new_sizes_of["o"].append(1)
            continue
        if not pending:
            (kind, first), new_sizes = next(run_iter)
            start = start_of[(kind, first)]
            pending = [(kind, start + m) for m in range(len(new_sizes))]
        roles.append(pending.pop(0))
    rank = v.a.shape[-1]
    a = v.a.reshape(*lead, *new_sizes_of["s"], *new_sizes_of["i"], rank)
    b = v.b.reshape(*lead, *new_sizes_of["s"], rank, *new_sizes_of["o"])
    out_scale = v.out_scale
    if out_scale is not None:
        out_scale = out_scale.reshape(*lead, *new_sizes_of["s"], *new_sizes_of["o"])
    return dataclasses.replace(v, base=base, a=a, b=b, roles=tuple(roles), out_scale=out_scale)


def _runs(old: list[int], new: list[int]) -> list[tuple[int, list[int]]] | None:
    """Groups ``old`` and ``new`` sizes (none of them 1) into runs of equal product."""
    runs, i, j = [], 0, 0
    while i < len(old) and j < len(new):
        p, q, i0, j0 = old[i], new[j], i, j
        i, j = i + 1, j + 1
        while p != q:
            if p < q and i < len(old):
                p, i = p * old[i], i + 1
            elif q < p and j < len(new):
                q, j = q * new[j], j + 1
            else:
                return None
        runs.append((i - i0, new[j0:j]))
    return runs if i == len(old) and j == len(new) else None


def total(sizes: tuple[int, ...]) -> int:
    """The number of elements of an array of shape ``sizes``."""
    return math.prod(sizes)
