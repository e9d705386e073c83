"""``adalora``: the optax wrapper that allocates AdaLoRA's rank budget while training.

The schedule and importance scores are described in :mod:`jaxlora.variants.adalora`.

References:
    Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
    Fine-Tuning", https://arxiv.org/abs/2303.10512.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlora.variants.adalora import AdaLoraConfig, AdaLoraNode, adalora_nodes, flatten_nodes

__all__ = ["AdaLoraState", "adalora"]


class AdaLoraState(NamedTuple):
    """The state of :func:`adalora`.

    Attributes:
        count: optimizer steps taken (int32).
        inner: the wrapped optimizer's state.
        ipt: per AdaLoRA node (in tree order), the smoothed importance of ``(p, e, q)``
            (float32).
        unc: the same for the smoothed uncertainty.
        mask: per node, ``(*stacked, r)`` bools: ``True`` where a triplet is kept.
        budget: the number of kept triplets at the last allocation (int32).

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxlora
        >>> from jaxlora.variants import AdaLoraConfig, adalora
        >>> config = AdaLoraConfig(init_rank=3, target_rank=1, total_step=4, targets="w")
        >>> _, delta = jaxlora.split({"w": jnp.ones((5, 4))}, config, key=jax.random.key(0))
        >>> state = adalora(config, optax.sgd(0.1)).init(delta)
        >>> int(state.count), int(state.budget), [m.shape for m in state.mask]
        (0, 3, [(3,)])

    References:
        Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
        Fine-Tuning", https://arxiv.org/abs/2303.10512.
    """

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
    inner: Any
    ipt: tuple
    unc: tuple
    mask: tuple
    budget: jax.Array


def adalora(
    config: AdaLoraConfig, optimizer: optax.GradientTransformation
) -> optax.GradientTransformation:
    """Wraps ``optimizer`` so that its updates allocate AdaLoRA's rank budget.

    ``tx.update(grads, state, delta)`` runs ``optimizer`` on ``grads``, updates
    the importance scores from ``grads`` and the stepped parameters, and on
    allocation steps (and every step of the final phase) returns updates that
    set the losing triplets' ``E`` to exactly zero. The step is traced once:
    the schedule is a table indexed by the step count, so allocation never
    recompiles. Use it where you would use ``optimizer`` with a LoRA delta.

    It wraps rather than chains because it needs both ends of the step: the raw
    gradients (for importance, before ``optimizer`` transforms them) and the
    final updates (to zero ``E`` exactly after ``optimizer`` has moved it).

    Args:
        config: the config that made the delta.
        optimizer: the optimizer for the delta, e.g. ``optax.adamw(1e-3)`` (the
            delta holds only trainable arrays: no mask is needed).

    Returns:
        A ``GradientTransformation`` whose state is an :class:`AdaLoraState`.

    Raises:
        ValueError: at ``init`` if the tree holds no :class:`AdaLoraNode`; at
            ``update`` if ``params`` is not given.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxlora
        >>> from jaxlora.variants import AdaLoraConfig, adalora, orthogonality_loss
        >>> config = AdaLoraConfig(init_rank=4, target_rank=2, total_step=6, targets="w")
        >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 6))}
        >>> base, delta = jaxlora.split(params, config, key=jax.random.key(1))
        >>> f = jaxlora.lora_apply(lambda p, x: x @ p["w"])
        >>> x, y = jnp.ones((4, 8)), jnp.ones((4, 6))
        >>> def loss(delta):
        ...     fit = jnp.mean((f(base, delta, x) - y) ** 2)
        ...     return fit + config.orth_reg_weight * orthogonality_loss(delta)
        >>> tx = adalora(config, optax.adam(1e-2))
        >>> @jax.jit
        ... def step(delta, state):
        ...     updates, state = tx.update(jax.grad(loss)(delta), state, delta)
        ...     return optax.apply_updates(delta, updates), state
        >>> state = tx.init(delta)
        >>> for _ in range(config.total_step):
        ...     delta, state = step(delta, state)
        >>> int(jnp.sum(delta["w"].e != 0)), int(state.budget)  # target_rank x 1 matrix
        (2, 2)

    References:
        Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
        Fine-Tuning", https://arxiv.org/abs/2303.10512.
    """
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(f"config must be an AdaLoraConfig; got {type(config).__name__}")
    final = config.total_step - config.tfinal

    def tables(n_matrices: int) -> tuple[jax.Array, jax.Array]:
        rows = [config.schedule(t, n_matrices=n_matrices) for t in range(config.total_step + 1)]
        budgets = np.array([b for b, _ in rows], np.int32)
        allocate = np.array([m for _, m in rows], bool)
        return jnp.asarray(budgets), jnp.asarray(allocate)

    def init(params: Any) -> AdaLoraState:
        nodes = adalora_nodes(params, "params")
        zeros = tuple(
            tuple(jnp.zeros(x.shape, jnp.float32) for x in (n.p, n.e, n.q)) for n in nodes
        )
        masks = tuple(jnp.ones(n.e.shape, bool) for n in nodes)
        return AdaLoraState(
            count=jnp.zeros((), jnp.int32),
            inner=optimizer.init(params),
            ipt=zeros,
            unc=zeros,
            mask=masks,
            budget=jnp.asarray(sum(int(m.size) for m in masks), jnp.int32),
        )

    def update(updates: Any, state: AdaLoraState, params: Any = None) -> tuple[Any, AdaLoraState]:
        if params is None:
            raise ValueError(
                "adalora needs the parameters: call tx.update(grads, state, delta), with the "
                "delta as the third argument."
            )
        grads = updates
        updates, inner = optimizer.update(grads, state.inner, params)
        step = state.count
        before, at, after = step < final, step == final, step > final
        n_matrices = sum(math.prod(m.shape[:-1]) for m in state.mask)
        budgets, allocate = tables(n_matrices)
        row = jnp.minimum(step, config.total_step)
        budget, allocate_now = budgets[row], allocate[row]

        g_nodes, p_nodes = adalora_nodes(grads, "grads"), adalora_nodes(params, "params")
        u_leaves, u_def = flatten_nodes(updates)
        u_index = [i for i, x in enumerate(u_leaves) if isinstance(x, AdaLoraNode)]
        if not (len(g_nodes) == len(p_nodes) == len(u_index) == len(state.mask)):
            raise ValueError(
                "grads, params and the optimizer state hold different numbers of AdaLoraNode "
                f"adapters ({len(g_nodes)}, {len(p_nodes)}, {len(state.mask)}). Pass the grads "
                "of the delta that tx.init was called with."
            )
        ipt, unc, scores = [], [], []
        for g, p, i_u, old_ipt, old_unc in zip(
            g_nodes, p_nodes, u_index, state.ipt, state.unc, strict=True
        ):
            u = u_leaves[i_u]
            node_ipt, node_unc = [], []
            for name, prev_i, prev_u in zip(("p", "e", "q"), old_ipt, old_unc, strict=True):
                theta = getattr(p, name) + getattr(u, name)  # after the step, as PEFT
                sensitivity = jnp.abs(theta * getattr(g, name)).astype(jnp.float32)
                ema = config.beta1 * prev_i + (1 - config.beta1) * sensitivity
                ema_unc = config.beta2 * prev_u + (1 - config.beta2) * jnp.abs(sensitivity - ema)
                node_ipt.append(jnp.where(before, ema, prev_i))
                node_unc.append(jnp.where(before, ema_unc, prev_u))
            s_p, s_e, s_q = (i * u for i, u in zip(node_ipt, node_unc, strict=True))
            scores.append(s_e + jnp.mean(s_p, axis=-2) + jnp.mean(s_q, axis=-1))
            ipt.append(tuple(jnp.where(at, 0.0, x) for x in node_ipt))  # PEFT resets here
            unc.append(tuple(jnp.where(at, 0.0, x) for x in node_unc))

        keep = _top_budget(scores, budget)
        recompute = (before & allocate_now) | at
        masks = tuple(jnp.where(recompute, k, m) for k, m in zip(keep, state.mask, strict=True))
        apply = recompute | after
        for i_u, p, m in zip(u_index, p_nodes, masks, strict=True):
            u = u_leaves[i_u]
            e_update = jnp.where(apply & ~m, -p.e, u.e).astype(u.e.dtype)  # p.e + (-p.e) == 0
            u_leaves[i_u] = dataclasses.replace(u, e=e_update)
        new_state = AdaLoraState(
            count=optax.safe_int32_increment(step),
            inner=inner,
            ipt=tuple(ipt),
            unc=tuple(unc),
            mask=masks,
            budget=jnp.where(recompute, budget, state.budget).astype(jnp.int32),
        )
        return u_def.unflatten(u_leaves), new_state

    return optax.GradientTransformation(init, update)


def _top_budget(scores: list[jax.Array], budget: jax.Array) -> list[jax.Array]:
    """Per node, ``True`` on the ``budget`` highest-scoring triplets of all nodes together.

    Exactly ``budget`` are kept (ties broken by position), unlike a threshold.
    """
    flat = jnp.concatenate([s.reshape(-1) for s in scores])
    order = jnp.argsort(flat, stable=True)
    position = (
        jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    )
    keep = position >= flat.size - budget
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.size].reshape(s.shape))
        start += s.size
    return out
