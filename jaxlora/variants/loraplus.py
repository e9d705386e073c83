"""LoRA+: a larger learning rate for ``b`` than for ``a``."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import optax

from jaxlora._node import is_node

__all__ = ["loraplus"]

# Node fields trained at ``ratio × lr``: the output-side factor of each adapter type.


def loraplus(
    optimizer_factory: Callable[[Any], optax.GradientTransformation],
    lr: float | optax.Schedule,
    *,
    ratio: float = 16.0,
) -> optax.GradientTransformation:
    """An optimizer for a delta that trains ``b`` at ``ratio`` times ``a``'s learning rate.

    The delta's leaves fall into three groups, each with its own optimizer
    state: the output-side factors (each node type's ``output_factor``: ``b`` of
    LoRA, DoRA and VeRA nodes, ``q`` of AdaLoRA nodes) get
    ``optimizer_factory(ratio · lr)``; every other adapter leaf (``a``, DoRA's
    ``m``, VeRA's ``d``, AdaLoRA's ``p`` and ``e``) gets ``optimizer_factory(lr)``;
    leaves outside adapter nodes (a base trained next to the delta) get zero
    updates and no state. PEFT's
    ``create_loraplus_optimizer`` also puts 1-D parameters (DoRA's magnitude)
    in the fast group and gives embeddings their own rate; here the rule is by
    role only.

    Args:
        optimizer_factory: ``learning_rate -> GradientTransformation``, e.g.
            ``optax.adamw`` or ``lambda lr: optax.adamw(lr, weight_decay=0.01)``.
        lr: ``a``'s learning rate: a float or an optax schedule.
        ratio: ``b``'s learning rate over ``a``'s (the paper's ``λ``; 16 is its
            default for most tasks).

    Returns:
        A ``GradientTransformation`` for the delta (labels come from its structure
        at ``init``/``update``, so any delta works).

    Raises:
        ValueError: if ``ratio`` is not a positive number.
        TypeError: if ``optimizer_factory`` is not callable.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxlora
        >>> from jaxlora.variants import loraplus
        >>> params = {"w": jax.random.normal(jax.random.key(0), (4, 3))}
        >>> base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2, targets="w"),
        ...                             key=jax.random.key(1))
        >>> tx = loraplus(optax.sgd, 0.1, ratio=16)
        >>> grads = jax.tree.map(jnp.ones_like, delta)
        >>> updates, _ = tx.update(grads, tx.init(delta), delta)
        >>> float(updates["w"].a[0, 0]), float(updates["w"].b[0, 0])
        (-0.1, -1.6)

    References:
        Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
        https://arxiv.org/abs/2402.12354.
    """
    if not callable(optimizer_factory):
        raise TypeError(
            "optimizer_factory must be a callable learning_rate -> GradientTransformation, "
            f"e.g. optax.adamw; got {optimizer_factory!r}"
        )
    if (
        not isinstance(ratio, numbers.Real)
        or isinstance(ratio, bool)
        or not (math.isfinite(ratio) and ratio > 0)
    ):
        raise ValueError(f"ratio must be a finite positive number; got {ratio!r}")
    fast = (lambda step: ratio * lr(step)) if callable(lr) else ratio * lr
    return optax.transforms.partition(
        {"a": optimizer_factory(lr), "b": optimizer_factory(fast), "frozen": optax.set_to_zero()},
        _labels,
    )


def _labels(tree: Any) -> Any:
    """``"a"``, ``"b"`` or ``"frozen"`` for every leaf of a delta."""

    def one(x: Any) -> Any:
        if not is_node(x):
            return "frozen"
        fast = x.output_factor
        return dataclasses.replace(
            x, **{name: "b" if name == fast else "a" for name in x.trainable_fields()}
        )

    return jax.tree.map(one, tree, is_leaf=is_node)
