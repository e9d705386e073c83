"""``plan``: what full fine-tuning, LoRA and QLoRA would cost, from abstract parameters."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import jaxlora.memory
from jaxlora._config import LoraConfig
from jaxlora._engine import FallbackWarning
from jaxlora._split import split
from jaxlora.plan._placement import (
    batch_sharding,
    find_mesh,
    like,
    place,
    quantized,
    replicated,
    state_like,
    with_shardings,
)
from jaxlora.plan._report import MethodPlan, Plan, parse_bytes
from jaxlora.quant import FORMATS
from jaxlora.sharding import adapter_shardings

__all__ = ["plan"]


def plan(
    apply_fn: Callable[[Any, Any], Any],
    abstract_params: Any,
    config: LoraConfig | Any,
    *,
    batch: Any,
    optimizer: optax.GradientTransformation,
    quantize: str | Mapping[str, Any] | None = None,
    mesh: Mesh | None = None,
    device_memory: int | str | None = None,
    skip_compile: bool = False,
) -> Plan:
    """Plans full fine-tuning, LoRA and QLoRA of a model without allocating it.

    Parameter counts and checkpoint sizes come from :func:`jaxlora.split` (and
    :func:`jaxlora.quant.quantize`) under ``jax.eval_shape``. The peak memory
    of each method is XLA's plan for one jitted optimizer step with donated
    state (:mod:`jaxlora.memory`: ``full_step``, ``lora_step``,
    ``memory_of``), compiled for abstract inputs on the current backend:
    ``argument + output - alias + temp`` bytes per device. On a CPU host the
    plan approximates an accelerator's: XLA's CPU scheduler differs (the
    ``jaxlora plan`` command sets the memory-minimizing one), and XLA:CPU
    computes bfloat16 matmuls in float32, which can add float32 copies of
    bfloat16 weights to the plan (plan bfloat16 models on their target backend,
    or read the float32 plan as an upper bound).

    Args:
        apply_fn: ``apply_fn(params, batch)``: the training loss. A non-scalar
            output is summed (in float32) to a scalar loss, which changes the
            memory plan by at most one output-sized buffer, so a model's own
            apply function plans as is.
        abstract_params: the parameter tree, of ``jax.ShapeDtypeStruct`` s (from
            ``jax.eval_shape(model.init, ...)``) or of arrays; only shapes,
            dtypes and shardings are read.
        config: the adapter configuration to plan: a :class:`jaxlora.LoraConfig` or a
            variant's (``jaxlora.variants.VeraConfig``, ``AdaLoraConfig``).
        batch: the second argument of ``apply_fn``, abstract or concrete.
        optimizer: the optax optimizer (e.g. ``optax.adam(1e-4)``); LoRA keeps
            its state for the adapters only.
        quantize: plan QLoRA with the base quantized by
            :func:`jaxlora.quant.quantize`: a format name (``"nf4"``) or a mapping
            of its keyword arguments (``{"format": "nf4", "block_size": 64}``).
            ``None`` plans no QLoRA. If the quantized base cannot be built or
            trained (``lora_apply`` raises), QLoRA is reported as not available,
            with the reason.
        mesh: plan the step on this mesh of devices. Leaves of
            ``abstract_params`` and ``batch`` that carry a ``NamedSharding`` keep
            it; other parameters are replicated, other batch leaves are split
            along their leading axis over the mesh's first axis (when it
            divides). Adapters follow their weights
            (:func:`jaxlora.sharding.adapter_shardings`), optimizer state
            follows what it mirrors, and quantized weights are split along
            their blocks over their weight's mesh axes. ``None`` uses the mesh
            of sharded leaves if there are any, else one device.
        device_memory: the memory of one device, in bytes or as text
            (``"80GB"``, ``"16GiB"``; see :func:`parse_bytes`), to report
            whether each method fits.
        skip_compile: count only; no step is compiled (for models whose
            compilation is too slow on this host).

    Returns:
        A :class:`Plan`.

    Raises:
        TypeError: if ``config`` is neither a :class:`jaxlora.LoraConfig` nor a
            variant's config, or ``optimizer`` no optax ``GradientTransformation``.
        ValueError: for an invalid ``device_memory`` or quantization format,
            and whatever :func:`jaxlora.split` raises for ``config``.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxlora
        >>> from jaxlora.models.llama import Llama, LlamaConfig
        >>> from jaxlora.plan import plan
        >>> model = Llama(LlamaConfig.tiny())
        >>> tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
        >>> params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
        >>> p = plan(lambda p, t: model.apply({"params": p}, t), params,
        ...          jaxlora.LoraConfig(rank=4, targets=["q_proj", "v_proj"]),
        ...          batch=tokens, optimizer=optax.adam(1e-3), skip_compile=True)
        >>> p.full.trainable_params, p.lora.trainable_params  # 2 layers × (q: 64→64, v: 64→32)
        (106816, 1792)
        >>> print(p)
                            full fine-tuning      LoRA
        parameters                   106,816   108,608
        trainable                    106,816     1,792
        trainable %                     100%     1.65%
        weights (total)             427.3 kB  427.3 kB
        checkpoint float32          427.3 kB    7.2 kB
        checkpoint 16-bit           213.6 kB    3.6 kB
        checkpoint reduction              1x       60x
        memory: not compiled (counts only)

    References:
        Hu et al. 2021, LoRA, Section 4.2 and Table 4.
        https://arxiv.org/abs/2106.09685
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation such as optax.adam(1e-4); "
            f"got {type(optimizer).__name__}"
        )
    memory_limit = None if device_memory is None else parse_bytes(device_memory)
    quant_options = _quant_options(quantize)
    mesh = mesh if mesh is not None else find_mesh((abstract_params, batch))
    params = place(abstract_params, mesh, lambda x: replicated(mesh))
    batch = place(batch, mesh, lambda x: batch_sharding(x, mesh))

    def loss(p: Any, b: Any) -> jax.Array:
        out = apply_fn(p, b)
        return jnp.sum(jnp.asarray(out, jnp.float32)) if jnp.ndim(out) else out

    base, delta = jax.eval_shape(lambda p: split(p, config, key=jax.random.key(0)), params)
    base = like(base, params)
    if mesh is not None:
        shardings = jax.tree.map(lambda x: x.sharding, params)
        delta = with_shardings(delta, adapter_shardings(shardings, delta))
    total = _size_of(params)
    adapters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(delta))  # all trainable
    lora_total = _size_of(base) + adapters

    def column(
        method: str, params_count: tuple[int, int], weights: Any, step: Callable[[], Any]
    ) -> MethodPlan:
        all_params, trainable = params_count
        memory, notes = (None, ()) if skip_compile else _noting_fallbacks(step)
        return MethodPlan(
            method=method,
            total_params=all_params,
            trainable_params=trainable,
            base_bytes=_bytes_of(weights),
            checkpoint_bytes=4 * trainable,
            checkpoint_bytes_16=2 * trainable,
            memory=memory,
            fits=None if memory is None or memory_limit is None else memory.peak <= memory_limit,
            notes=notes,
        )

    def full_memory() -> jaxlora.memory.MemoryReport:
        state = state_like(jax.eval_shape(optimizer.init, params), params, mesh)
        step = jaxlora.memory.full_step(loss, optimizer)
        return jaxlora.memory.memory_of(step, params, state, batch, donate_argnums=(0, 1))

    lora_opt = jaxlora.memory.lora_optimizer(optimizer, delta)

    def lora_memory(frozen: Any) -> Callable[[], jaxlora.memory.MemoryReport]:
        def measure() -> jaxlora.memory.MemoryReport:
            state = state_like(jax.eval_shape(lora_opt.init, delta), delta, mesh)
            step = jaxlora.memory.lora_step(loss, lora_opt)
            return jaxlora.memory.memory_of(
                step, delta, state, frozen, batch, donate_argnums=(0, 1)
            )

        return measure

    full = column("full fine-tuning", (total, total), params, full_memory)
    lora = column("LoRA", (lora_total, adapters), base, lora_memory(base))
    qlora = None
    if quant_options is not None:
        name = f"QLoRA ({quant_options.get('format', 'nf4')})"
        try:
            qbase = quantized(base, quant_options, mesh)
            qlora = column(name, (lora_total, adapters), qbase, lora_memory(qbase))
        except Exception as e:  # any failure makes QLoRA "not available", with its reason
            qlora = MethodPlan(
                method=name,
                total_params=lora_total,
                trainable_params=adapters,
                base_bytes=None,
                checkpoint_bytes=4 * adapters,
                checkpoint_bytes_16=2 * adapters,
                memory=None,
                fits=None,
                unavailable=_reason(e),
            )
    return Plan(
        full=full,
        lora=lora,
        qlora=qlora,
        devices=1 if mesh is None else int(mesh.size),
        device_memory=memory_limit,
        compiled=not skip_compile,
    )


