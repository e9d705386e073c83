"""AdaLoRA: adaptive budget allocation over SVD-form adapters, as PEFT implements it.

Each adapted weight gets ``W' = W + s · P · diag(E) · Q`` with ``P: (n_in, r)``,
``E: (r,)`` and ``Q: (r, n_out)``, ``r = init_rank``. During training the
triplets ``(P_:i, E_i, Q_i:)`` compete for a global budget of
``target_rank × (number of adapted matrices)`` that shrinks on a cubic
schedule; a triplet that loses has ``E_i`` set to zero. Shapes never change,
so allocation never recompiles, and a pruned triplet may come back at a later
allocation step (PEFT's behaviour) until the final phase fixes the pattern.

The pieces:

* :class:`AdaLoraConfig` and :func:`jaxlora.split`: the SVD-form nodes
  (:class:`AdaLoraNode`), ``E = 0`` and ``P, Q ~ N(0, 0.02²)`` at the start;
* :func:`adalora` (in :mod:`jaxlora.variants.adalora_optimizer`): wraps the user's
  optax optimizer; it tracks the importance ``|θ · ∇θ|`` of every entry of ``P``,
  ``E`` and ``Q`` (smoothed with ``beta1``, with the uncertainty ``|I - Ī|``
  smoothed with ``beta2``), scores each triplet
  ``S(E_i) + mean_in S(P_:i) + mean_out S(Q_i:)`` with ``S = Ī · Ū``, and masks ``E``
  on the schedule in its returned updates;
* :func:`orthogonality_loss`: the regularizer ``‖PᵀP - I‖_F`` and ``‖QQᵀ - I‖_F``,
  to add to the loss with ``config.orth_reg_weight``;
* :func:`to_lora`: after training, a plain LoRA delta of the surviving ranks.

Step ``t`` (the optimizer's update count, from 0) follows PEFT's
``update_and_allocate(t)``: importance is updated while ``t < total_step -
tfinal``; the budget is ``init`` up to ``tinit``, then
``target + (init - target)·(1 - (t - tinit)/(total_step - tfinal - tinit))³``
(rounded down) with masking every ``delta_t`` steps; at ``t = total_step -
tfinal`` the mask is fixed at the target budget and re-applied at every later
step. Like PEFT, importance multiplies the gradient with the parameter after
the optimizer's step.

References:
    Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
    Fine-Tuning", https://arxiv.org/abs/2303.10512.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _paths
from jaxlora._config import check_node_matches, register_config
from jaxlora._delta import LoraNode
from jaxlora._node import AdapterNode, is_node
from jaxlora._paths import Layout
from jaxlora.io.peft._adalora import AdaLoraCodec
from jaxlora.io.peft._format import register_codec
from jaxlora.variants._common import (
    TargetsConfig,
    check_int,
    check_positive,
    check_unit_interval,
)

__all__ = [
    "AdaLoraConfig",
    "AdaLoraNode",
    "orthogonality_loss",
    "to_lora",
]

_INIT_STD = 0.02


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaLoraNode(AdapterNode, kind="adalora"):
    """The SVD-form adapter of one weight: ``W' = W + s · (P · diag(E)) @ Q``.

    Attributes:
        p: ``(*stacked, n_in, r)``, trainable (PEFT's ``lora_A``, transposed).
        e: ``(*stacked, r)``, trainable singular values (PEFT's ``lora_E``); zero
            entries are pruned triplets.
        q: ``(*stacked, r, n_out)``, trainable (PEFT's ``lora_B``, transposed).
        scale: ``alpha / init_rank``, a static float.
        layout: how the base weight's axes read (static).
        dropout: the dropout rate on the adapter branch's input (static).

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> from jaxlora.variants import AdaLoraConfig
        >>> config = AdaLoraConfig(init_rank=4, target_rank=2, total_step=10, targets="w")
        >>> _, delta = jaxlora.split({"w": jnp.ones((8, 6))}, config, key=jax.random.key(0))
        >>> node = delta["w"]
        >>> node.p.shape, node.e.shape, node.q.shape, float(node.scale)
        ((8, 4), (4,), (4, 6), 2.0)

    References:
        Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
        Fine-Tuning", https://arxiv.org/abs/2303.10512.
    """

    axes: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "p": ("in", "rank"),
        "e": ("rank",),
        "q": ("rank", "out"),
    }
    output_factor: ClassVar[str] = "q"

    p: jax.Array
    e: jax.Array
    q: jax.Array
    scale: float = dataclasses.field(kw_only=True, metadata=dict(static=True))
    layout: Layout = dataclasses.field(kw_only=True, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, kw_only=True, metadata=dict(static=True))

    @property
    def rank(self) -> int:
        """The initial rank ``r`` (the number of triplets, pruned or not)."""
        return self.e.shape[-1]

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``(P · E, Q)``."""
        return self.p * self.e[..., None, :], self.q


@register_config("adalora")
@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoraConfig(TargetsConfig):
    """A frozen, validated description of an AdaLoRA adapter and its rank schedule.

    Pass it to :func:`jaxlora.split` for the nodes and to :func:`adalora` for
    the optimizer wrapper that allocates the ranks.

    Args:
        init_rank: triplets per weight at the start (PEFT's ``init_r``).
        target_rank: average triplets per weight at the end (PEFT's ``target_r``),
            at most ``init_rank``.
        tinit: steps of warmup at the full budget.
        tfinal: steps at the end with the final mask fixed.
        delta_t: steps between allocations while the budget shrinks (PEFT's ``deltaT``).
        beta1: EMA factor of the importance.
        beta2: EMA factor of its uncertainty.
        orth_reg_weight: the weight of :func:`orthogonality_loss` in the loss.
        total_step: the number of optimizer steps of the run; required.
        alpha: the scaling numerator; the scale is ``alpha / init_rank``. ``None``
            means ``2 · init_rank`` (scale 2, as ``LoraConfig``; PEFT's default
            ``lora_alpha=8`` is ``alpha=8``).
        targets: which parameters to adapt, as in :class:`jaxlora.LoraConfig`.
        exclude: paths to leave out, as in :class:`jaxlora.LoraConfig`.
        dropout: dropout rate on the adapter branch's input, in ``[0, 1)``.
        stacked_axes: stacked layer axes, as in :class:`jaxlora.LoraConfig`; every
            stacked layer is one matrix with its own triplets.
        input_axes: input axes, as in :class:`jaxlora.LoraConfig`.
        dtype: the dtype of ``P``, ``E`` and ``Q``.

    Raises:
        ValueError: for out-of-range values, a schedule without a budgeting phase
            (``tinit >= total_step - tfinal``) or invalid regexes.
        TypeError: for values of the wrong type.

    Example:
        >>> from jaxlora.variants import AdaLoraConfig
        >>> config = AdaLoraConfig(init_rank=12, target_rank=8, tinit=10, tfinal=20,
        ...                        delta_t=5, total_step=100)
        >>> [config.schedule(t, n_matrices=4) for t in (0, 10, 15, 50, 80, 81)]
        [(48, False), (48, False), (44, True), (33, True), (32, True), (32, True)]

    References:
        Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
        Fine-Tuning", https://arxiv.org/abs/2303.10512.
    """

    total_step: int
    init_rank: int = 12
    target_rank: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    alpha: float | None = None

    __hash__ = TargetsConfig.__hash__

    def __post_init__(self) -> None:
        check_int("init_rank", self.init_rank, minimum=1)
        check_int("target_rank", self.target_rank, minimum=1)
        if self.target_rank > self.init_rank:
            raise ValueError(
                f"target_rank ({self.target_rank}) must be <= init_rank ({self.init_rank}): "
                "AdaLoRA only prunes. Raise init_rank or lower target_rank."
            )
        check_int("total_step", self.total_step, minimum=1)
        check_int("tinit", self.tinit, minimum=0)
        check_int("tfinal", self.tfinal, minimum=0)
        check_int("delta_t", self.delta_t, minimum=1)
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"tinit={self.tinit} >= total_step - tfinal = {self.total_step - self.tfinal}: "
                "the schedule leaves no steps to prune in. Lower tinit or tfinal, or raise "
                "total_step."
            )
        check_unit_interval("beta1", self.beta1)
        check_unit_interval("beta2", self.beta2)
        if not isinstance(self.orth_reg_weight, numbers.Real) or isinstance(
            self.orth_reg_weight, bool
        ):
            raise TypeError(f"orth_reg_weight must be a number; got {self.orth_reg_weight!r}")
        if not (math.isfinite(self.orth_reg_weight) and self.orth_reg_weight >= 0):
            raise ValueError(
                f"orth_reg_weight must be a finite number >= 0; got {self.orth_reg_weight}"
            )
        if self.alpha is not None:
            check_positive("alpha", self.alpha)
        super().__post_init__()

    @property
    def scale(self) -> float:
        """``alpha / init_rank``."""
        alpha = 2.0 * self.init_rank if self.alpha is None else float(self.alpha)
        return alpha / self.init_rank

    def check_node(self, path: str, node: Any) -> None:
        """Raises unless ``node`` is the AdaLoRA adapter this config makes at ``path``."""
        check_node_matches(
            path,
            node,
            kind="adalora",
            rank=self.init_rank,
            scale=self.scale,
            dtype=self.dtype,
            arrays=("p", "e", "q"),
        )

    def schedule(self, step: int, *, n_matrices: int) -> tuple[int, bool]:
        """``(budget, allocate)`` at optimizer step ``step`` (PEFT's ``budget_schedule``).

        Args:
            step: the step, from 0.
            n_matrices: the number of adapted matrices (stacked layers count one each).

        Returns:
            The total number of triplets to keep, and whether step ``step`` allocates.
        """
        init, target = self.init_rank * n_matrices, self.target_rank * n_matrices
        if step <= self.tinit:
            return init, False
        if step > self.total_step - self.tfinal:
            return target, True
        mul = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        return int((init - target) * (mul**3) + target), step % self.delta_t == 0

    def node_builder(
        self, targets: Sequence[tuple[str, Any]]
    ) -> Callable[[jax.Array, str, Any], tuple[AdaLoraNode, None]]:
        """What :func:`jaxlora.split` calls: ``make(key, path, weight) -> (node, None)``.

        Args:
            targets: ``(path, weight)`` of every weight to adapt.

        Returns:
            The node maker.

        Raises:
            ValueError: if ``init_rank`` exceeds ``min(in, out)`` of a weight.
        """
        del targets

        def make(key: jax.Array, path: str, weight: Any) -> tuple[AdaLoraNode, None]:
            layout = self.layout_for(path, tuple(weight.shape))
            r = self.init_rank
            if r > min(layout.n_in, layout.n_out):
                raise ValueError(
                    f"init_rank {r} is too large for {path!r}: its weight {tuple(weight.shape)} "
                    f"reads as (in={layout.n_in}, out={layout.n_out}) and a rank must be <= "
                    f"{min(layout.n_in, layout.n_out)}. Lower init_rank or exclude this path."
                    + _paths.layout_hint(path, layout)
                )
            key_p, key_q = jax.random.split(key)
            p = _INIT_STD * jax.random.normal(key_p, (*layout.stacked, layout.n_in, r))
            q = _INIT_STD * jax.random.normal(key_q, (*layout.stacked, r, layout.n_out))
            p, q = p.astype(self.dtype), q.astype(self.dtype)
            e = jnp.zeros((*layout.stacked, r), self.dtype)
            node = AdaLoraNode(
                p, e, q, scale=float(self.scale), layout=layout, dropout=float(self.dropout)
            )
            return node, None

        return make


def orthogonality_loss(delta: Any) -> jax.Array:
    """AdaLoRA's regularizer: the mean of ``‖PᵀP - I‖_F`` and ``‖QQᵀ - I‖_F`` over matrices.

    Every adapted matrix (each stacked layer counts once) contributes its ``P``
    and its ``Q`` term, as in PEFT. Add ``config.orth_reg_weight`` times it to
    the training loss.

    Args:
        delta: a delta holding :class:`AdaLoraNode` adapters.

    Returns:
        A float32 scalar; its gradient is finite even where a term is zero.

    Raises:
        ValueError: if ``delta`` holds no :class:`AdaLoraNode`.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> from jaxlora.variants import AdaLoraConfig, orthogonality_loss
        >>> config = AdaLoraConfig(init_rank=2, target_rank=1, total_step=5, targets="w")
        >>> _, delta = jaxlora.split({"w": jnp.ones((4, 4))}, config, key=jax.random.key(0))
        >>> float(orthogonality_loss(delta)) > 1.0  # small random P, Q: far from orthonormal
        True

    References:
        Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
        Fine-Tuning", https://arxiv.org/abs/2303.10512.
    """
    nodes = adalora_nodes(delta, "delta")
    total, count = jnp.zeros((), jnp.float32), 0
    for node in nodes:
        p, q = node.p.astype(jnp.float32), node.q.astype(jnp.float32)
        eye = jnp.eye(node.rank, dtype=jnp.float32)
        ptp = jnp.einsum("...ir,...is->...rs", p, p) - eye
        qqt = jnp.einsum("...ro,...so->...rs", q, q) - eye
        total = total + jnp.sum(_frobenius(ptp)) + jnp.sum(_frobenius(qqt))
        count += 2 * math.prod(node.layout.stacked)
    return total / count


def to_lora(delta: Any) -> Any:
    """A plain LoRA delta of an AdaLoRA delta's surviving triplets.

    Each :class:`AdaLoraNode` becomes a :class:`jaxlora.LoraNode` with
    ``a = (P · E)[:, kept]``, ``b = Q[kept]`` and the same scale, where ``kept``
    are the triplets with ``E != 0``; the weight's delta is unchanged. Stacked
    layers may keep different numbers of triplets: the node takes the largest
    and pads the others with pruned (zero) triplets. A node with no surviving
    triplet becomes ``None``. Other nodes are kept as they are. Call it outside
    ``jit``: the ranks depend on the values.

    Args:
        delta: a trained AdaLoRA delta.

    Returns:
        A delta of ``LoraNode`` adapters for ``merge``, ``lora_apply`` and PEFT export.

    Example:
        >>> import dataclasses, jax, jax.numpy as jnp, jaxlora
        >>> from jaxlora.variants import AdaLoraConfig, to_lora
        >>> config = AdaLoraConfig(init_rank=3, target_rank=1, total_step=5, targets="w")
        >>> base, delta = jaxlora.split({"w": jnp.ones((4, 5))}, config, key=jax.random.key(0))
        >>> delta = {"w": dataclasses.replace(delta["w"], e=jnp.array([0.5, 0.0, 2.0]))}
        >>> lora = to_lora(delta)  # the middle triplet was pruned
        >>> lora["w"].rank
        2
        >>> bool(jnp.allclose(jaxlora.merge(base, lora)["w"], jaxlora.merge(base, delta)["w"]))
        True

    References:
        Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
        Fine-Tuning", https://arxiv.org/abs/2303.10512.
    """

    def one(node: Any) -> Any:
        if not isinstance(node, AdaLoraNode):
            return node
        kept = np.asarray(node.e) != 0
        k = int(kept.sum(axis=-1).max()) if kept.size else 0
        if k == 0:
            return None
        order = jnp.asarray(np.argsort(~kept, axis=-1, kind="stable")[..., :k])
        a = jnp.take_along_axis(node.p * node.e[..., None, :], order[..., None, :], axis=-1)
        b = jnp.take_along_axis(node.q, order[..., :, None], axis=-2)
        return LoraNode(a, b, scale=node.scale, layout=node.layout, dropout=node.dropout)

    return jax.tree.map(one, delta, is_leaf=is_node)


# ------------------------------------------------------------------ helpers


def flatten_nodes(tree: Any) -> tuple[list, Any]:
    """``tree``'s leaves and structure, AdaLoRA nodes counting as leaves."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: isinstance(x, AdaLoraNode))
    return leaves, treedef


def adalora_nodes(tree: Any, what: str) -> list[AdaLoraNode]:
    """The AdaLoRA nodes of ``tree``, in order; a ``ValueError`` naming ``what`` if none."""
    nodes = [x for x in flatten_nodes(tree)[0] if isinstance(x, AdaLoraNode)]
    if not nodes:
        raise ValueError(
            f"{what} holds no AdaLoraNode: AdaLoRA works on the delta that "
            "jaxlora.split(params, AdaLoraConfig(...), key=key) returns."
        )
    return nodes


def _frobenius(x: jax.Array) -> jax.Array:
    """``‖x‖_F`` over the last two axes, with a zero (not NaN) gradient at zero."""
    sq = jnp.sum(x * x, axis=(-2, -1))
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


register_codec("adalora", AdaLoraCodec())  # PEFT's AdaLoRA files
