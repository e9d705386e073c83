"""The adapter-node protocol: what every node type of a delta declares.

A delta mirrors the parameter tree with an *adapter node* at each adapted
leaf and ``None`` elsewhere. Every node type (:class:`jaxlora.LoraNode`, the
variants in :mod:`jaxlora.variants`, the stacked nodes of
:mod:`jaxlora.multi`) is a frozen dataclass registered as a pytree, and:

* **its array children are exactly what trains.** Fixed values (the scale
  ``alpha / r``, the layout, the dropout rate, VeRA's seed) are static
  fields, so they are part of the tree's structure: ``jax.tree.map``, any
  optax optimizer (weight decay included), casts and checkpoints never touch
  them, and ``jax.tree.leaves(delta)`` lists what PEFT calls the trainable
  parameters. Frozen *arrays* a variant needs (DoRA's base column norms,
  imported VeRA projections) are static too, held as :class:`Constant`.
* **it declares the axes of every array** in :attr:`AdapterNode.axes`
  (``"in"``, ``"out"``, ``"rank"``, after the weight's stacked axes), from
  which sharding, per-layer slicing and stacking are derived generically;
* **it contributes at a use site** through :meth:`AdapterNode.factors`
  (``a: (*stacked, n_in, r)``, ``b: (*stacked, r, n_out)``, times the static
  :attr:`AdapterNode.scale`) and, optionally, a per-output multiplier
  (:meth:`AdapterNode.output_scale`);
* **it merges and unmerges** (:meth:`AdapterNode.merge_into`,
  :meth:`AdapterNode.unmerge_from`), and recomputes the frozen values it
  derives from its base weight (:meth:`AdapterNode.with_base`);
* **it serializes** through :meth:`AdapterNode.arrays` and
  :meth:`AdapterNode.static_metadata` (Orbax checkpoints, JSON) and back
  through :meth:`AdapterNode.from_saved`, and it registers a ``kind`` name
  under which checkpoints find its type again (``class DoraNode(AdapterNode,
  kind="dora")``); the module that defines a node type registers its PEFT
  format too (:func:`jaxlora.io.peft._format.register_codec`);
* **it stacks** (:meth:`AdapterNode.with_scale`, :meth:`AdapterNode.fold_scale`,
  :meth:`AdapterNode.pad_rank`; :mod:`jaxlora.multi` does the rest).

The library's functions (``merge``, ``lora_apply``, ``trainable_mask``,
``count_parameters``, ``summary``, ``save_adapter``/``load_adapter``,
``jaxlora.io.peft``, ``adapter_shardings``, ``stack``/``pad_rank``/
``combine_adapters``, the planner) speak to nodes only through this protocol:
none of them tests for a variant's type, and none imports a variant.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._constant import Constant
from jaxlora._paths import Layout

__all__ = [
    "AdapterNode",
    "Constant",
    "is_delta_leaf",
    "is_node",
    "node_type",
    "node_types",
]

_KINDS: dict[str, type[AdapterNode]] = {}
_HIGHEST = jax.lax.Precision.HIGHEST


class AdapterNode:
    """The base of every adapter node type; see the module docstring for the protocol.

    Subclasses are frozen dataclasses registered with
    ``jax.tree_util.register_dataclass`` whose data fields are the trainable
    arrays and whose other fields are static. They set:

    * ``kind``: the registry name, given as a class keyword
      (``class MyNode(AdapterNode, kind="mine")``); checkpoints store it;
    * ``axes``: for every array field (trainable or :class:`Constant`), the roles
      of its axes after the weight's stacked axes: ``"in"`` (the flattened
      input axes), ``"out"`` (the flattened output axes) or ``"rank"``;
    * ``layout``, ``dropout`` and ``scale`` (a Python float; ``1.0`` where the
      variant has none).

    and implement :meth:`factors` and :attr:`rank`. Everything else has a
    default that follows from ``axes`` and the dataclass fields.
    """

    kind: ClassVar[str]
    axes: ClassVar[Mapping[str, tuple[str, ...]]]
    #: the output-side factor (``b`` of ``a @ b``), which LoRA+ trains faster
    output_factor: ClassVar[str] = "b"
    layout: Layout
    dropout: float
    scale: float

    def __init_subclass__(cls, *, kind: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if kind is None:
            return
        if kind in _KINDS and _KINDS[kind].__qualname__ != cls.__qualname__:
            raise ValueError(
                f"adapter node kind {kind!r} is taken by {_KINDS[kind].__module__}."
                f"{_KINDS[kind].__qualname__}; give {cls.__qualname__} another kind"
            )
        cls.kind = kind
        _KINDS[kind] = cls

    # -------------------------------------------------------------- use site

    @property
    def rank(self) -> int:
        """The adapter's rank ``r``."""
        raise NotImplementedError

    @property
    def n_adapters(self) -> int | None:
        """How many adapters a stacked node holds; ``None`` for a node of one adapter."""
        return None

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``(a, b)`` with the weight's delta ``scale · a @ b``.

        ``a: (*stacked, n_in, r)`` and ``b: (*stacked, r, n_out)``.
        """
        raise NotImplementedError

    def output_scale(self, weight: jax.Array) -> jax.Array | None:
        """``None``, or a multiplier ``(*stacked, n_out)`` of ``x @ (W + delta)``.

        DoRA's ``m / ||W + delta||`` is one.
        """
        return None

    def pooled(self, weight: Any) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
        """A stacked node's ``(a, b, scales, output_scale)``: every adapter's, for routing.

        Only stacked nodes (:attr:`n_adapters` not ``None``) implement it.
        """
        raise ValueError(
            "adapter_ids= needs a delta from jaxlora.stack([delta_1, ..., delta_n]); this "
            "delta holds one adapter per weight"
        )

    def check_shapes(self, path: str) -> None:
        """Raises a ``ValueError`` naming ``path`` if an array's shape does not fit the layout.

        Each array of :attr:`axes` must be ``(*stacked, *roles)`` with ``"in"`` the
        weight's ``n_in``, ``"out"`` its ``n_out`` and ``"rank"`` the node's rank.
        """
        layout = self.layout
        sizes = {"in": layout.n_in, "out": layout.n_out, "rank": self.rank}
        shapes = {}
        for name, roles in self.axes.items():
            value = getattr(self, name)
            if value is None:
                continue
            n_lead = sum(1 for r in roles if r == "adapter")
            want = tuple(sizes[r] for r in roles[n_lead:])
            found = tuple(value.shape)
            shapes[name] = found
            if found[n_lead:] != (*layout.stacked, *want):
                wanted = {
                    n: (*layout.stacked, *(sizes[r] for r in rs)) for n, rs in self.axes.items()
                }
                raise ValueError(
                    f"the {type(self).__name__} at {path!r} has {name} of shape {found}, but its "
                    f"layout (weight {layout.shape}, in={layout.n_in}, out={layout.n_out}) and "
                    f"rank {self.rank} need {wanted}. Keep the arrays in the shapes "
                    "jaxlora.split made (a and b of one rank)."
                )

    # -------------------------------------------------------------- merge

    def delta_weight(self, dtype: Any = jnp.float32) -> jax.Array:
        """``scale · a @ b`` in the base weight's shape, computed in float32."""
        a, b = self.factors()
        product = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=_HIGHEST)
        return (jnp.float32(self.scale) * product).reshape(self.layout.shape).astype(dtype)

    def merge_into(self, weight: jax.Array) -> jax.Array:
        """The adapted weight (float32 in, float32 out): ``W + scale · a @ b`` by default."""
        return weight + self.delta_weight(jnp.float32)

    def unmerge_from(self, merged: jax.Array) -> jax.Array:
        """The inverse of :meth:`merge_into`."""
        return merged - self.delta_weight(jnp.float32)

    def stack_hint(self, field: str) -> str:
        """How to make adapters whose static ``field`` differs stackable (for the error)."""
        del field
        return "make them with the same config"

    def with_base(self, weight: Any) -> AdapterNode:
        """This node with the frozen values it derives from its base ``weight`` filled in.

        A node made under tracing (``jax.jit`` of ``split``) cannot hold such
        values (DoRA's base column norms); ``load_adapter(..., base=...)``
        calls this with each concrete base weight. Plain LoRA derives nothing.
        """
        del weight
        return self

    # -------------------------------------------------------------- transforms

    def with_scale(self, scale: float) -> AdapterNode:
        """This node with another static scale (its arrays unchanged)."""
        return dataclasses.replace(self, scale=float(scale))  # type: ignore[call-arg]

    def fold_scale(self) -> AdapterNode:
        """An equivalent node of scale 1: the scale multiplied into :attr:`output_factor`.

        The product is rounded to that factor's dtype once (exact for a power of two).
        """
        if self.scale == 1.0:
            return self
        factor = getattr(self, self.output_factor)
        folded = (jnp.float32(self.scale) * factor.astype(jnp.float32)).astype(factor.dtype)
        return dataclasses.replace(self, **{self.output_factor: folded, "scale": 1.0})  # type: ignore[call-arg]

    def pad_rank(self, rank: int) -> AdapterNode:
        """An equivalent node of rank ``rank``: zeros along every ``"rank"`` axis of its arrays.

        Exact whenever a zero rank component contributes nothing, as for LoRA
        (new columns of ``a`` meet zero rows of ``b``), DoRA (the direction is
        unchanged, so are the norms) and AdaLoRA (``E = 0`` is a pruned triplet).
        """
        extra = rank - self.rank
        updates = {}
        for name in self.trainable_fields():
            value = getattr(self, name)
            n_stacked = value.ndim - len(self.axes[name])
            widths = [(0, 0)] * value.ndim
            for k, role in enumerate(self.axes[name]):
                if role == "rank":
                    widths[n_stacked + k] = (0, extra)
            updates[name] = jnp.pad(value, widths)
        return dataclasses.replace(self, **updates)  # type: ignore[call-arg]

    def truncate_rank(self, rank: int) -> AdapterNode:
        """This node's first ``rank`` rank components (the inverse of :meth:`pad_rank`)."""
        updates = {}
        for name in self.trainable_fields():
            value = getattr(self, name)
            n_stacked = value.ndim - len(self.axes[name])
            index = [slice(None)] * value.ndim
            for k, role in enumerate(self.axes[name]):
                if role == "rank":
                    index[n_stacked + k] = slice(0, rank)
            updates[name] = value[tuple(index)]
        return dataclasses.replace(self, **updates)  # type: ignore[call-arg]

    def rank_mask(self, rank: int) -> AdapterNode:
        """A node of masks: 1 on the first ``rank`` rank components of each array, 0 after.

        Multiplying updates by it keeps the components :meth:`pad_rank` added at zero.
        """
        updates = {}
        for name in self.trainable_fields():
            value = getattr(self, name)
            n_stacked = value.ndim - len(self.axes[name])
            mask = jnp.ones(value.shape, value.dtype)
            for k, role in enumerate(self.axes[name]):
                if role == "rank":
                    axis = n_stacked + k
                    keep = jnp.arange(value.shape[axis]) < rank
                    mask = mask * keep.reshape([-1 if d == axis else 1 for d in range(value.ndim)])
            updates[name] = mask
        return dataclasses.replace(self, **updates)  # type: ignore[call-arg]

    def layer(self, index: tuple[int, ...]) -> AdapterNode:
        """The adapter of one stacked layer (``index`` into the leading stacked axes)."""
        index = tuple(index)
        updates: dict[str, Any] = {}
        for name in self.axes:
            value = getattr(self, name)
            if value is not None:
                updates[name] = value[index]
        layout = Layout((), self.layout.inputs, self.layout.outputs)
        return dataclasses.replace(self, layout=layout, **updates)  # type: ignore[call-arg]

    # -------------------------------------------------------------- sharding

    def shardings(self, spec_for: Callable[[tuple[str, ...]], Any]) -> AdapterNode:
        """This node with ``spec_for(roles)`` in place of each trainable array.

        ``roles`` are the array's :attr:`axes`; ``spec_for`` adds the stacked axes
        (:func:`jaxlora.sharding.adapter_shardings` passes one).
        """
        return dataclasses.replace(  # type: ignore[call-arg]
            self, **{name: spec_for(self.axes[name]) for name in self.trainable_fields()}
        )

    # -------------------------------------------------------------- serialization

    @classmethod
    def trainable_fields(cls) -> tuple[str, ...]:
        """The names of the array children: exactly the trainable fields."""
        return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("static"))  # type: ignore[arg-type]

    @classmethod
    def constant_fields(cls) -> tuple[str, ...]:
        """The names of the static :class:`Constant` fields (frozen arrays)."""
        return tuple(name for name in cls.axes if name not in cls.trainable_fields())

    def arrays(self) -> dict[str, Any]:
        """Every array a checkpoint stores: trainable arrays, and constants (as ``Constant``)."""
        return {name: getattr(self, name) for name in self.axes if getattr(self, name) is not None}

    def static_metadata(self) -> dict[str, Any]:
        """The static fields other than constants as JSON values, for :meth:`from_saved`."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            if not field.metadata.get("static") or field.name in self.axes:
                continue
            out[field.name] = self._encode_static(field.name, getattr(self, field.name))
        return out

    @classmethod
    def from_saved(cls, arrays: Mapping[str, Any], metadata: Mapping[str, Any]) -> AdapterNode:
        """The node of :meth:`arrays` and :meth:`static_metadata` (missing constants: ``None``)."""
        kwargs: dict[str, Any] = {
            name: cls._decode_static(name, value) for name, value in metadata.items()
        }
        constants = cls.constant_fields()
        for name in cls.axes:
            value = arrays.get(name)
            if name in constants and value is not None and not isinstance(value, Constant):
                value = Constant(np.asarray(value))
            kwargs[name] = value
        return cls(**kwargs)  # type: ignore[call-arg]

    def _encode_static(self, name: str, value: Any) -> Any:
        if isinstance(value, Layout):
            return {
                "stacked": list(value.stacked),
                "inputs": list(value.inputs),
                "outputs": list(value.outputs),
            }
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(
            f"{type(self).__name__}.{name} holds {value!r}; override _encode_static to store it"
        )

    @classmethod
    def _decode_static(cls, name: str, value: Any) -> Any:
        if name == "layout":
            return Layout(
                *(tuple(int(n) for n in value[k]) for k in ("stacked", "inputs", "outputs"))
            )
        return value


def node_type(kind: str) -> type[AdapterNode]:
    """The node type registered under ``kind`` (``"lora"``, ``"dora"``, ``"vera"``, ...).

    Raises:
        ValueError: if no node type has that kind.

    Example:
        >>> import jaxlora
        >>> from jaxlora._node import node_type
        >>> node_type("lora") is jaxlora.LoraNode
        True
    """
    try:
        return _KINDS[kind]
    except KeyError:
        raise ValueError(
            f"no adapter node type has kind {kind!r}; known kinds: {sorted(_KINDS)}. Import the "
            "module that defines it (jaxlora.variants defines 'dora', 'vera' and 'adalora')."
        ) from None


def node_types() -> tuple[type[AdapterNode], ...]:
    """Every registered node type, in registration order."""
    return tuple(_KINDS.values())


def is_node(x: Any) -> bool:
    """Whether ``x`` is an adapter node (the leaf type of a delta)."""
    return isinstance(x, AdapterNode)


def is_delta_leaf(x: Any) -> bool:
    """``is_leaf`` for walking a delta: adapter nodes and holes (``None``)."""
    return x is None or is_node(x)


def matmul32(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` in float32 at the highest precision."""
    return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=_HIGHEST)


def size_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