def _quant_options(quantize: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if quantize is None:
        return None
    options = {"format": quantize} if isinstance(quantize, str) else dict(quantize)
    fmt = options.get("format", "nf4")
    if fmt not in FORMATS:
        raise ValueError(
            f"quantize={quantize!r}: unknown format {fmt!r}; use one of {tuple(FORMATS)}"
        )
    return options


_FALLBACK = re.compile(r"`(.+?)` uses the adapted weight '(.+?)'")


def _noting_fallbacks(step: Callable[[], Any]) -> tuple[Any, tuple[str, ...]]:
    """``step()``, with the engine's fallback warnings collected as notes instead of shown."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FallbackWarning)
        result = step()
    merged: dict[str, list[str]] = {}
    notes = []
    for w in caught:
        if not issubclass(w.category, FallbackWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        m = _FALLBACK.search(str(w.message))
        if m is None:
            notes.append(str(w.message))
        else:
            merged.setdefault(m.group(1), []).append(m.group(2))
    for use, paths in merged.items():
        notes.append(f"merged at one use ({use}): {', '.join(dict.fromkeys(paths))}")
    return result, tuple(dict.fromkeys(notes))


def _size_of(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _nbytes(x: Any) -> int:
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def _bytes_of(tree: Any) -> int:
    return sum(_nbytes(x) for x in jax.tree.leaves(tree))


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".strip()
