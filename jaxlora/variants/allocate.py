"""Layer-wise rank allocation from calibration gradients."""

from __future__ import annotations

import heapq
import math
import numbers
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _paths
from jaxlora._config import LoraConfig

__all__ = ["allocate_ranks"]


def allocate_ranks(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batches: Iterable[Any],
    config: LoraConfig,
    *,
    budget: int,
    min_rank: int = 1,
) -> dict[str, int]:
    """Ranks per targeted weight that fit a parameter budget, from the loss's gradients.

    A LoRA update of rank ``r`` to ``W`` can follow at most the top ``r``
    singular directions of the gradient ``G = ∂loss/∂W``; the squared norm of
    the gradient it can represent is ``σ_1² + … + σ_r²``. With a total step size
    fixed, the first-order loss decrease of all adapters together grows with
    the sum of those terms over weights. So each weight's gradient, averaged
    over ``batches`` at ``params``, is decomposed, and ranks are handed out one
    at a time to the weight whose next singular value buys the most squared
    gradient norm per adapter parameter (``σ_{r+1}² / (n_in + n_out)``), while
    the budget lasts. A weight with no gradient left (``σ_{r+1} = 0``) gets no
    more rank (singular values below float32 noise, as ``np.linalg.matrix_rank``
    judges it, count as zero), so the budget may be left partly unspent.

    Every targeted weight keeps at least ``min_rank``; ranks never exceed
    ``min(n_in, n_out)``. A stacked weight (``nn.scan``) has one rank for all
    its layers: its singular values are pooled over layers and a rank costs
    once per layer.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``, e.g. the training loss of
            the model with its own parameters (no adapters).
        params: the pretrained parameters (the same tree you will ``split``).
        batches: a few calibration batches (an iterable; each passed to ``loss_fn``).
        config: which weights to adapt and how their axes read (``targets``,
            ``exclude``, ``stacked_axes``, ``input_axes``); its ``rank`` is ignored.
        budget: the total number of adapter parameters (the ``a`` and ``b``
            entries of all adapters; DoRA's magnitudes come on top).
        min_rank: the smallest rank any targeted weight gets.

    Returns:
        ``{"^escaped/path$": rank}`` for every targeted weight: a ``rank_pattern``
        for ``LoraConfig`` (plain data: save it as JSON and reuse it). Keep
        ``alpha=None`` (or ``rslora=True``) so that the scale stays sensible
        across ranks.

    Raises:
        ValueError: if ``budget`` cannot give every target ``min_rank``, if
            ``batches`` is empty, if ``targets`` match nothing, or for bad values.
        TypeError: if ``config`` is not a ``LoraConfig``.

    Example:
        >>> import dataclasses, jax, jax.numpy as jnp, jaxlora
        >>> from jaxlora.variants import allocate_ranks
        >>> k = jax.random.split(jax.random.key(0), 4)
        >>> params = {"l0": {"kernel": jax.random.normal(k[0], (8, 8))},
        ...           "l1": {"kernel": jax.random.normal(k[1], (8, 8))}}
        >>> change = jax.random.normal(k[2], (8, 3)) @ jax.random.normal(k[3], (3, 8))
        >>> def loss_fn(p, x):  # only l1 needs to move, by a rank-3 change
        ...     target = x @ (params["l1"]["kernel"] + change)
        ...     return (jnp.sum((x @ p["l0"]["kernel"] - x @ params["l0"]["kernel"]) ** 2)
        ...             + jnp.sum((x @ p["l1"]["kernel"] - target) ** 2))
        >>> batches = [jax.random.normal(jax.random.key(i), (16, 8)) for i in range(2)]
        >>> config = jaxlora.LoraConfig(targets="kernel")
        >>> pattern = allocate_ranks(loss_fn, params, batches, config, budget=4 * 16)
        >>> pattern
        {'^l0/kernel$': 1, '^l1/kernel$': 3}
        >>> config = dataclasses.replace(config, rank_pattern=pattern)
        >>> base, delta = jaxlora.split(params, config, key=jax.random.key(1))
        >>> delta["l1"]["kernel"].rank
        3

    References:
        Zhang et al. 2023 (budget allocation by importance, AdaLoRA),
        https://arxiv.org/abs/2303.10512; Hu et al. 2021 (LoRA),
        https://arxiv.org/abs/2106.09685.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a jaxlora.LoraConfig; got {type(config).__name__}")
    for name, value, minimum in (("budget", budget, 1), ("min_rank", min_rank, 1)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int; got {value!r}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}; got {value}")

    matches = config.matcher()
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_paths.is_box)
    targeted = []
    for index, (key_path, leaf) in enumerate(flat):
        path, value = _paths.path_str(key_path), _paths.unbox(leaf)
        if _paths.is_float_array(value) and value.ndim >= 2 and matches(path, value):
            targeted.append((index, path, config.layout_for(path, tuple(value.shape))))
    if not targeted:
        raise ValueError(
            f"targets={config.targets!r} (exclude={config.exclude!r}) matched no adaptable "
            "parameter; pass the config you will split with."
        )

    grads = _mean_gradient(loss_fn, flat, treedef, [i for i, _, _ in targeted], batches)
    ranks, costs, gains = {}, {}, {}
    for (_, path, layout), g in zip(targeted, grads, strict=True):
        max_rank = min(layout.n_in, layout.n_out)
        if min_rank > max_rank:
            raise ValueError(
                f"min_rank={min_rank} exceeds min(in, out) = {max_rank} of {path!r}; lower it."
            )
        matrices = np.asarray(g, np.float64).reshape(-1, layout.n_in, layout.n_out)
        sigma = np.linalg.svd(matrices, compute_uv=False)
        # numerical rank, as np.linalg.matrix_rank: float32 gradients carry noise at this level
        noise = sigma[:, :1] * max(layout.n_in, layout.n_out) * np.finfo(np.float32).eps
        sigma = np.where(sigma > noise, sigma, 0.0)
        energy = np.square(sigma).sum(axis=0)  # pooled over stacked layers
        ranks[path] = min_rank
        costs[path] = math.prod(layout.stacked) * (layout.n_in + layout.n_out)
        gains[path] = energy[:max_rank]
    floor = sum(min_rank * c for c in costs.values())
    if budget < floor:
        raise ValueError(
            f"budget={budget} cannot give each of the {len(costs)} targeted weights "
            f"min_rank={min_rank}: that alone takes {floor} parameters. Raise the budget, "
            "lower min_rank or target fewer weights."
        )
    remaining = budget - floor
    order = {path: i for i, path in enumerate(costs)}
    heap = [(-_ratio(gains, costs, p, ranks[p]), order[p], p) for p in costs]
    heapq.heapify(heap)
    while heap:
        neg_ratio, i, path = heapq.heappop(heap)
        rank = ranks[path]
        if -neg_ratio <= 0.0 or rank >= len(gains[path]) or costs[path] > remaining:
            continue  # no gradient left, full rank, or too expensive: done with this weight
        ranks[path] = rank + 1
        remaining -= costs[path]
        heapq.heappush(heap, (-_ratio(gains, costs, path, rank + 1), i, path))
    return {f"^{re.escape(path)}$": int(rank) for path, rank in ranks.items()}


def _ratio(gains: dict, costs: dict, path: str, rank: int) -> float:
    """Squared gradient norm per parameter of the next rank (0 beyond full rank)."""
    g = gains[path]
    return float(g[rank]) / costs[path] if rank < len(g) else 0.0


def _mean_gradient(
    loss_fn: Callable[[Any, Any], jax.Array],
    flat: list,
    treedef: Any,
    indices: list[int],
    batches: Iterable[Any],
) -> list[jax.Array]:
    """The gradient of ``loss_fn`` w.r.t. the leaves at ``indices``, averaged over batches."""
    leaves = [leaf for _, leaf in flat]

    def loss(weights: list, batch: Any) -> jax.Array:
        slots = list(leaves)
        for i, w in zip(indices, weights, strict=True):
            slots[i] = _paths.rebox(slots[i], w)
        return loss_fn(treedef.unflatten(slots), batch)

    grad = jax.jit(jax.grad(loss))
    weights = [_paths.unbox(leaves[i]) for i in indices]
    total, n = None, 0
    for batch in batches:
        g = grad(weights, batch)
        total = g if total is None else [t + x for t, x in zip(total, g, strict=True)]
        n += 1
    if total is None:
        raise ValueError("batches is empty; pass a few calibration batches.")
    return [jnp.asarray(t, jnp.float32) / n for t in total]
