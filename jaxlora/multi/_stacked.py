"""``StackedNode``: several adapters of one weight along a leading adapter axis."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxlora import _paths
from jaxlora._node import AdapterNode, node_type

__all__ = ["StackedNode"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedNode(AdapterNode, kind="stacked"):
    """``n`` adapters of one weight, stacked along a leading adapter axis.

    Attributes:
        inner: one node of the adapters' type whose every array has a leading
            axis of size ``n`` (its static fields are the adapters' common ones).
        scales: the adapters' scales, one per adapter, when they differ; ``None``
            when every adapter uses ``inner.scale`` (static).
        ranks: each adapter's own rank before :func:`jaxlora.stack` padded them to
            the largest (static; ``None``: all of ``inner.rank``). Padded rank
            components are zero and, trained with :func:`jaxlora.multi.per_adapter`,
            stay zero; :func:`jaxlora.multi.unstack` cuts them off.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> params = {"w": jnp.ones((4, 3))}
        >>> deltas = [jaxlora.split(params, jaxlora.LoraConfig(rank=r, targets="w"),
        ...                         key=jax.random.key(r))[1] for r in (1, 2)]
        >>> node = jaxlora.stack(deltas)["w"]
        >>> node.n_adapters, node.inner.a.shape
        (2, (2, 4, 2))
    """

    axes: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    inner: AdapterNode
    scales: tuple[float, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
    ranks: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def layout(self) -> _paths.Layout:  # type: ignore[override]
        return self.inner.layout

    @property
    def dropout(self) -> float:  # type: ignore[override]
        return self.inner.dropout

    @property
    def scale(self) -> float:  # type: ignore[override]
        if self.scales is not None:
            raise ValueError("the stacked adapters have different scales; see .scales")
        return self.inner.scale

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def n_adapters(self) -> int:
        """How many adapters are stacked."""
        return int(jax.tree.leaves(self.inner)[0].shape[0])

    def select(self, index: int) -> AdapterNode:
        """The ``index``-th adapter, as a node of the stacked type (at the stack's rank)."""
        node = jax.tree.map(lambda x: x[index], self.inner)
        return node if self.scales is None else node.with_scale(self.scales[index])

    def own_ranks(self) -> tuple[int, ...]:
        """Each adapter's rank before stacking."""
        return self.ranks if self.ranks is not None else (self.inner.rank,) * self.n_adapters

    def masks(self) -> StackedNode:
        """This node's shape in 0/1 masks: 1 on each adapter's own rank components."""
        rows = [
            jax.tree.map(lambda x, i=i: x[i], self.inner).rank_mask(r)
            for i, r in enumerate(self.own_ranks())
        ]
        return dataclasses.replace(self, inner=jax.tree.map(lambda *xs: jnp.stack(xs), *rows))

    def pooled(self, weight: Any) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
        """Every adapter's factors, scale and output multiplier, for routing a batch.

        Returns ``(a, b, scales, output_scale)``: ``a: (n, *stacked, n_in, r)``,
        ``b: (n, *stacked, r, n_out)``, ``scales: (n,)`` float32, and ``None``
        or, when ``weight`` is given (DoRA), ``(n, *stacked, n_out)``.
        """
        n = self.n_adapters
        a, b = jax.vmap(lambda node: node.factors())(self.inner)
        scales = jnp.asarray(self.scales if self.scales else (self.inner.scale,) * n, jnp.float32)
        out_scale = None
        if weight is not None:
            if self.scales is None:
                out_scale = jax.vmap(lambda node: node.output_scale(weight))(self.inner)
            else:
                out_scale = jnp.stack([self.select(i).output_scale(weight) for i in range(n)])
        return a, b, scales, out_scale

    def factors(self) -> tuple[jax.Array, jax.Array]:
        raise ValueError(
            "a stacked delta holds several adapters: pass adapter_ids= to the function from "
            "jaxlora.lora_apply, or pick one with jaxlora.multi.select(stacked, i)"
        )

    def with_scale(self, scale: float) -> StackedNode:
        raise TypeError("a stacked node has one scale per adapter; stack adapters of that scale")

    def layer(self, index: tuple[int, ...]) -> StackedNode:
        inner = self.inner
        updates = {}
        for name in inner.axes:
            value = getattr(inner, name)
            if value is None:
                continue
            constant = name in inner.constant_fields()  # constants have no adapter axis
            updates[name] = value[tuple(index)] if constant else value[(slice(None), *index)]
        layout = _paths.Layout((), inner.layout.inputs, inner.layout.outputs)
        return dataclasses.replace(
            self,
            inner=dataclasses.replace(inner, layout=layout, **updates),  # type: ignore[call-arg]
        )

    def shardings(self, spec_for: Callable[[tuple[str, ...]], Any]) -> StackedNode:
        return dataclasses.replace(
            self, inner=self.inner.shardings(lambda roles: spec_for(("adapter", *roles)))
        )

    def arrays(self) -> dict[str, Any]:
        return self.inner.arrays()

    def static_metadata(self) -> dict[str, Any]:
        return {
            "inner_kind": self.inner.kind,
            "inner": self.inner.static_metadata(),
            "scales": None if self.scales is None else list(self.scales),
            "ranks": None if self.ranks is None else list(self.ranks),
        }

    @classmethod
    def from_saved(cls, arrays: Mapping[str, Any], metadata: Mapping[str, Any]) -> StackedNode:
        inner = node_type(metadata["inner_kind"]).from_saved(arrays, metadata["inner"])
        scales, ranks = metadata["scales"], metadata.get("ranks")
        return cls(
            inner,
            None if scales is None else tuple(float(s) for s in scales),
            None if ranks is None else tuple(int(r) for r in ranks),
        )
