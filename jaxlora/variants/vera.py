"""VeRA: vector-based random matrix adaptation.

One pair of frozen random matrices ``A: (max_in, r)`` and ``B: (r, max_out)`` is
shared by every adapted weight (sized to the largest input and output over
the targets, sliced per weight); each weight trains only two vectors,
``d: (r,)`` and ``b: (n_out,)``:

    W' = W + (A[:n_in] · diag(d)) @ (B[:, :n_out] · diag(b))

so an adapter costs ``n_out + r`` numbers per weight instead of LoRA's
``r·(n_in + n_out)``.

**Where the shared matrices live.** They are regenerated from
``VeraConfig.projection_key`` (a static field of every node, with the shared
shape) whenever a node's factors are needed, and stored nowhere. (Matrices
read from a PEFT file, which PEFT drew with PyTorch's generator, are held as
frozen :class:`jaxlora._node.Constant` s in the same static field instead;
checkpoints store them once.) A delta
mirrors the parameter tree, so it has no slot for one array shared by all
layers; the alternative, every node referencing one buffer, silently becomes
a copy per layer after the first ``jax.tree.map`` (an optimizer update, a
checkpoint restore, a ``device_put``), and would be saved once per layer. The
price of regenerating is compute: one ``threefry`` pass over
``r·(max_in + max_out)`` numbers per call; within one ``jit`` program XLA
computes it once for all layers (identical, side-effect-free ops are
deduplicated), and nothing extra is held for the backward pass. Checkpoints
hold only ``d`` and ``b``; the seed and shapes are part of the tree's static
structure. PEFT's ``save_projection=False`` is the same trade.

References:
    Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation",
    https://arxiv.org/abs/2310.11454.
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

from jaxlora._config import check_node_matches, register_config
from jaxlora._node import AdapterNode, Constant
from jaxlora._paths import Layout
from jaxlora.io.peft._format import register_codec
from jaxlora.io.peft._vera import VeraCodec
from jaxlora.variants._common import TargetsConfig, check_int

__all__ = ["VeraConfig", "VeraNode", "VeraProjection"]


@dataclasses.dataclass(frozen=True)
class VeraProjection:
    """The shared frozen matrices of a VeRA adapter, as a seed and shapes (hashable, static).

    Attributes:
        seed: the ``projection_key`` they are drawn from.
        rank: ``r``.
        max_in: rows of ``A`` (the largest ``n_in`` over the targets).
        max_out: columns of ``B`` (the largest ``n_out`` over the targets).
        given: ``None`` (the matrices are drawn from ``seed``), or the matrices
            ``(A, B)`` themselves as constants (read from a PEFT file, where PEFT
            drew them with PyTorch's generator).

    Example:
        >>> from jaxlora.variants import VeraProjection
        >>> a, b = VeraProjection(seed=0, rank=4, max_in=8, max_out=6).matrices()
        >>> a.shape, b.shape
        ((8, 4), (4, 6))

    References:
        Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation",
        https://arxiv.org/abs/2310.11454.
    """

    seed: int
    rank: int
    max_in: int
    max_out: int
    given: tuple[Constant, Constant] | None = None

    def matrices(self, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
        """``(A: (max_in, r), B: (r, max_out))``, kaiming-uniform as in the paper.

        PyTorch's ``kaiming_uniform_`` with gain ``sqrt(2)`` (as PEFT): ``A`` is
        ``U(±sqrt(6 / max_in))`` and ``B`` is ``U(±sqrt(6 / r))``, each bound from
        the fan-in of the map it applies. Given matrices are returned as they are.
        """
        if self.given is not None:
            a, b = (jnp.asarray(c.value) for c in self.given)
            return a.astype(dtype), b.astype(dtype)
        key_a, key_b = jax.random.split(jax.random.key(self.seed))
        bound_a = math.sqrt(6.0 / self.max_in)
        bound_b = math.sqrt(6.0 / self.rank)
        a = jax.random.uniform(key_a, (self.max_in, self.rank), jnp.float32, -bound_a, bound_a)
        b = jax.random.uniform(key_b, (self.rank, self.max_out), jnp.float32, -bound_b, bound_b)
        return a.astype(dtype), b.astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VeraNode(AdapterNode, kind="vera"):
    """The VeRA adapter of one weight: ``W' = W + (A_shared·diag(d)) @ (B_shared·diag(b))``.

    Attributes:
        d: ``(*stacked, rank)``, trainable; starts at ``VeraConfig.d_initial``.
        b: ``(*stacked, n_out)``, trainable; starts at zero.
        layout: how the base weight's axes read (static).
        projection: the shared matrices' seed and shapes (static).
        dropout: the dropout rate on the low-rank branch's input (static).

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> from jaxlora.variants import VeraConfig
        >>> params = {"q": {"kernel": jnp.ones((8, 4))}, "v": {"kernel": jnp.ones((6, 8))}}
        >>> _, delta = jaxlora.split(params, VeraConfig(rank=16, targets="kernel"),
        ...                          key=jax.random.key(0))
        >>> node = delta["q"]["kernel"]
        >>> node.d.shape, node.b.shape, node.projection.max_in, node.projection.max_out
        ((16,), (4,), 8, 8)
        >>> [x.shape for x in node.factors()[:2]]
        [(8, 16), (16, 4)]

    References:
        Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation",
        https://arxiv.org/abs/2310.11454.
    """

    axes: ClassVar[Mapping[str, tuple[str, ...]]] = {"d": ("rank",), "b": ("out",)}

    d: jax.Array
    b: jax.Array
    layout: Layout = dataclasses.field(kw_only=True, metadata=dict(static=True))
    projection: VeraProjection = dataclasses.field(kw_only=True, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, kw_only=True, metadata=dict(static=True))

    def stack_hint(self, field: str) -> str:
        """VeRA adapters share their frozen projections: they stack from one projection_key."""
        if field == "projection":
            return (
                "VeRA adapters stack only when they were made with the same projection_key "
                "(they share the frozen projections)"
            )
        return super().stack_hint(field)

    @property
    def rank(self) -> int:
        """The shared rank ``r``."""
        return self.d.shape[-1]

    @property
    def scale(self) -> float:
        """VeRA has no scale: 1.0 (``d`` and ``b`` carry it)."""
        return 1.0

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``(A[:n_in] · d, B[:, :n_out] · b)``, shaped like LoRA's ``(a, b)``."""
        a, b = self.projection.matrices(self.d.dtype)
        a = a[: self.layout.n_in] * self.d[..., None, :]
        b = b[:, : self.layout.n_out] * self.b[..., None, :]
        return a, b

    def with_scale(self, scale: float) -> VeraNode:
        if float(scale) != 1.0:
            raise TypeError("VeRA has no scale (its vectors d and b carry it)")
        return self

    def fold_scale(self) -> VeraNode:
        return self

    def pad_rank(self, rank: int) -> VeraNode:
        raise TypeError(
            "a VeRA adapter's rank is that of its shared random projections and cannot be "
            "padded; stack VeRA adapters of one VeraConfig (same rank and projection_key)"
        )

    def _encode_static(self, name: str, value: Any) -> Any:
        if name == "projection":
            fields = {k: getattr(value, k) for k in ("seed", "rank", "max_in", "max_out")}
            # constants stay objects here: a checkpoint stores each once and refers to it
            given = None if value.given is None else list(value.given)
            return {**fields, "given": given}
        return super()._encode_static(name, value)

    @classmethod
    def _decode_static(cls, name: str, value: Any) -> Any:
        if name == "projection":
            given = value.get("given")
            if given is not None:
                given = tuple(
                    c if isinstance(c, Constant) else Constant(np.asarray(c)) for c in given
                )
            fields = {k: int(value[k]) for k in ("seed", "rank", "max_in", "max_out")}
            return VeraProjection(**fields, given=given)
        return super()._decode_static(name, value)


@register_config("vera")
@dataclasses.dataclass(frozen=True, kw_only=True)
class VeraConfig(TargetsConfig):
    """A frozen, validated description of a VeRA adapter; pass it to :func:`jaxlora.split`.

    Everything else (``lora_apply``, ``merge``, ``unmerge``, ``trainable_mask``)
    works as for LoRA. An adapted weight trains ``n_out + rank`` numbers.

    Args:
        rank: the shared projections' rank ``r`` (PEFT's ``r``); unlike LoRA's it may
            exceed a weight's dimensions, and the paper uses 256 or more.
        d_initial: the initial value of every ``d`` (PEFT's ``d_initial``); ``b``
            starts at zero, so the model starts unchanged.
        targets: which parameters to adapt, as in :class:`jaxlora.LoraConfig`.
        exclude: paths to leave out, as in :class:`jaxlora.LoraConfig`.
        dropout: dropout rate on the adapter branch's input, in ``[0, 1)``.
        projection_key: the int seed of the shared matrices (PEFT's
            ``projection_prng_key``); adapters trained with one seed only work
            with that seed.
        stacked_axes: stacked layer axes, as in :class:`jaxlora.LoraConfig`.
        input_axes: input axes, as in :class:`jaxlora.LoraConfig`.
        dtype: the dtype of ``d``, ``b`` and the shared matrices.

    Raises:
        ValueError: for out-of-range values or invalid regexes.
        TypeError: for values of the wrong type.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> from jaxlora.variants import VeraConfig
        >>> params = {"query": {"kernel": jnp.ones((32, 16))}}
        >>> base, delta = jaxlora.split(params, VeraConfig(rank=64), key=jax.random.key(0))
        >>> jaxlora.count_parameters(base, delta).trainable  # n_out + r
        80

    References:
        Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation",
        https://arxiv.org/abs/2310.11454.
    """

    rank: int = 256
    d_initial: float = 0.1
    projection_key: int = 0

    __hash__ = TargetsConfig.__hash__

    def __post_init__(self) -> None:
        check_int("rank", self.rank, minimum=1)
        if (
            not isinstance(self.d_initial, numbers.Real)
            or isinstance(self.d_initial, bool)
            or not math.isfinite(self.d_initial)
            or self.d_initial == 0
        ):
            raise ValueError(
                f"d_initial must be a finite nonzero float (the paper uses 0.1); got "
                f"{self.d_initial!r}. With d = 0 the gradient of b is zero and nothing trains."
            )
        if not isinstance(self.projection_key, numbers.Integral) or isinstance(
            self.projection_key, bool
        ):
            raise TypeError(
                f"projection_key must be an int seed, e.g. projection_key=0; got "
                f"{self.projection_key!r} ({type(self.projection_key).__name__}). It is "
                "stored in the delta's static structure, where a jax.random.key cannot go."
            )
        super().__post_init__()

    def check_node(self, path: str, node: Any) -> None:
        """Raises unless ``node`` is the VeRA adapter this config makes at ``path``."""
        check_node_matches(
            path, node, kind="vera", rank=self.rank, scale=1.0, dtype=self.dtype, arrays=("d", "b")
        )
        seed = node.projection.seed
        if node.projection.given is None and seed != self.projection_key:
            raise ValueError(
                f"the adapter at {path!r} uses the projections of seed {seed}, but config has "
                f"projection_key={self.projection_key}. Pass the config the delta was made with."
            )

    def node_builder(
        self, targets: Sequence[tuple[str, Any]]
    ) -> Callable[[jax.Array, str, Any], tuple[VeraNode, None]]:
        """What :func:`jaxlora.split` calls: sizes the shared matrices to ``targets``.

        Args:
            targets: ``(path, weight)`` of every weight to adapt.

        Returns:
            ``make(key, path, weight) -> (node, None)``; VeRA's init is deterministic,
            so ``key`` is unused.
        """
        layouts = {path: self.layout_for(path, tuple(w.shape)) for path, w in targets}
        projection = VeraProjection(
            seed=int(self.projection_key),
            rank=self.rank,
            max_in=max(lay.n_in for lay in layouts.values()),
            max_out=max(lay.n_out for lay in layouts.values()),
        )

        def make(key: jax.Array, path: str, weight: Any) -> tuple[VeraNode, None]:
            del key
            layout = layouts[path]
            d = jnp.full((*layout.stacked, self.rank), self.d_initial, self.dtype)
            b = jnp.zeros((*layout.stacked, layout.n_out), self.dtype)
            node = VeraNode(d, b, layout=layout, projection=projection, dropout=float(self.dropout))
            return node, None

        return make


register_codec("vera", VeraCodec())  # PEFT's VeRA files
