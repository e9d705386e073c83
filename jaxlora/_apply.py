"""``lora_apply``: run an apply function with adapted weights."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxlora import _engine, _paths
from jaxlora._checks import check_key
from jaxlora._config import check_bool
from jaxlora._engine._routing import ROUTINGS
from jaxlora._merge import check_structure, merge
from jaxlora._node import is_delta_leaf

STRATEGIES = ("use-site", "merge")


def lora_apply(
    fn: Callable[..., Any],
    *,
    strategy: str = "use-site",
    strict: bool = False,
    routing: str = "auto",
    forward_mode: bool = False,
) -> Callable[..., Any]:
    """Wraps ``fn(params, *args, **kwargs)`` into ``wrapped(base, delta, *args, **kwargs)``.

    ``wrapped`` returns what ``fn(merge(base, delta), *args, **kwargs)`` returns.
    With the default ``"use-site"`` strategy it never builds the merged weights:
    ``fn`` is traced, and where an adapted weight ``W`` meets a matmul
    (``dot_general``, any dimension numbers), a grouped matmul
    (``lax.ragged_dot``: mixture-of-experts), a convolution or an embedding
    lookup, the engine computes ``x@W + s·(x@a)@b`` there. Training then holds
    no second copy of the model for the backward pass. Views of a weight
    (transpose, reshape, cast, slices such as a layer or an expert of a stack,
    ``w[i]``), weight norms (a multiplier per output unit, a sum of squares
    over the inputs) are followed, and ``jit``, ``scan``
    (``nn.scan``-stacked layers), ``while``, ``cond``, ``remat``, ``shard_map``
    (each shard gets its slice of the factors) and custom derivative rules are
    entered. Any other use of an adapted weight merges it at that use only and
    warns once (:class:`FallbackWarning`), or raises (:class:`FallbackError`)
    when ``strict=True``.

    ``wrapped`` also takes ``dropout_key=``: a PRNG key that turns on dropout
    (at each adapter's ``LoraConfig.dropout`` rate) on the input of the
    low-rank branch, as PEFT does. The ``i``-th use site (from 1, in trace
    order) draws its mask from ``jax.random.fold_in(dropout_key, i)``; scanned
    layers split that key per iteration. Without a key, no dropout is applied.

    With a stacked delta (:func:`jaxlora.stack`), ``wrapped`` takes
    ``adapter_ids=``: one adapter index per example (``-1``: the bare base
    model), and example ``i`` (axis 0 of the activations) is computed with
    adapter ``adapter_ids[i]``, all in one pass. An id outside ``[-1, n)``
    raises; under ``jit`` (a traced id) its example's output is NaN instead.
    ``routing`` says how: ``"gather"`` copies each example's factors (cost
    independent of how many adapters the batch uses), ``"grouped"`` groups the
    batch by adapter and reads each adapter once (cost growing with the number
    of distinct adapters), and ``"auto"`` picks between them at run time by the
    number of distinct adapters in the batch, at the crossover measured on CPU
    (``python -m benchmarks.multi``; README, "Many adapters").

    The gradient of each low-rank branch is a custom VJP laid out so that XLA
    never transposes an activation-sized array for the factor gradients (on
    CPU, without it a LoRA train step on all-MiniLM-L6-v2, attention + MLP at
    r = 16, cost 1.36x a full fine-tuning step; with it, 0.62x:
    ``python -m benchmarks.speed``). A custom
    VJP has no forward-mode derivative: ``jax.jvp``, ``jax.jacfwd``,
    ``jax.hessian`` or ``jax.linearize`` through ``wrapped`` raise JAX's
    ``TypeError`` "can't apply forward-mode autodiff (jvp) to a custom_vjp
    function" unless ``forward_mode=True``, which keeps JAX's own derivative
    of the same computation (the same values; a slower backward pass on CPU).
    Inside a ``while`` loop, which JAX differentiates in forward mode only,
    JAX's derivative is always used.

    Args:
        fn: any function whose first argument is the parameter tree, such as a
            Flax ``model.apply`` wrapped to take the params.
        strategy: ``"use-site"`` (the default, described above) or ``"merge"``
            (build ``W + s·a@b`` for every adapted weight, then call ``fn``:
            right for inference, costly for training).
        strict: raise instead of merging a weight at a use the engine cannot factor.
        routing: ``"auto"``, ``"gather"`` or ``"grouped"``: how a batch routed to
            several adapters (``adapter_ids=``) is computed; the results agree.
        forward_mode: allow forward-mode derivatives through adapted weights
            (see above).

    Returns:
        The wrapped function. It works under ``jit``, ``grad``, ``vmap`` and with
        sharded arrays.

    Raises:
        TypeError: if ``fn`` is not callable.
        ValueError: for an unknown strategy or routing; when called, if ``base`` and
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
    check_bool("strict", strict)
    check_bool("forward_mode", forward_mode)
    if not callable(fn):
        raise TypeError(
            f"lora_apply wraps a function fn(params, *args); got {fn!r:.60} "
            f"({type(fn).__name__}). Pass e.g. "
            "lambda params, x: model.apply({'params': params}, x)"
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}; got {routing!r}")
    warned: set[tuple[str, str]] = set()

    @functools.wraps(fn)
    def wrapped(
        base: Any,
        delta: Any,
        *args: Any,
        dropout_key: jax.Array | None = None,
        adapter_ids: jax.Array | None = None,
        **kwargs: Any,
    ) -> Any:
        check_structure(base, delta)
        if dropout_key is not None:
            check_key("dropout_key", dropout_key)
        adapter_ids = _check_adapter_ids(delta, adapter_ids, strategy)
        if strategy == "merge":
            if dropout_key is not None:
                raise ValueError(
                    "dropout needs the use-site strategy: the merge strategy has no low-rank "
                    "branch to drop. Use lora_apply(fn, strategy='use-site')."
                )
            return fn(merge(base, delta), *args, **kwargs)
        treedef = jax.tree.structure(base, is_leaf=_paths.is_box)
        nodes = treedef.flatten_up_to(delta)
        return _engine.use_site_call(
            fn,
            base,
            nodes,
            args,
            kwargs,
            strict=strict,
            warned=warned,
            dropout_key=dropout_key,
            adapter_ids=adapter_ids,
            routing=routing,
            forward_mode=forward_mode,
        )

    return wrapped


