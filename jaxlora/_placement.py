"""Adapter placement from the sharding of the weight it adapts: the rule, for every node type.

An adapter follows its weight (the rule and its reasons are in
:mod:`jaxlora.sharding`). For a weight read as ``stacked + inputs + outputs``
axes with partition spec ``P(*s, *i, *o)``, an adapter array whose axes are
``(*stacked, *roles)`` (:attr:`jaxlora._node.AdapterNode.axes`) gets
``P(*s, ...)`` with ``combine(i)`` on an ``"in"`` axis, ``combine(o)`` on an
``"out"`` axis and ``None`` on a ``"rank"`` axis; the leading ``"adapter"``
axis of stacked adapters is replicated.

This module sits below :func:`jaxlora.split` (which places new adapters) and
:mod:`jaxlora.sharding` (the public helpers).
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora._node import AdapterNode
from jaxlora._paths import Layout

Entry = str | tuple[str, ...] | None


def factor_specs(
    spec: PartitionSpec, layout: Layout, mesh_shape: dict[str, int] | None = None
) -> tuple[PartitionSpec, PartitionSpec]:
    """The partition specs of ``a`` and ``b`` for a weight of partition spec ``spec``.

    Args:
        spec: the weight's spec; missing trailing entries mean replicated and
            ``PartitionSpec.UNCONSTRAINED`` entries are read as replicated.
        layout: how the weight's axes read (``LoraNode.layout``).
        mesh_shape: mesh axis name -> size, to tell whether several sharded
            input (or output) axes flatten into one exactly (see the module
            docstring). ``None`` treats any sharded axis before another sharded
            one as not flattenable, so that factor axis is replicated.

    Returns:
        ``(a_spec, b_spec)`` for ``a: (*stacked, n_in, r)`` and ``b: (*stacked, r, n_out)``.

    Raises:
        ValueError: if ``spec`` has more entries than the weight has axes.

    Example:
        >>> from jax.sharding import PartitionSpec as P
        >>> from jaxlora._paths import Layout
        >>> from jaxlora.sharding import factor_specs
        >>> layout = Layout(stacked=(4,), inputs=(64,), outputs=(8, 16))  # nn.scan'd q_proj
        >>> factor_specs(P(None, "data", "model"), layout)
        (P(None, 'data', None), P(None, None, 'model'))
        >>> factor_specs(P(None, None, None, "model"), layout)  # head_dim sharded: inexact
        (P(None, None, None), P(None, None, None))
        >>> factor_specs(P(None, None, None, "model"), Layout((4,), (64,), (1, 16)))
        (P(None, None, None), P(None, None, 'model'))
    """
    stacked, a_in, b_out = role_entries(spec, layout, mesh_shape)
    return PartitionSpec(*stacked, a_in, None), PartitionSpec(*stacked, None, b_out)


def role_entries(
    spec: PartitionSpec, layout: Layout, mesh_shape: dict[str, int] | None = None
) -> tuple[list[Entry], Entry, Entry]:
    """``(stacked entries, "in" entry, "out" entry)`` of a weight of partition spec ``spec``."""
    ndim = len(layout.shape)
    entries = list(spec)
    if len(entries) > ndim:
        raise ValueError(
            f"partition spec {spec} has {len(entries)} entries, but the weight it shards has "
            f"{ndim} axes (shape {layout.shape}). Pass the spec of this weight."
        )
    entries = [_normalize(e) for e in entries] + [()] * (ndim - len(entries))
    ns, ni = len(layout.stacked), len(layout.inputs)
    stacked = [_entry(e) for e in entries[:ns]]
    a_in = _combine(entries[ns : ns + ni], layout.inputs, mesh_shape)
    b_out = _combine(entries[ns + ni :], layout.outputs, mesh_shape)
    return stacked, a_in, b_out


def node_specs(
    node: AdapterNode, spec: PartitionSpec, mesh_shape: dict[str, int] | None = None
) -> AdapterNode:
    """``node`` with the ``PartitionSpec`` of each of its arrays in its place."""
    stacked, a_in, b_out = role_entries(spec, node.layout, mesh_shape)
    by_role = {"in": a_in, "out": b_out}

    def spec_for(roles: tuple[str, ...]) -> PartitionSpec:
        n_lead = 0
        while n_lead < len(roles) and roles[n_lead] == "adapter":
            n_lead += 1
        rest = [by_role.get(role) for role in roles[n_lead:]]
        return PartitionSpec(*([None] * n_lead), *stacked, *rest)

    return node.shardings(spec_for)


def node_shardings(node: AdapterNode, sharding: NamedSharding) -> AdapterNode:
    """``node`` with the ``NamedSharding`` of each of its arrays, following ``sharding``."""
    specs = node_specs(node, sharding.spec, dict(sharding.mesh.shape))
    mesh, kind = sharding.mesh, sharding.memory_kind
    return jax.tree.map(lambda s: NamedSharding(mesh, s, memory_kind=kind), specs)


def place_node(weight: Any, node: AdapterNode) -> AdapterNode:
    """``node`` with its arrays placed like ``weight``'s sharding, where it has one.

    A concrete ``jax.Array`` on a ``NamedSharding`` over more than one device has
    the node's arrays ``jax.device_put`` with :func:`node_shardings`; under
    tracing, a weight whose type carries a sharding (``Explicit`` mesh axes) has
    them resharded to match. Anything else returns ``node`` unchanged.
    :func:`jaxlora.split` calls this for every adapter it makes.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from jaxlora._paths import Layout
        >>> from jaxlora._placement import place_node
        >>> mesh = jax.make_mesh((8,), ("data",))
        >>> w = jax.device_put(jnp.ones((16, 32)), NamedSharding(mesh, P("data")))
        >>> node = jaxlora.LoraNode(jnp.ones((16, 2)), jnp.ones((2, 32)), scale=1.0,
        ...                         layout=Layout((), (16,), (32,)))
        >>> placed = place_node(w, node)
        >>> placed.a.sharding.spec, placed.b.sharding.spec
        (P('data', None), P(None, None))
    """
    if isinstance(weight, jax.core.Tracer):
        sharding = getattr(jax.typeof(weight), "sharding", None)
        if not isinstance(sharding, NamedSharding) or not any(_normalize(e) for e in sharding.spec):
            return node
        shardings = node_shardings(node, sharding)
        return jax.tree.map(jax.sharding.reshard, node, shardings)
    sharding = getattr(weight, "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.size <= 1:
        return node
    return jax.device_put(node, node_shardings(node, sharding))


def _normalize(entry: Any) -> tuple[str, ...]:
    """A spec entry as a tuple of mesh axis names (``None``/unconstrained: ``()``)."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _entry(names: tuple[str, ...]) -> Entry:
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def _combine(
    entries: list[tuple[str, ...]], dims: tuple[int, ...], mesh_shape: dict[str, int] | None
) -> Entry:
    """The spec entry of the row-major flattening of axes ``dims`` sharded as ``entries``."""
    sharded = [k for k, e in enumerate(entries) if e]
    if not sharded:
        return None
    last = sharded[-1]
    for k in range(last):
        if not entries[k]:
            exact = dims[k] == 1
        elif mesh_shape is None:
            exact = False
        else:
            exact = dims[k] == math.prod(mesh_shape[n] for n in entries[k])
        if not exact:
            return None
    return _entry(tuple(n for e in entries[: last + 1] for n in e))
