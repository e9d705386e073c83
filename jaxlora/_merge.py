"""``merge`` and ``unmerge``: the adapted weights and back, in float32, cast back."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _paths
from jaxlora._checks import describe
from jaxlora._config import check_bool
from jaxlora._node import AdapterNode, is_delta_leaf, is_node
from jaxlora.quant import QuantizedArray, quantize_array

__all__ = ["check_structure", "merge", "unmerge"]


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
    check_bool("requantize", requantize)
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
    check_structure(base, delta)

    def one(path: Any, node: AdapterNode | None, leaf: Any) -> Any:
        weight = _paths.unbox(leaf)
        quantized = isinstance(weight, QuantizedArray)
        if node is None:
            if quantized and not requantize:
                return _paths.rebox(leaf, weight.dequantize())
            return _paths.rebox(leaf, weight)  # a fresh box at the current trace level (NNX)
        _check_weight(_paths.path_str(path), node, weight)
        dense = weight.dequantize(jnp.float32) if quantized else weight.astype(jnp.float32)
        merged = node.merge_into(dense) if sign > 0 else node.unmerge_from(dense)
        merged = merged.astype(weight.dtype)
        if quantized and requantize:
            merged = _requantize_like(weight, merged)
        return _paths.rebox(leaf, merged)

    return jax.tree_util.tree_map_with_path(one, delta, base, is_leaf=is_delta_leaf)


def _requantize_like(weight: QuantizedArray, merged: jax.Array) -> QuantizedArray:
    """``merged`` quantized as ``weight`` is: its format, blocks and stored axis order."""
    stored = merged
    if weight.axes is not None:  # quantize in the stored order, so blocks run as the file's
        stored = jnp.transpose(merged, np.argsort(weight.axes))
    q = quantize_array(
        stored,
        format=weight.format,
        block_size=weight.block_size,
        double_quant=weight.double_quant,
        **({"double_quant_block_size": weight.scale_block_size} if weight.double_quant else {}),
    )
    if weight.axes is None:
        return q
    return dataclasses.replace(q, shape=tuple(weight.shape), axes=weight.axes)


def check_structure(base: Any, delta: Any) -> None:
    """Raises a ``ValueError`` naming the first path where ``base`` and ``delta`` differ.

    Also says so when the two are swapped, when ``delta`` holds no adapter at all
    (``None``, or the base twice), and when a node's arrays do not fit its layout.
    """
    base_nodes = [n for n in jax.tree.leaves(base, is_leaf=is_node) if is_node(n)]
    delta_flat, delta_def = jax.tree_util.tree_flatten_with_path(delta, is_leaf=is_delta_leaf)
    delta_nodes = [(p, n) for p, n in delta_flat if is_node(n)]
    if base_nodes and not delta_nodes:
        raise ValueError(
            "base holds adapter nodes and delta holds none: base and delta are swapped. "
            "Pass them in split's order: f(base, delta, ...) with base, delta = "
            "jaxlora.split(params, config, key=key)."
        )
    if not delta_nodes:
        what = (
            "None"
            if delta is None
            else f"a tree of {len(delta_flat)} leaves, none of them an adapter node"
        )
        raise ValueError(
            f"delta holds no adapter node (got {what}). Pass the second output of "
            "jaxlora.split as delta: base, delta = jaxlora.split(params, config, key=key)."
        )
    if base is None:
        raise ValueError(
            "base is None; pass the first output of jaxlora.split as base: base, delta = "
            "jaxlora.split(params, config, key=key)."
        )
    for key_path, node in delta_nodes:
        node.check_shapes(_paths.path_str(key_path))
    base_paths = [p for p, _ in _paths.leaves_with_paths(base)]
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


def _check_weight(path: str, node: AdapterNode, weight: Any) -> None:
    if not hasattr(weight, "shape") or tuple(weight.shape) != node.layout.shape:
        found = tuple(weight.shape) if hasattr(weight, "shape") else describe(weight)
        raise ValueError(
            f"the adapter at {path!r} was made for a weight of shape {node.layout.shape}, "
            f"but the base holds {found}. Pass the base that jaxlora.split returned with this "
            "delta."
        )
