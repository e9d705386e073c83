"""``lora_apply``: run an apply function with adapted weights."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from jaxlora._split import merge

STRATEGIES = ("merge",)


def lora_apply(fn: Callable[..., Any], *, strategy: str = "merge") -> Callable[..., Any]:
    """Wraps ``fn(params, *args, **kwargs)`` into ``wrapped(base, delta, *args, **kwargs)``.

    ``wrapped`` returns what ``fn(merge(base, delta), *args, **kwargs)`` returns.

    Args:
        fn: any function whose first argument is the parameter tree, such as a
            Flax ``model.apply`` wrapped to take ``{"params": ...}``.
        strategy: ``"merge"`` builds ``W + s·a@b`` for each adapted weight and
            calls ``fn``.

    Returns:
        The wrapped function; it works under ``jit``, ``grad`` and ``vmap``.

    Raises:
        ValueError: for an unknown strategy.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"w": jax.random.normal(jax.random.key(0), (3, 2))}
        >>> base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=1, targets="w"),
        ...                             key=jax.random.key(1))
        >>> f = jaxlora.lora_apply(lambda p, x: x @ p["w"])
        >>> x = jnp.ones((4, 3))
        >>> bool(jnp.allclose(jax.jit(f)(base, delta, x), x @ params["w"]))
        True
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")

    @functools.wraps(fn)
    def wrapped(base: Any, delta: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(merge(base, delta), *args, **kwargs)

    return wrapped
