"""Shardings of adapters, derived from the shardings of the weights they adapt.

An adapter follows its weight: for a weight read as ``stacked + inputs +
outputs`` axes with partition spec ``P(*s, *i, *o)``, the factor
``a: (*stacked, n_in, r)`` gets ``P(*s, combine(i), None)`` and
``b: (*stacked, r, n_out)`` gets ``P(*s, None, combine(o))``: the rank axis is
replicated, stacked (``nn.scan``) axes keep their spec, and ``combine`` gives the
flattened ``n_in`` (or ``n_out``) axis the mesh axes of the weight's input (or
output) axes. The low-rank branch ``(x @ a) @ b`` then needs the same
communication as ``x @ W`` and never a gathered copy of ``W``:

* column-parallel (``W: (d, f@model)``): ``a`` is replicated, ``b`` is sharded
  over ``model`` like ``W``'s output, and ``x@a@b`` comes out sharded like ``x@W``;
* row-parallel (``W: (f@model, d)``): ``a`` is sharded over ``model``, so ``x@a``
  is a partial sum that XLA all-reduces at rank size (``r`` values per token,
  not ``d``);
* FSDP (``W: (d@data, f)``): ``a`` is sharded over ``data`` too, so per-device
  adapter and optimizer memory shrink with the weights.

``combine`` is exact: the flattened axis gets the mesh axes of the sharded
input (or output) axes, major first, exactly when flattening row-major keeps
each device's block contiguous, i.e. when every axis before the last sharded
one is split down to one element per device (the usual case: only the leading
axis is sharded, such as ``heads`` in ``(heads, head_dim, d_model)``). Otherwise
(say ``(heads, head_dim@model, d_model)``) that factor axis is replicated:
a factor is ``n × r``, small next to its weight, and a replicated factor meets
any sharding of ``x`` with at most a rank-sized all-reduce, where a misaligned
sharded one would be resharded at every use.

Works with ``NamedSharding`` over meshes of either ``jax.sharding.AxisType``:
``Auto`` (the partitioner propagates from the arguments' shardings) and
``Explicit`` (shardings are part of the types; :func:`jaxlora.split` then gives
the adapters sharded types as well). :func:`jaxlora.split` places the adapters of
a weight held on a multi-device ``NamedSharding`` with these shardings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from jaxlora import _paths
from jaxlora._delta import LoraNode, is_delta_leaf, is_node
from jaxlora._paths import Layout

__all__ = ["adapter_shardings", "factor_specs"]

Entry = str | tuple[str, ...] | None


def adapter_shardings(base_shardings: Any, delta: Any) -> Any:
    """The shardings of a delta's adapters, each following its weight's sharding.

    Args:
        base_shardings: a tree with the structure of the parameters (or of the
            frozen ``base``) holding, at least at every adapted weight, a
            ``jax.sharding.NamedSharding``, a ``PartitionSpec``, a
            ``SingleDeviceSharding`` (or any fully replicated sharding), or an
            array (``jax.Array``, or a ``jax.ShapeDtypeStruct`` with a
            ``sharding``) whose sharding is read. Flax boxes (``nnx.Variable``,
            ``nn.Partitioned``) are unboxed. Leaves where ``delta`` holds
            ``None`` are not read. For ``PartitionSpec`` leaves the mesh axis
            sizes are taken from the ambient mesh (``jax.set_mesh``) if any.
        delta: the delta from :func:`jaxlora.split` (or an abstract one from
            ``jax.eval_shape``).

    Returns:
        A tree like ``delta`` with a :class:`jaxlora.LoraNode` of shardings at each
        adapter (``a``, ``b`` and the replicated ``scale``) and ``None`` elsewhere.
        It is what ``jax.device_put(delta, ...)`` and ``jax.jit(...,
        in_shardings=..., out_shardings=...)`` take. ``PartitionSpec`` leaves give
        ``PartitionSpec`` s; replicated shardings are returned as they are.

    Raises:
        ValueError: if ``base_shardings`` does not have ``delta``'s structure, or
            a spec has more entries than its weight has axes.
        TypeError: if an adapted leaf of ``base_shardings`` is none of the above.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from jaxlora.sharding import adapter_shardings
        >>> mesh = jax.make_mesh((4, 2), ("data", "model"))
        >>> params = {"q": {"kernel": jnp.ones((16, 4, 8))},     # (d_model, heads, head_dim)
        ...           "o": {"kernel": jnp.ones((4, 8, 16))}}     # (heads, head_dim, d_model)
        >>> config = jaxlora.LoraConfig(rank=2, targets=["q", "o"], input_axes={"^o/": 2})
        >>> _, delta = jaxlora.split(params, config, key=jax.random.key(0))
        >>> specs = {"q": {"kernel": NamedSharding(mesh, P("data", "model"))},
        ...          "o": {"kernel": NamedSharding(mesh, P("model", None, "data"))}}
        >>> out = adapter_shardings(specs, delta)
        >>> out["q"]["kernel"].a.spec, out["q"]["kernel"].b.spec
        (P('data', None), P(None, 'model'))
        >>> out["o"]["kernel"].a.spec, out["o"]["kernel"].b.spec
        (P('model', None), P(None, 'data'))
        >>> sharded = jax.device_put(delta, out)
        >>> sharded["o"]["kernel"].a.sharding.spec
        P('model', None)
    """

    def one(key_path: Any, node: Any, leaf: Any) -> Any:
        if node is None:
            return None
        if not is_node(node) or type(node) is not LoraNode:
            raise TypeError(
                f"delta holds a {type(node).__name__} at {jax.tree_util.keystr(key_path)}; "
                "expected a jaxlora.LoraNode or None (adapter shardings for DoRA, VeRA and "
                "AdaLoRA nodes are not derived yet). Pass the delta from jaxlora.split."
            )
        return _node_shardings(_paths.path_str(key_path), node.layout, node, leaf)

    try:
        return jax.tree_util.tree_map_with_path(one, delta, base_shardings, is_leaf=is_delta_leaf)
    except ValueError as e:
        if "mismatch" not in str(e) and "structure" not in str(e):
            raise
        raise ValueError(
            f"base_shardings does not have the structure of delta: {e}. Pass a tree with the "
            "structure of the parameters that delta was split from, e.g. "
            "jax.tree.map(lambda w: w.sharding, base)."
        ) from None


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
    return PartitionSpec(*stacked, a_in, None), PartitionSpec(*stacked, None, b_out)


def place_factors(weight: Any, layout: Layout, a: jax.Array, b: jax.Array) -> tuple[Any, Any]:
    """``(a, b)`` placed with the shardings derived from ``weight``'s, where it has one.

    A concrete ``jax.Array`` on a ``NamedSharding`` over more than one device has
    its factors ``jax.device_put`` with :func:`factor_specs`; under tracing, a
    weight whose type carries a sharding (``Explicit`` mesh axes) has its factors
    resharded to match. Anything else returns ``(a, b)`` unchanged. :func:`jaxlora.split`
    calls this for every adapter it makes.

    Args:
        weight: the weight being adapted (an array, a tracer or an abstract value).
        layout: how its axes read.
        a: the new ``(*stacked, n_in, r)`` factor.
        b: the new ``(*stacked, r, n_out)`` factor.

    Returns:
        ``(a, b)``, placed.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from jaxlora._paths import Layout
        >>> from jaxlora.sharding import place_factors
        >>> mesh = jax.make_mesh((8,), ("data",))
        >>> w = jax.device_put(jnp.ones((16, 32)), NamedSharding(mesh, P("data")))
        >>> a, b = place_factors(w, Layout((), (16,), (32,)), jnp.ones((16, 2)), jnp.ones((2, 32)))
        >>> a.sharding.spec, b.sharding.spec
        (P('data', None), P(None, None))
    """
    if isinstance(weight, jax.core.Tracer):
        sharding = getattr(jax.typeof(weight), "sharding", None)
        if not isinstance(sharding, NamedSharding) or not any(_normalize(e) for e in sharding.spec):
            return a, b
        a_spec, b_spec = factor_specs(sharding.spec, layout, dict(sharding.mesh.shape))
        return (
            jax.sharding.reshard(a, NamedSharding(sharding.mesh, a_spec)),
            jax.sharding.reshard(b, NamedSharding(sharding.mesh, b_spec)),
        )
    sharding = getattr(weight, "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh.size <= 1:
        return a, b
    shardings = _from_named(sharding, layout)
    return jax.device_put(a, shardings[0]), jax.device_put(b, shardings[1])


def _node_shardings(path: str, layout: Layout, node: LoraNode, leaf: Any) -> LoraNode:
    value = _paths.unbox(leaf)
    if not isinstance(value, Sharding | PartitionSpec) and getattr(value, "sharding", None):
        value = value.sharding
    if isinstance(value, NamedSharding):
        a, b, scale = _checked(path, lambda: _from_named(value, layout))
    elif isinstance(value, PartitionSpec):
        ambient = jax.sharding.get_abstract_mesh()
        mesh_shape = None if ambient.empty else dict(ambient.shape)
        a, b = _checked(path, lambda: factor_specs(value, layout, mesh_shape))
        scale = PartitionSpec()
    elif isinstance(value, Sharding) and value.is_fully_replicated:
        a = b = scale = value
    else:
        raise TypeError(
            f"base_shardings holds {_describe(value)} at {path!r}, where delta has an adapter. "
            "Expected a NamedSharding, a PartitionSpec, a fully replicated sharding or an "
            "array with a sharding; pass e.g. jax.tree.map(lambda w: w.sharding, base)."
        )
    return dataclasses.replace(node, a=a, b=b, scale=scale)


def _from_named(
    sharding: NamedSharding, layout: Layout
) -> tuple[NamedSharding, NamedSharding, NamedSharding]:
    mesh, kind = sharding.mesh, sharding.memory_kind
    a_spec, b_spec = factor_specs(sharding.spec, layout, dict(mesh.shape))
    return (
        NamedSharding(mesh, a_spec, memory_kind=kind),
        NamedSharding(mesh, b_spec, memory_kind=kind),
        NamedSharding(mesh, PartitionSpec(), memory_kind=kind),
    )


def _checked(path: str, fn: Any) -> Any:
    try:
        return fn()
    except ValueError as e:
        raise ValueError(f"at {path!r}: {e}") from None


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


def _describe(x: Any) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"an array of shape {tuple(x.shape)} without a sharding"
    return f"a {type(x).__name__} ({x!r:.60})"
