"""Routing: each example of a batch computed with its own adapter of a stacked delta.

A routed ``Adapted`` weight keeps every adapter's factors along a leading
pool axis (``n`` adapters) and carries a :class:`Route`: the adapter id of
each example (axis 0 of the activations) and each adapter's scale. Where the
weight meets a matmul, the low-rank term is computed one of two ways:

* **gather**: each example's factors are gathered (``a[ids]``, a copy of
  ``batch × (n_in + n_out) × r`` values per weight) and contracted example by
  example. Its cost does not depend on how many distinct adapters the batch uses.
* **grouped**: the batch's distinct adapters are compacted into ``k`` slots;
  every token meets all ``k`` slots' factors in two dense matmuls and keeps its
  own slot's result (a one-hot mask). No per-example copies: each adapter is
  read once, at ``k`` times the low-rank cost of a single adapter. This is the
  masked form of a grouped matmul (``jax.lax.ragged_dot`` over the batch's
  adapters), which on CPU lowers to the same dense loop over every group.

``routing="auto"`` counts the batch's distinct adapters at run time and picks
the smallest slot bucket (1, 4 or 16) that holds them, or the gather beyond a
crossover measured on CPU (``python -m benchmarks.multi``): grouping wins up
to about 16 distinct adapters when each example has one token (decoding) and
up to about 4 with many tokens per example (prefill, training).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["ROUTINGS", "Route", "buckets", "compact", "distinct", "example_scales", "safe_ids"]

ROUTINGS = ("auto", "gather", "grouped")
# The largest slot bucket "auto" uses, by tokens per example (measured on CPU, see above).
_DECODE_SLOTS, _PREFILL_SLOTS = 16, 4
_BUCKETS = (1, 4, 16)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Route:
    """Which adapter each example uses, and how the routed term is computed.

    Attributes:
        ids: ``(batch,)`` int32: example ``i`` uses adapter ``ids[i]``; ``-1`` none.
        scales: ``(n,)`` float32: each adapter's scale.
        method: ``"auto"``, ``"gather"`` or ``"grouped"`` (static).
    """

    ids: jax.Array
    scales: jax.Array
    method: str = dataclasses.field(default="auto", metadata=dict(static=True))
    # inside a scan over stacked layers: the layer still to be picked from the factors' axis
    # layer_axis, at the use (picking it first would copy the whole pool's layer)
    layer: jax.Array | None = None
    layer_axis: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def n_adapters(self) -> int:
        return int(self.scales.shape[0])

    def rows(self, x: jax.Array | None, rows: jax.Array) -> jax.Array | None:
        """``x[rows]`` of a pool-axis-first factor, in the pending layer (one gather)."""
        if x is None:
            return None
        if self.layer is None:
            return x[rows]
        return x[(rows, *[slice(None)] * (self.layer_axis - 1), self.layer)]

    def picked(self, x: jax.Array | None) -> jax.Array | None:
        """``x`` in the pending layer (all adapters)."""
        if x is None or self.layer is None:
            return x
        return jax.lax.dynamic_index_in_dim(x, self.layer, self.layer_axis, keepdims=False)


def safe_ids(route: Route) -> jax.Array:
    """The ids clipped into ``[0, n)`` (``-1`` and bad ids read adapter 0, then get scale 0/NaN)."""
    return jnp.clip(route.ids, 0, route.n_adapters - 1)


def example_scales(route: Route) -> jax.Array:
    """``(batch,)``: each example's adapter scale; 0 for id ``-1``, NaN for an id out of range.

    An id out of ``[-1, n)`` can only arrive traced (``lora_apply`` checks
    concrete ids); its example becomes NaN rather than silently another
    adapter's.
    """
    ids, n = route.ids, route.n_adapters
    scale = jnp.where(ids >= 0, route.scales[safe_ids(route)], 0.0)
    return jnp.where((ids < -1) | (ids >= n), jnp.nan, scale)


def distinct(ids: jax.Array) -> jax.Array:
    """The number of distinct values in a 1-D int array (a traced int32 scalar)."""
    s = jnp.sort(ids)
    return 1 + jnp.sum(s[1:] != s[:-1]).astype(jnp.int32)


def compact(ids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(slots, one_hot)``: the distinct ids in ``k`` slots and each example's slot.

    ``slots: (k,)`` holds the distinct values of ``ids`` (padded with repeats of
    the first); ``one_hot: (batch, k)`` float32 marks each example's slot. Only
    exact when ``ids`` has at most ``k`` distinct values.
    """
    slots, inverse = jnp.unique(ids, size=k, fill_value=ids[0], return_inverse=True)
    return slots, jax.nn.one_hot(inverse.reshape(-1), k, dtype=jnp.float32)


def buckets(route: Route, n_examples: int, tokens_per_example: int) -> tuple[tuple[int, ...], bool]:
    """``(slot buckets, gather too)``: the grouped sizes to compile, and whether to add a gather.

    ``"grouped"`` compiles one bucket that holds every possible batch; ``"gather"``
    none; ``"auto"`` the buckets up to the measured crossover and a gather for
    batches with more distinct adapters.
    """
    cap = min(route.n_adapters, n_examples)
    if route.method == "gather":
        return (), True
    if route.method == "grouped":
        return (cap,), False
    largest = _DECODE_SLOTS if tokens_per_example == 1 else _PREFILL_SLOTS
    sizes = tuple(sorted({min(k, cap) for k in _BUCKETS if k <= largest}))
    return sizes, cap > sizes[-1]
