"""The use-site engine behind ``lora_apply``.

``fn`` is traced to a jaxpr with each adapted weight as an input; the jaxpr is
then evaluated by a small interpreter (``_interpret``, with the rules for each
use of a weight in ``_uses`` and its policy in ``_context``) in which those inputs
are ``Adapted`` values (``_adapted``): views of the frozen weight that carry
their low-rank factors. Where a weight meets ``dot_general``, ``gather`` or
``conv_general_dilated``, a rule (``_rules``) emits ``op(x, W) + s·op(x, a⊗b)``
with ``x`` contracted against a factor first, so the merged weight is never
built; its gradient is a custom VJP (``_backward``) whose factor gradients
XLA runs without transposing activations. Higher-order primitives (``jit``,
``scan``, ``while``, ``cond``, ``remat``, ``shard_map``, custom derivatives)
are re-emitted around an interpreted body, so ``nn.scan``-stacked adapters are
sliced per layer with their weights, ``shard_map`` bodies get each shard's
slice of the factors, and remat policies are kept. Slices of a weight (a
layer or expert taken by ``w[i]``) slice its factors, ``reshard`` reshards them,
and a weight norm (a multiplier per output unit, the sum of squares over the
inputs: ``_norms``) stays factored too. Any other use merges the weight at that
use only. ``_layout`` reads, from the same
kind of trace, which axes of each weight are stacked, inputs and outputs
(``infer_layout``).

Why our own interpreter rather than quax: quax (a maintained library for
array-like pytrees that override primitives) would give us the dispatch, but
the decisions that matter here are ours either way: reading each
``dot_general``'s dimension numbers against the weight's stacked/input/output
axes, choosing which factor meets the activation first, slicing adapters in
``scan`` bodies, threading dropout keys, warning once per (primitive, path).
Written directly, that is ~500 lines over ``jax.extend.core`` with no new
dependency (quax brings equinox and plum) and no second layer of dispatch to
debug when a JAX release renames a primitive parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import AxisType

from jaxlora import _paths
from jaxlora._engine._adapted import from_node, from_quantized
from jaxlora._engine._context import Context, FallbackError, FallbackWarning
from jaxlora._engine._interpret import evaluate
from jaxlora._engine._layout import infer_layout
from jaxlora.quant import QuantizedArray

__all__ = ["FallbackError", "FallbackWarning", "infer_layout", "use_site_call"]


def use_site_call(
    fn: Callable[..., Any],
    base: Any,
    nodes: Sequence[Any],
    args: tuple,
    kwargs: dict,
    *,
    strict: bool,
    warned: set,
    dropout_key: jax.Array | None,
    adapter_ids: jax.Array | None = None,
    routing: str = "auto",
    forward_mode: bool = False,
) -> Any:
    """``fn(merge(base, delta), *args, **kwargs)``, computed at each weight's use.

    ``nodes`` holds, for each leaf of ``base`` (Flax boxes and quantized arrays
    counting as leaves), its ``LoraNode`` or ``None``. Quantized base weights,
    adapted or not, are dequantized at each use. With ``adapter_ids`` (stacked
    nodes), example ``i`` uses adapter ``adapter_ids[i]``, computed the
    ``routing`` way (see ``_routing``). ``forward_mode``: no custom VJP
    (``_backward``), so that forward-mode derivatives work.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(base, is_leaf=_paths.is_box)
    adapted = [
        i
        for i, node in enumerate(nodes)
        if node is not None or isinstance(_paths.unbox(flat[i][1]), QuantizedArray)
    ]
    weights = [_paths.unbox(flat[i][1]) for i in adapted]

    def traced(*weight_values: Any) -> Any:
        # fresh boxes inside the trace: NNX refuses Variables made at another trace level
        # (an nnx.scan of the merged module), as jax.jit's own unflattening would avoid
        slots = [_paths.rebox(leaf, _paths.unbox(leaf)) for _, leaf in flat]
        for i, value in zip(adapted, weight_values, strict=True):
            slots[i] = _paths.rebox(slots[i], value)
        return fn(treedef.unflatten(slots), *args, **kwargs)

    avals = [_abstract(w) for w in weights]
    closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(*avals)
    _check_weights_used(closed.jaxpr, [nodes[i] is not None for i in adapted], flat, adapted)
    inputs = [
        from_quantized(w, _paths.path_str(flat[i][0]))
        if nodes[i] is None
        else from_node(w, nodes[i], _paths.path_str(flat[i][0]), adapter_ids, routing)
        for i, w in zip(adapted, weights, strict=True)
    ]
    ctx = Context(strict=strict, warned=warned, dropout_key=dropout_key, forward_mode=forward_mode)
    out = evaluate(closed.jaxpr, closed.consts, inputs, ctx)
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)


def _abstract(w: Any) -> jax.ShapeDtypeStruct:
    """``w``'s shape and dtype, and its sharding where the mesh has Explicit axes.

    On an Explicit mesh a sharding is part of the type: ``shard_map`` and
    matmuls with ``out_sharding`` check it while ``fn`` is traced.
    """
    if isinstance(w, QuantizedArray):
        return jax.ShapeDtypeStruct(w.shape, w.dtype)
    sharding = getattr(jax.typeof(w), "sharding", None)
    types = getattr(getattr(sharding, "mesh", None), "axis_types", ())
    explicit = any(t == AxisType.Explicit for t in types)
    return jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=sharding if explicit else None)


def _check_weights_used(jaxpr: Any, has_node: list[bool], flat: list, adapted: list[int]) -> None:
    """Raises if ``fn`` reads none of the adapted weights: the delta would train nothing."""
    if not any(has_node):
        return
    used = {
        id(v) for v in [*(v for eqn in jaxpr.eqns for v in eqn.invars), *jaxpr.outvars]
    }  # ids: literals are unhashable
    weights = [v for v, node in zip(jaxpr.invars, has_node, strict=True) if node]
    if not any(id(v) in used for v in weights):
        paths = [_paths.path_str(flat[i][0]) for i, n in zip(adapted, has_node, strict=True) if n]
        raise ValueError(
            f"the function given to lora_apply never reads an adapted weight from its params "
            f"argument (adapted: {paths[:3]}{' ...' if len(paths) > 3 else ''}), so the "
            "delta cannot change its output and would train nothing. Make fn(params, ...) "
            "compute with the params it is given, e.g. lambda params, x: "
            "model.apply({'params': params}, x), not with variables captured from outside."
        )