def _check_adapter_ids(delta: Any, adapter_ids: Any, strategy: str) -> jax.Array | None:
    nodes = [n for n in jax.tree.leaves(delta, is_leaf=is_delta_leaf) if n is not None]
    stacked = [n.n_adapters is not None for n in nodes]
    if adapter_ids is None:
        if any(stacked):
            raise ValueError(
                "this delta stacks several adapters (jaxlora.stack): pass adapter_ids=, one "
                "adapter index per example (-1 for the bare base model)"
            )
        return None
    if not all(stacked):
        raise ValueError(
            "adapter_ids= needs a delta from jaxlora.stack([delta_1, ..., delta_n]); this "
            "delta holds one adapter per weight"
        )
    if strategy != "use-site":
        raise ValueError(
            "adapter_ids= needs the use-site strategy (one merged weight per "
            "example would be a copy of the model per example)"
        )
    ids = jax.numpy.asarray(adapter_ids)
    if ids.ndim != 1 or not jax.numpy.issubdtype(ids.dtype, jax.numpy.integer):
        raise ValueError(
            f"adapter_ids must be a 1-D integer array (one id per example); got shape "
            f"{ids.shape} and dtype {ids.dtype}"
        )
    n = min(node.n_adapters for node in nodes)
    if not isinstance(ids, jax.core.Tracer):
        bad = np.flatnonzero((np.asarray(ids) < -1) | (np.asarray(ids) >= n))
        if bad.size:
            raise ValueError(
                f"adapter_ids[{int(bad[0])}] = {int(np.asarray(ids)[bad[0]])} is out of range: "
                f"the delta stacks {n} adapters, so ids run from 0 to {n - 1}, and -1 means "
                f"the bare base model ({bad.size} id(s) out of range)"
            )
    return ids
