"""``split``: a parameter tree into a frozen base and a trainable low-rank delta."""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax

from jaxlora import _paths
from jaxlora._checks import check_key, describe
from jaxlora._config import LoraConfig
from jaxlora._delta import LoraNode, init_factors
from jaxlora._node import AdapterNode, is_node, node_type
from jaxlora._placement import place_node
from jaxlora.quant import QuantizedArray

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
        TypeError: if a targeted leaf is not a floating-point array, if
            ``config`` is not a config, if ``key`` is not a PRNG key, or if
            ``params`` holds adapter nodes (a delta, or ``(base, delta)``).

    Warns:
        UserWarning: for a ``rank_pattern`` or ``alpha_pattern`` key that matches no
            adapted path (it would change nothing), naming close paths.

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
    check_key("key", key)
    matches = config.matcher()
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: _paths.is_box(x) or is_node(x)
    )
    for key_path, leaf in flat:
        if is_node(leaf):
            raise TypeError(
                f"params holds an adapter node ({type(leaf).__name__}) at "
                f"{jax.tree_util.keystr(key_path)}: it is (or contains) a delta. Split the "
                "model's original parameters, not split's output: base, delta = "
                "jaxlora.split(params, config, key=key)."
            )
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
                f"targets matched {path!r}, which is {describe(value)}; only floating-point "
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
    _warn_unused_patterns(config, [path for _, path, _ in targeted])
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


def _warn_unused_patterns(config: Any, paths: list[str]) -> None:
    """Warns about ``rank_pattern``/``alpha_pattern`` keys that match no adapted path."""
    for name in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(config, name, {}) or {}:
            if any(re.search(pattern, p) for p in paths):
                continue
            close = difflib.get_close_matches(pattern, paths, n=3, cutoff=0.3)
            warnings.warn(
                f"jaxlora: {name} key {pattern!r} matches none of the {len(paths)} adapted "
                f"paths, so it changes nothing. Adapted paths close to it: "
                f"{close or paths[:3]}. Patterns are regexes searched in these paths.",
                UserWarning,
                stacklevel=3,
            )


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
            + _paths.layout_hint(path, layout)
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


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _adaptable(x: Any) -> bool:
    return _paths.is_float_array(x) and x.ndim >= 2
