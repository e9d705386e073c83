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

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from jaxlora import _paths
from jaxlora._checks import delta_items
from jaxlora._node import AdapterNode, is_delta_leaf, is_node
from jaxlora._placement import factor_specs as factor_specs
from jaxlora._placement import node_shardings, node_specs

__all__ = ["adapter_shardings", "factor_specs"]


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
        A tree like ``delta`` with, at each adapter, a node of its type holding
        shardings in place of its arrays (``a`` and ``b`` for LoRA; DoRA's
        magnitude follows the output axes, VeRA's ``d`` and AdaLoRA's ``e`` are
        replicated along the rank), and ``None`` elsewhere.
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
        return _node_shardings(_paths.path_str(key_path), node, leaf)

    if any(is_node(x) for x in jax.tree.leaves(base_shardings, is_leaf=is_node)):
        raise TypeError(
            "adapter_shardings(base_shardings, delta): base_shardings holds adapter nodes; the "
            "arguments look swapped. Pass the base's shardings first, then the delta."
        )
    delta_items(delta, "adapter_shardings")
    if base_shardings is None:
        raise TypeError(
            "adapter_shardings: base_shardings is None; pass a tree of the base's shardings "
            "with the structure of the parameters, e.g. jax.tree.map(lambda w: w.sharding, base)."
        )
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


def _node_shardings(path: str, node: AdapterNode, leaf: Any) -> AdapterNode:
    value = _paths.unbox(leaf)
    if not isinstance(value, Sharding | PartitionSpec) and getattr(value, "sharding", None):
        value = value.sharding
    if isinstance(value, NamedSharding):
        return _checked(path, lambda: node_shardings(node, value))
    if isinstance(value, PartitionSpec):
        ambient = jax.sharding.get_abstract_mesh()
        mesh_shape = None if ambient.empty else dict(ambient.shape)
        return _checked(path, lambda: node_specs(node, value, mesh_shape))
    if isinstance(value, Sharding) and value.is_fully_replicated:
        return jax.tree.map(lambda _: value, node)
    raise TypeError(
        f"base_shardings holds {_describe(value)} at {path!r}, where delta has an adapter. "
        "Expected a NamedSharding, a PartitionSpec, a fully replicated sharding or an "
        "array with a sharding; pass e.g. jax.tree.map(lambda w: w.sharding, base)."
    )


def _checked(path: str, fn: Any) -> Any:
    try:
        return fn()
    except ValueError as e:
        raise ValueError(f"at {path!r}: {e}") from None


def _describe(x: Any) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"an array of shape {tuple(x.shape)} without a sharding"
    return f"a {type(x).__name__} ({x!r:.60})"
