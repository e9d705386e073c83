"""Argument checks shared by the public functions: PRNG keys, trees that hold adapter nodes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._node import AdapterNode, is_delta_leaf, is_node
from jaxlora._paths import path_str

__all__ = ["check_key", "delta_items", "describe"]


def check_key(name: str, key: Any) -> None:
    """Raises unless ``key`` is one PRNG key: ``jax.random.key(n)`` or a legacy ``PRNGKey(n)``.

    Args:
        name: the argument's name, for the message.
        key: the value passed.

    Raises:
        TypeError: for anything but a key (an int seed, a float array, ``None``).
        ValueError: for a batch of keys.

    Example:
        >>> import jax
        >>> from jaxlora._checks import check_key
        >>> check_key("key", jax.random.key(0))
        >>> check_key("key", 0)
        Traceback (most recent call last):
        ...
        TypeError: key must be a PRNG key such as jax.random.key(0); got 0 (int)
    """
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(
                f"{name} must be one PRNG key; got a batch of keys of shape {key.shape}. Pass "
                f"one key, e.g. {name}=keys[0]"
            )
        return
    if dtype is not None and np.dtype(dtype) == np.uint32 and tuple(key.shape[-1:]) == (2,):
        if key.shape != (2,):
            raise ValueError(
                f"{name} must be one PRNG key; got a batch of raw keys of shape {key.shape}. "
                f"Pass one key, e.g. {name}=jax.random.key(0)"
            )
        return
    raise TypeError(
        f"{name} must be a PRNG key such as jax.random.key(0); got {key!r:.60} "
        f"({type(key).__name__})"
    )


def describe(x: Any) -> str:
    """A short description of a value for error messages."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"an array of dtype {x.dtype} and shape {tuple(x.shape)}"
    return f"a {type(x).__name__} ({x!r:.40})"


def delta_items(delta: Any, what: str) -> list[tuple[str, AdapterNode | None]]:
    """``(path, node or None)`` for every leaf of a delta; any other leaf raises.

    Args:
        delta: a delta: adapter nodes and ``None`` holes.
        what: the public function that checks it, named in the message.

    Raises:
        TypeError: a leaf is neither an adapter node nor ``None`` (an array, say,
            when a parameter tree is passed where the delta belongs).
    """
    items = []
    for key_path, node in jax.tree_util.tree_flatten_with_path(delta, is_leaf=is_delta_leaf)[0]:
        path = path_str(key_path)
        if node is not None and not is_node(node):
            hint = (
                " It looks like a parameter tree: was base passed in the delta's place?"
                if hasattr(node, "shape")
                else ""
            )
            raise TypeError(
                f"{what}: delta holds {describe(node)} at {path!r}; a delta holds adapter nodes "
                "and None holes. Pass the second output of jaxlora.split "
                f"(base, delta = jaxlora.split(params, config, key=key)).{hint}"
            )
        items.append((path, node))
    return items
