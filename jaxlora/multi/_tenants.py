"""Training many adapters at once: one step, each adapter as if trained alone.

A stacked delta (:func:`jaxlora.stack` with ``fold_scales=False``) holds ``n``
adapters of one base, of any ranks and alphas. One compiled step trains all of
them on a batch whose examples carry adapter ids:

* :func:`per_adapter_loss` sums each adapter's *mean* loss over its own
  examples, so that adapter ``i``'s gradient is the one it gets trained alone
  on those examples;
* :func:`per_adapter` runs an optax optimizer on each adapter separately (the
  optimizer is vmapped over the adapter axis: its own state, global-norm
  clipping over its own gradients), with a learning rate per adapter, and keeps
  the rank components that :func:`jaxlora.stack` padded at zero;
* :func:`unstack` gives back ``n`` ordinary deltas, at their own ranks and
  scales, for :func:`jaxlora.save_adapter`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlora._node import is_delta_leaf
from jaxlora.multi._stack import stacked_nodes

__all__ = ["per_adapter", "per_adapter_loss", "unstack"]


def unstack(stacked: Any) -> list[Any]:
    """The ``n`` deltas of a stacked delta, each at its own rank and scale.

    The inverse of :func:`jaxlora.stack` (with ``fold_scales=False``): padded
    rank components are cut off and per-adapter scales restored, so each
    delta has the structure of the one that was stacked and can be saved with
    :func:`jaxlora.save_adapter` under that adapter's config.

    Args:
        stacked: a delta of :class:`StackedNode` adapters.

    Returns:
        A list of ``n`` deltas.

    Raises:
        ValueError: if ``stacked`` is not a stacked delta.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"w": jnp.ones((4, 3))}
        >>> deltas = [jaxlora.split(params, jaxlora.LoraConfig(rank=r, alpha=4.0, targets="w"),
        ...                         key=jax.random.key(r))[1] for r in (1, 2)]
        >>> back = jaxlora.multi.unstack(jaxlora.stack(deltas, fold_scales=False))
        >>> [d["w"].rank for d in back], [d["w"].scale for d in back]
        ([1, 2], [4.0, 2.0])
    """
    n = stacked_nodes(stacked, "unstack")[0].n_adapters

    def one(i: int) -> Any:
        def node(x: Any) -> Any:
            if x is None:
                return None
            adapter = x.select(i)
            own = x.own_ranks()[i]
            return adapter if own == adapter.rank else adapter.truncate_rank(own)

        return jax.tree.map(node, stacked, is_leaf=is_delta_leaf)

    return [one(i) for i in range(n)]


def per_adapter_loss(
    losses: jax.Array, adapter_ids: jax.Array, n_adapters: int
) -> tuple[jax.Array, jax.Array]:
    """``(total, per_adapter)``: each adapter's mean loss over its examples, and their sum.

    Differentiating ``total`` gives every adapter the gradient of its own mean
    loss, as if it were trained alone on its examples (a plain mean over the
    batch would weight each adapter by its share of the batch). Examples with
    id ``-1`` count for none; an adapter without examples has loss 0.

    Args:
        losses: ``(batch,)`` per-example losses.
        adapter_ids: ``(batch,)`` int: each example's adapter, ``-1`` for none.
        n_adapters: the number of adapters (the stack's size).

    Returns:
        The scalar total and the ``(n_adapters,)`` per-adapter means.

    Raises:
        ValueError: for mismatched shapes or ``n_adapters < 1``.

    Example:
        >>> import jax.numpy as jnp, jaxlora
        >>> total, each = jaxlora.multi.per_adapter_loss(
        ...     jnp.array([1.0, 3.0, 5.0]), jnp.array([0, 0, 1]), 2)
        >>> float(total), each.tolist()
        (7.0, [2.0, 5.0])
    """
    losses, ids = jnp.asarray(losses), jnp.asarray(adapter_ids)
    if not isinstance(n_adapters, numbers.Integral) or n_adapters < 1:
        raise ValueError(f"n_adapters must be an int >= 1; got {n_adapters!r}")
    if losses.ndim != 1 or ids.shape != losses.shape:
        raise ValueError(
            f"losses and adapter_ids must both be (batch,): one loss and one id per example; "
            f"got shapes {losses.shape} and {ids.shape}"
        )
    one_hot = jax.nn.one_hot(ids, n_adapters, dtype=losses.dtype)  # id -1: a row of zeros
    counts = one_hot.sum(axis=0)
    each = (one_hot * losses[:, None]).sum(axis=0) / jnp.maximum(counts, 1)
    return each.sum(), each


class PerAdapterState(NamedTuple):
    """The state of :func:`per_adapter`: the wrapped optimizer's, per adapter, and a step count."""

    inner: Any
    count: jax.Array


LearningRate = float | Callable[[jax.Array], jax.Array]


def per_adapter(
    tx: optax.GradientTransformation,
    *,
    learning_rates: Sequence[LearningRate] | None = None,
) -> optax.GradientTransformation:
    """An optimizer of stacked deltas that updates each adapter as if it were trained alone.

    ``tx`` is vmapped over the adapter axis: every adapter gets its own state
    (moments, step counts) and any tree-wide operation of ``tx`` (such as
    ``optax.clip_by_global_norm``) sees only that adapter's gradients.
    Gradients and updates are masked to each adapter's own rank (see
    :class:`StackedNode`), so the rank components that :func:`jaxlora.stack`
    padded never train.

    Args:
        tx: the optimizer of one adapter. With ``learning_rates``, give it
            learning rate 1 (``optax.adamw(1.0, weight_decay=0.01)``): adapter
            ``i``'s updates are multiplied by ``learning_rates[i]``, which for
            optax's optimizers (their last step scales by the learning rate)
            is ``tx`` built with that learning rate.
        learning_rates: one per adapter: a float, or a schedule (a function of
            the step count, like ``optax.cosine_decay_schedule(...)``).

    Returns:
        An ``optax.GradientTransformation`` whose ``update`` needs ``params``
        (the stacked delta).

    Raises:
        ValueError: when used, for a tree that is not a stacked delta, or a
            number of learning rates that is not the number of adapters.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxlora
        >>> params = {"w": jnp.ones((4, 3))}
        >>> deltas = [jaxlora.split(params, jaxlora.LoraConfig(rank=r, targets="w"),
        ...                         key=jax.random.key(r))[1] for r in (1, 2)]
        >>> stacked = jaxlora.stack(deltas, fold_scales=False)
        >>> tx = jaxlora.multi.per_adapter(optax.adam(1.0), learning_rates=[0.1, 0.01])
        >>> state = tx.init(stacked)
        >>> grads = jax.tree.map(jnp.ones_like, stacked)
        >>> updates, state = tx.update(grads, state, stacked)
        >>> updates["w"].inner.a[:, 0, :].tolist()  # adapter 0: rank 1, its padding stays 0
        [[-0.1..., 0.0], [-0.01..., -0.01...]]
    """
    rates = None if learning_rates is None else list(learning_rates)

    def check(tree: Any) -> int:
        n = stacked_nodes(tree, "per_adapter")[0].n_adapters
        if rates is not None and len(rates) != n:
            raise ValueError(
                f"per_adapter got {len(rates)} learning rates for a stack of {n} adapters; "
                "pass one per adapter"
            )
        return n

    def init(params: Any) -> PerAdapterState:
        check(params)
        return PerAdapterState(jax.vmap(tx.init)(params), jnp.zeros((), jnp.int32))

    def update(grads: Any, state: PerAdapterState, params: Any = None) -> tuple:
        if params is None:
            raise ValueError("per_adapter's update needs params= (the stacked delta)")
        n = check(params)
        masks = jax.tree.map(
            lambda node: None if node is None else node.masks(), params, is_leaf=is_delta_leaf
        )
        grads = jax.tree.map(jnp.multiply, grads, masks)
        updates, inner = jax.vmap(tx.update)(grads, state.inner, params)
        updates = jax.tree.map(jnp.multiply, updates, masks)
        if rates is not None:
            lr = jnp.stack([jnp.asarray(r(state.count) if callable(r) else r) for r in rates])
            lr = lr.astype(jnp.float32)
            updates = jax.tree.map(
                lambda u: (u * lr.reshape((n,) + (1,) * (u.ndim - 1))).astype(u.dtype), updates
            )
        return updates, PerAdapterState(inner, optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init, update)
