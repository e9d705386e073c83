"""Argument checks shared by the public functions: PRNG keys, trees that hold adapter nodes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_key"]


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
