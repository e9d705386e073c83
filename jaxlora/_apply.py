"""``lora_apply``: run an apply function with adapted weights."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from jaxlora import _engine, _paths
from jaxlora._delta import is_delta_leaf
from jaxlora._split import check_structure, merge

STRATEGIES = ("use-site", "merge")


def lora_apply(
    fn: Callable[..., Any], *, strategy: str = "use-site", strict: bool = False
) -> Callable[..., Any]:
    """Wraps ``fn(params, *args, **kwargs)`` into ``wrapped(base, delta, *args, **kwargs)``.

    ``wrapped`` returns what ``fn(merge(base, delta), *args, **kwargs)`` returns.
    With the default ``"use-site"`` strategy it never builds the merged weights:
    ``fn`` is traced, and where an adapted weight ``W`` meets a matmul
    (``dot_general``, any dimension numbers), a convolution or an embedding
    lookup, the engine computes ``x@W + s·(x@a)@b`` there. Training then holds
    no second copy of the model for the backward pass. Views of a weight
    (transpose, reshape, cast) are followed, and ``jit``, ``scan``
    (``nn.scan``-stacked layers), ``while``, ``cond``, ``remat`` and custom
    derivative rules are entered. Any other use of an adapted weight merges it
    at that use only and warns once (:class:`FallbackWarning`), or raises
    (:class:`FallbackError`) when ``strict=True``.

    ``wrapped`` also takes ``dropout_key=``: a PRNG key that turns on dropout
    (at each adapter's ``LoraConfig.dropout`` rate) on the input of the
    low-rank branch, as PEFT does. Without it, no dropout is applied.

    Args:
        fn: any function whose first argument is the parameter tree, such as a
            Flax ``model.apply`` wrapped to take the params.
        strategy: ``"use-site"`` (the default, described above) or ``"merge"``
            (build ``W + s·a@b`` for every adapted weight, then call ``fn``:
            right for inference, costly for training).
        strict: raise instead of merging a weight at a use the engine cannot factor.

    Returns:
        The wrapped function. It works under ``jit``, ``grad``, ``vmap`` and with
        sharded arrays.

    Raises:
        ValueError: for an unknown strategy; when called, if ``base`` and
            ``delta`` do not match, or if a dropout key is given to the merge
            strategy.

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
    warned: set[tuple[str, str]] = set()

    @functools.wraps(fn)
    def wrapped(
        base: Any, delta: Any, *args: Any, dropout_key: jax.Array | None = None, **kwargs: Any
    ) -> Any:
        check_structure(base, delta)
        if strategy == "merge":
            if dropout_key is not None:
                raise ValueError(
                    "dropout needs the use-site strategy: the merge strategy has no low-rank "
                    "branch to drop. Use lora_apply(fn, strategy='use-site')."
                )
            return fn(merge(base, delta), *args, **kwargs)
        treedef = jax.tree.structure(base, is_leaf=_paths.is_box)
        nodes = treedef.flatten_up_to(jax.tree.map(lambda x: x, delta, is_leaf=is_delta_leaf))
        return _engine.use_site_call(
            fn, base, nodes, args, kwargs, strict=strict, warned=warned, dropout_key=dropout_key
        )

    return wrapped
