"""``split``, ``merge``, ``unmerge`` and ``trainable_mask``: pure functions over pytrees."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _paths
from jaxlora._config import LoraConfig
from jaxlora._delta import LoraNode, init_factors
from jaxlora._node import AdapterNode, is_delta_leaf, is_node, node_type
from jaxlora._placement import place_node

_MAX_LISTED_PATHS = 12


def split(params: Any, config: Any, *, key: jax.Array) -> tuple[Any, Any]:
    """Splits a parameter tree into a frozen base and a trainable low-rank delta.

    Args:
        params: any pytree of arrays: Flax linen ``params``, an ``nnx.State`` or a
            plain dict.
        config: which leaves to adapt and how: a :class:`LoraConfig` (LoRA, rsLoRA,
            and DoRA with ``use_dora=True``) or a variant config such as
            :class:`jaxlora.variants.VeraConfig` or
            :class:`jaxlora.variants.AdaLoraConfig`.
        key: a PRNG key for the adapters' initialization.

    Returns:
        ``(base, delta)``. ``base`` has ``params``' structure and holds the frozen
        weights (the same arrays, except that ``pissa``/``olora`` subtract their
        initial product). ``delta`` mirrors ``params`` with an adapter node (a
        :class:`LoraNode`, or the config's variant node) at each adapted leaf and
        ``None`` elsewhere.

    Raises:
        ValueError: if ``targets`` match no adaptable leaf (the message lists the
            paths that could be targeted), if a rank exceeds ``min(in, out)`` of
            its weight, or if a weight's layout is ambiguous.
        TypeError: if a targeted leaf is not a floating-point array, or if
            ``config`` is not a config.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"query": {"kernel": jnp.ones((4, 6))}, "norm": {"scale": jnp.ones(6)}}
        >>> config = jaxlora.LoraConfig(rank=2, targets="query")
        >>> base, delta = jaxlora.split(params, config, key=jax.random.key(0))
        >>> delta["query"]["kernel"].a.shape, delta["query"]["kernel"].b.shape
        ((4, 2), (2, 6))
        >>> delta["norm"]["scale"] is None
        True
    """
    node_builder = _node_builder(config)
    matches = config.matcher()
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_paths.is_box)
    targeted = []  # (index, path, weight)
    candidates = []
    for index, (key_path, leaf) in enumerate(flat):
        path = _paths.path_str(key_path)
        value = _paths.unbox(leaf)
        if _adaptable(value):
            candidates.append(path)
        if not matches(path, value) or (_is_array(value) and value.ndim < 2):
            continue
        if not _adaptable(value):
            raise TypeError(
                f"targets matched {path!r}, which is {_describe(value)}; only floating-point "
                "arrays with at least two axes can be adapted. Narrow `targets` or add this "
                "path to `exclude`."
            )
        targeted.append((index, path, value))
    if not targeted:
        shown = ", ".join(repr(p) for p in candidates[:_MAX_LISTED_PATHS])
        more = f" and {len(candidates) - _MAX_LISTED_PATHS} more" if len(candidates) > 12 else ""
        raise ValueError(
            f"targets={config.targets!r} (exclude={config.exclude!r}) matched no adaptable "
            f"parameter. Adaptable paths look like: {shown or '(none: no float leaf has 2+ axes)'}"
            f"{more}. Pass a regex that matches some of them."
        )
    # Variants that share state across layers (VeRA's projections) see every target first.
    make = node_builder([(path, value) for _, path, value in targeted])
    base_leaves = [leaf for _, leaf in flat]
    delta_leaves: list[Any] = [None] * len(flat)
    for index, path, value in targeted:
        node, new_weight = make(jax.random.fold_in(key, index), path, value)
        node = place_node(value, node)  # adapters of a sharded weight follow its sharding
        if new_weight is not None:
            base_leaves[index] = _paths.rebox(base_leaves[index], new_weight)
        delta_leaves[index] = node
    return treedef.unflatten(base_leaves), treedef.unflatten(delta_leaves)


def _node_builder(config: Any) -> Callable[[list[tuple[str, Any]]], Callable[..., Any]]:
    """``targets -> make(key, path, weight) -> (node, new_weight or None)`` for ``config``.

    A ``LoraConfig`` makes :class:`LoraNode` (or DoRA) adapters; any other config
    provides ``node_builder(targets)`` itself (``jaxlora.variants``).
    """
    if isinstance(config, LoraConfig):
        return lambda targets: lambda key, path, weight: _make_node(key, path, weight, config)
    builder = getattr(config, "node_builder", None)
    if not callable(builder) or not callable(getattr(config, "matcher", None)):
        raise TypeError(
            f"config must be a jaxlora.LoraConfig or a variant config such as "
            f"jaxlora.variants.VeraConfig or jaxlora.variants.AdaLoraConfig; got "
            f"{type(config).__name__}"
        )
    return builder


def _make_node(
    key: jax.Array, path: str, weight: Any, config: LoraConfig
) -> tuple[AdapterNode, jax.Array | None]:
    layout = config.layout_for(path, tuple(weight.shape))
    from jaxlora.quant import QuantizedArray

    if config.init in ("pissa", "olora") and isinstance(weight, QuantizedArray):
        raise ValueError(
            f"init={config.init!r} reads the weight at {path!r}, which is quantized. Split the "
            "float weights first, then quantize the base: "
            "base, delta = jaxlora.split(params, config, key=key); base = jaxlora.quantize(base)"
        )
    rank = config.rank_for(path)
    if rank > min(layout.n_in, layout.n_out):
        raise ValueError(
            f"rank {rank} is too large for {path!r}: its weight {tuple(weight.shape)} reads as "
            f"(in={layout.n_in}, out={layout.n_out}) and a rank must be <= min(in, out) = "
            f"{min(layout.n_in, layout.n_out)}. Lower `rank` or set rank_pattern for this path."
        )
    scale = config.scale_for(path)
    a, b, new_weight = init_factors(
        key, weight, layout, rank=rank, scale=scale, init=config.init, dtype=config.dtype
    )
    node = LoraNode(a, b, scale=float(scale), layout=layout, dropout=float(config.dropout))
    if config.use_dora:
        # DoRA is a variant: found by its registered kind, so the core imports no variant
        dora = node_type("dora")
        return dora.from_lora(node, weight if new_weight is None else new_weight), new_weight  # type: ignore[attr-defined]
    return node, new_weight


def merge(base: Any, delta: Any, *, requantize: bool = False) -> Any:
    """Returns ``base`` with ``W + s·a@b`` at every adapted leaf.

    The sum is computed in float32 and cast back to each weight's dtype.

    A quantized base (:func:`jaxlora.quant.quantize`) is dequantized first. By
    default the result is then full precision everywhere (non-adapted
    quantized leaves are dequantized too), so that the plain apply function
    runs on it; this is the recommended path for serving a QLoRA adapter with
    no added latency. ``requantize=True`` instead quantizes each merged
    weight again in its original format and leaves the other quantized leaves
    as they are: memory stays at 4 bits, but the merged weight is rounded to
    the 4-bit grid again, which loses most of a small adapter's effect (see
    the README for measured errors; PEFT users meet the same silently).

    Args:
        base: the frozen tree from :func:`split` (or any tree of its structure).
        delta: the matching delta.
        requantize: quantize merged weights of a quantized base again.

    Returns:
        A tree of ``base``'s structure, ready for the unadapted apply function.

    Raises:
        ValueError: if the trees' structures or an adapted weight's shape differ.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
        >>> base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=1, targets="dense"),
        ...                             key=jax.random.key(0))
        >>> bool(jnp.all(jaxlora.merge(base, delta)["dense"]["kernel"] == 1.0))  # b starts at 0
        True
    """
    return _apply_delta(base, delta, sign=1.0, requantize=requantize)


def unmerge(params: Any, delta: Any) -> Any:
    """The inverse of :func:`merge`: ``W - s·a@b`` at every adapted leaf (float32, cast back).

    Args:
        params: a merged tree.
        delta: the delta that was merged into it.

    Returns:
        The base tree, up to floating-point rounding.

    Raises:
        ValueError: if the trees' structures or an adapted weight's shape differ.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(1), (4, 3))}}
        >>> base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=1, targets="dense"),
        ...                             key=jax.random.key(0))
        >>> back = jaxlora.unmerge(jaxlora.merge(base, delta), delta)
        >>> bool(jnp.allclose(back["dense"]["kernel"], base["dense"]["kernel"]))
        True
    """
    return _apply_delta(params, delta, sign=-1.0)


def _apply_delta(base: Any, delta: Any, *, sign: float, requantize: bool = False) -> Any:
    from jaxlora.quant import QuantizedArray, quantize_array

    check_structure(base, delta)

    def one(path: Any, node: LoraNode | None, leaf: Any) -> Any:
        weight = _paths.unbox(leaf)
        quantized = isinstance(weight, QuantizedArray)
        if node is None:
            if quantized and not requantize:
                return _paths.rebox(leaf, weight.dequantize())
            return leaf
        _check_weight(_paths.path_str(path), node, weight)
        dense = weight.dequantize(jnp.float32) if quantized else weight.astype(jnp.float32)
        merged = node.merge_into(dense) if sign > 0 else node.unmerge_from(dense)
        merged = merged.astype(weight.dtype)
        if quantized and requantize:
            merged = quantize_array(
                merged,
                format=weight.format,
                block_size=weight.block_size,
                double_quant=weight.double_quant,
                **(
                    {"double_quant_block_size": weight.scale_block_size}
                    if weight.double_quant
                    else {}
                ),
            )
        return _paths.rebox(leaf, merged)

    return jax.tree_util.tree_map_with_path(one, delta, base, is_leaf=is_delta_leaf)


def check_structure(base: Any, delta: Any) -> None:
    """Raises a ``ValueError`` naming the first path where ``base`` and ``delta`` differ."""
    base_paths = [p for p, _ in _paths.leaves_with_paths(base)]
    delta_flat, delta_def = jax.tree_util.tree_flatten_with_path(delta, is_leaf=is_delta_leaf)
    delta_paths = [_paths.path_str(p) for p, _ in delta_flat]
    if base_paths == delta_paths:
        try:
            delta_def.flatten_up_to(base)
            return
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"base and delta have different tree structures: {e}. Pass the base and "
                "delta that jaxlora.split returned for the same parameters."
            ) from None
    missing = [p for p in delta_paths if p not in set(base_paths)]
    extra = [p for p in base_paths if p not in set(delta_paths)]
    where = (
        f"delta has {missing[0]!r}, which base lacks"
        if missing
        else f"base has {extra[0]!r}, which delta lacks"
        if extra
        else "the paths come in a different order"
    )
    raise ValueError(
        f"base and delta have different tree structures: {where} "
        f"(base has {len(base_paths)} leaves, delta {len(delta_paths)}). Pass the base and "
        "delta that jaxlora.split returned for the same parameters."
    )


def _check_weight(path: str, node: LoraNode, weight: Any) -> None:
    if not hasattr(weight, "shape") or tuple(weight.shape) != node.layout.shape:
        found = tuple(weight.shape) if hasattr(weight, "shape") else _describe(weight)
        raise ValueError(
            f"the adapter at {path!r} was made for a weight of shape {node.layout.shape}, "
            f"but the base holds {found}. Pass the base that jaxlora.split returned with this "
            "delta."
        )


def trainable_mask(tree: Any) -> Any:
    """A bool tree that is ``True`` exactly on trainable adapter leaves.

    Every array leaf of an adapter node is trainable (fixed values such as the
    scale are static metadata, not leaves), so a plain delta needs no mask:
    ``optax.adamw(...)`` applied to it trains exactly the adapters. The mask
    is for trees that hold adapters next to other arrays, such as
    ``(base, delta)`` trained together with ``optax.masked`` or
    ``optax.transforms.partition``.

    Args:
        tree: a delta, or any tree that contains adapter nodes (such as
            ``(base, delta)``); every leaf outside a node is marked ``False``.

    Returns:
        A tree of ``tree``'s structure: ``True`` on the arrays of each adapter
        node (``a`` and ``b`` for LoRA), ``False`` on every other leaf.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
        >>> base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=1, targets="dense"),
        ...                             key=jax.random.key(0))
        >>> mask = jaxlora.trainable_mask((base, delta))
        >>> mask[1]["dense"]["kernel"].a, mask[0]["dense"]["kernel"], mask[1]["dense"]["bias"]
        (True, False, None)
    """

    def one(x: Any) -> Any:
        if is_node(x):
            return jax.tree.map(lambda _: True, x)
        return False

    return jax.tree.map(one, tree, is_leaf=is_node)


class ParameterCount(NamedTuple):
    """Trainable and total parameter counts; ``total`` includes the adapters."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        """The trainable share of ``total``, in percent."""
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.percent:.4f}"
        )


def count_parameters(base: Any, delta: Any) -> ParameterCount:
    """Counts trainable (adapter) and total (base + adapter) parameters.

    Args:
        base: the frozen tree.
        delta: its delta.

    Returns:
        A :class:`ParameterCount`; ``str()`` of it reads like PEFT's
        ``print_trainable_parameters``.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"dense": {"kernel": jnp.ones((10, 10))}}
        >>> base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="dense"),
        ...                             key=jax.random.key(0))
        >>> jaxlora.count_parameters(base, delta)
        ParameterCount(trainable=40, total=140)
    """
    if _holds_nodes(base) and not _holds_nodes(delta):
        raise ValueError(
            "count_parameters(base, delta) got a base that holds adapter nodes and a delta "
            "that holds none: the arguments are swapped. Call "
            "jaxlora.count_parameters(base, delta) with base, delta = jaxlora.split(...)."
        )
    trainable = sum(_trainable_size(n) for n in _nodes_of(delta))
    frozen = sum(
        int(_paths.unbox(x).size)
        for _, x in _paths.leaves_with_paths(base)
        if _is_array(_paths.unbox(x))
    )
    return ParameterCount(trainable=trainable, total=frozen + trainable)


def adapter_nbytes(delta: Any) -> int:
    """The bytes of a delta's arrays: its trainable arrays and its nodes' constants.

    That is what an adapter checkpoint stores (a constant shared by several
    nodes is counted once per node here, stored once there).

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"dense": {"kernel": jnp.ones((10, 10))}}
        >>> _, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="dense"),
        ...                          key=jax.random.key(0))
        >>> jaxlora.adapter_nbytes(delta)  # a: 10 x 2 and b: 2 x 10 in float32
        160
    """
    return sum(
        int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize
        for node in _nodes_of(delta)
        for x in node.arrays().values()
    )


def summary(delta: Any) -> str:
    """A readable table of the adapted paths with their shapes, ranks and scales.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"dense": {"kernel": jnp.ones((10, 6))}}
        >>> _, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="dense"),
        ...                          key=jax.random.key(0))
        >>> print(jaxlora.summary(delta))
        path          weight   rank  scale  params
        dense/kernel  (10, 6)     2   2.00      32
        1 adapted weight, 32 trainable parameters
    """
    rows = []
    for key_path, node in jax.tree_util.tree_flatten_with_path(delta, is_leaf=is_node)[0]:
        if not is_node(node):
            continue
        rows.append(
            (
                _paths.path_str(key_path),
                str(node.layout.shape),
                str(node.rank),
                _scale_text(node),
                str(_trainable_size(node)),
            )
        )
    header = ("path", "weight", "rank", "scale", "params")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    total = sum(int(r[4]) for r in rows)
    plural = "" if len(rows) == 1 else "s"
    lines.append(f"{len(rows)} adapted weight{plural}, {total} trainable parameters")
    return "\n".join(line.rstrip() for line in lines)


def _trainable_size(node: AdapterNode) -> int:
    """The number of trainable numbers in one adapter node: the sizes of its leaves."""
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(node))


def _scale_text(node: AdapterNode) -> str:
    scales = getattr(node, "scales", None)  # stacked nodes hold one per adapter
    if scales is not None and len(set(scales)) > 1:
        return "mixed"
    return f"{float(scales[0] if scales else node.scale):.2f}"


def _nodes_of(tree: Any) -> list[AdapterNode]:
    return [x for x in jax.tree.leaves(tree, is_leaf=is_node) if is_node(x)]


def _holds_nodes(tree: Any) -> bool:
    return bool(_nodes_of(tree))


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _adaptable(x: Any) -> bool:
    return _paths.is_float_array(x) and x.ndim >= 2


def _describe(x: Any) -> str:
    if _is_array(x):
        return f"an array of dtype {x.dtype} and shape {tuple(x.shape)}"
    return f"a {type(x).__name__} ({x!r:.40})"
