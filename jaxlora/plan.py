"""The memory planner: parameters, checkpoint sizes and training memory before training.

:func:`plan` answers, for a model that need not fit anywhere yet, what full
fine-tuning, LoRA and QLoRA would cost: how many parameters train, how large
the saved result is, and how much memory one optimizer step needs on each
device. Nothing is allocated: parameters are ``jax.ShapeDtypeStruct`` s,
:func:`jaxlora.split` and :func:`jaxlora.quant.quantize` run under
``jax.eval_shape``, and each training step is compiled for abstract inputs so
that XLA's own memory plan (``memory_analysis()``) gives the peak per device.

Counting needs no compilation and is exact: the trainable count is the size of
the adapters ``split`` makes. For GPT-3 175B (96 layers, d_model 12288) with
rank 4 on the query and value projections that is
``96 × 2 × (12288·4 + 4·12288) = 18,874,368`` parameters, a 37.7 MB float16
checkpoint against the model's 350 GB (Hu et al. 2021, Section 4.2 and
Table 4: "18.9M", "35MB", "about 10,000×").

The command line ``jaxlora plan`` (:func:`add_arguments`, :func:`run`) plans a
Llama-style decoder (:mod:`jaxlora.models.llama`) given by a preset, by size
flags or by a Hugging Face ``config.json``.

References:
    Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models.
    https://arxiv.org/abs/2106.09685
    Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs.
    https://arxiv.org/abs/2305.14314
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora import _paths
from jaxlora import memory as _memory
from jaxlora._config import LoraConfig
from jaxlora._engine import FallbackWarning
from jaxlora._split import split
from jaxlora.sharding import adapter_shardings

__all__ = [
    "PRESETS",
    "MethodPlan",
    "Plan",
    "add_arguments",
    "llama_config_from_hf",
    "parse_bytes",
    "plan",
    "run",
]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


@dataclasses.dataclass(frozen=True)
class MethodPlan:
    """What one fine-tuning method costs; one column of a :class:`Plan`.

    Attributes:
        method: ``"full fine-tuning"``, ``"LoRA"`` or ``"QLoRA (<format>)"``.
        total_params: parameters of the model being trained, adapters included.
        trainable_params: parameters that receive gradients and optimizer state.
        base_bytes: bytes of the weights as held in memory (quantized for
            QLoRA); ``None`` if they could not be built.
        checkpoint_bytes: bytes of the saved result in float32: the whole model
            for full fine-tuning, the adapters ``a`` and ``b`` otherwise.
        checkpoint_bytes_16: the same in float16 / bfloat16.
        memory: XLA's memory plan of one training step, per device; ``None``
            when not compiled or not available.
        fits: whether ``memory.peak`` fits the planned device memory; ``None``
            when there is no device memory to compare with or no plan.
        unavailable: why this method could not be planned, or ``None``.
        notes: what the use-site engine warned about while compiling the step
            (a :class:`jaxlora.FallbackWarning` means a weight was merged at
            one use, which the peak then includes).

    Example:
        >>> from jaxlora.plan import MethodPlan
        >>> m = MethodPlan("LoRA", 1000, 10, 4000, 40, 20, None, None)
        >>> m.peak_bytes, m.trainable_percent, m.available
        (None, 1.0, True)
    """

    method: str
    total_params: int
    trainable_params: int
    base_bytes: int | None
    checkpoint_bytes: int
    checkpoint_bytes_16: int
    memory: _memory.MemoryReport | None
    fits: bool | None
    unavailable: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def peak_bytes(self) -> int | None:
        """The peak training memory per device, ``memory.peak``, or ``None``."""
        return None if self.memory is None else self.memory.peak

    @property
    def trainable_percent(self) -> float:
        """The trainable share of ``total_params``, in percent."""
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    @property
    def available(self) -> bool:
        """Whether the method could be planned (``unavailable is None``)."""
        return self.unavailable is None


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planner's answer: one :class:`MethodPlan` per method; ``str()`` is a table.

    Attributes:
        full: full fine-tuning (every parameter trains, optimizer state for all).
        lora: LoRA on the frozen base.
        qlora: LoRA on the quantized base, or ``None`` if not requested.
        devices: devices one step runs on (the mesh size, or 1).
        device_memory: the memory of one device in bytes, or ``None``.
        compiled: whether the steps were compiled (``False``: counts only).

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxlora
        >>> from jaxlora.plan import plan
        >>> params = {"dense": {"kernel": jax.ShapeDtypeStruct((512, 512), jnp.float32)}}
        >>> batch = jax.ShapeDtypeStruct((8, 512), jnp.float32)
        >>> p = plan(lambda p, x: jnp.mean((x @ p["dense"]["kernel"]) ** 2), params,
        ...          jaxlora.LoraConfig(rank=4, targets="dense"), batch=batch,
        ...          optimizer=optax.adam(1e-3), device_memory="4MB")
        >>> [m.method for m in p.methods], p.devices
        (['full fine-tuning', 'LoRA'], 1)
        >>> p.lora.trainable_params, p.lora.checkpoint_bytes_16
        (4096, 8192)
        >>> p.full.fits, p.lora.fits, p.full.peak_bytes > p.lora.peak_bytes
        (False, True, True)
        >>> print(str(p).splitlines()[-1])
        fits in 4.0 MB                      no  yes
    """

    full: MethodPlan
    lora: MethodPlan
    qlora: MethodPlan | None
    devices: int
    device_memory: int | None
    compiled: bool

    @property
    def methods(self) -> tuple[MethodPlan, ...]:
        """The planned methods, in column order."""
        return tuple(m for m in (self.full, self.lora, self.qlora) if m is not None)

    def __str__(self) -> str:
        methods = self.methods
        per = "per device" if self.devices > 1 else "(1 device)"
        rows: list[tuple[str, ...]] = [("", *(m.method for m in methods))]
        rows.append(("parameters", *(f"{m.total_params:,}" for m in methods)))
        rows.append(("trainable", *(f"{m.trainable_params:,}" for m in methods)))
        rows.append(("trainable %", *(f"{m.trainable_percent:.4g}%" for m in methods)))
        rows.append(("weights (total)", *(_size(m.base_bytes) for m in methods)))
        rows.append(("checkpoint float32", *(_size(m.checkpoint_bytes) for m in methods)))
        rows.append(("checkpoint 16-bit", *(_size(m.checkpoint_bytes_16) for m in methods)))
        rows.append(
            (
                "checkpoint reduction",
                *(f"{self.full.checkpoint_bytes / m.checkpoint_bytes:,.0f}x" for m in methods),
            )
        )
        if self.compiled:
            rows.append((f"peak training memory {per}", *(_peak(m) for m in methods)))
            if self.device_memory is not None:
                gib, rest = divmod(self.device_memory, 2**30)
                label = (
                    f"fits in {gib} GiB"
                    if gib and not rest
                    else f"fits in {_size(self.device_memory)}"
                )
                rows.append((label, *(_yes_no(m) for m in methods)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]
        if not self.compiled:
            lines.append("memory: not compiled (counts only)")
        for m in methods:
            if m.unavailable is not None:
                lines.append(f"{m.method}: not available: {m.unavailable}")
            lines.extend(f"{m.method}: {note}" for note in m.notes)
        return "\n".join(line.rstrip() for line in lines)


def plan(
    apply_fn: Callable[[Any, Any], Any],
    abstract_params: Any,
    config: LoraConfig,
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
        config: the LoRA configuration to plan.
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
        TypeError: if ``config`` is no :class:`jaxlora.LoraConfig` or
            ``optimizer`` no optax ``GradientTransformation``.
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
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a jaxlora.LoraConfig; got {type(config).__name__}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation such as optax.adam(1e-4); "
            f"got {type(optimizer).__name__}"
        )
    memory_limit = None if device_memory is None else parse_bytes(device_memory)
    quant_options = _quant_options(quantize)
    mesh = mesh if mesh is not None else _find_mesh((abstract_params, batch))
    params = _place(abstract_params, mesh, lambda x: _replicated(mesh))
    batch = _place(batch, mesh, lambda x: _batch_sharding(x, mesh))

    def loss(p: Any, b: Any) -> jax.Array:
        out = apply_fn(p, b)
        return jnp.sum(jnp.asarray(out, jnp.float32)) if jnp.ndim(out) else out

    base, delta = jax.eval_shape(lambda p: split(p, config, key=jax.random.key(0)), params)
    base = _like(base, params)
    if mesh is not None:
        shardings = jax.tree.map(lambda x: x.sharding, params)
        delta = _with_shardings(delta, adapter_shardings(shardings, delta))
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

    def full_memory() -> _memory.MemoryReport:
        state = _state_like(jax.eval_shape(optimizer.init, params), params, mesh)
        step = _memory.full_step(loss, optimizer)
        return _memory.memory_of(step, params, state, batch, donate_argnums=(0, 1))

    lora_opt = _memory.lora_optimizer(optimizer, delta)

    def lora_memory(frozen: Any) -> Callable[[], _memory.MemoryReport]:
        def measure() -> _memory.MemoryReport:
            state = _state_like(jax.eval_shape(lora_opt.init, delta), delta, mesh)
            step = _memory.lora_step(loss, lora_opt)
            return _memory.memory_of(step, delta, state, frozen, batch, donate_argnums=(0, 1))

        return measure

    full = column("full fine-tuning", (total, total), params, full_memory)
    lora = column("LoRA", (lora_total, adapters), base, lora_memory(base))
    qlora = None
    if quant_options is not None:
        name = f"QLoRA ({quant_options.get('format', 'nf4')})"
        try:
            qbase = _quantized(base, quant_options, mesh)
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


def parse_bytes(text: int | str) -> int:
    """Reads a memory size: an int of bytes, or text such as ``"80GB"`` or ``"16 GiB"``.

    Decimal units (``kB``, ``MB``, ``GB``, ``TB``) are powers of 1000, binary ones
    (``KiB``, ``MiB``, ``GiB``, ``TiB``) powers of 1024; case does not matter.

    Args:
        text: the size.

    Returns:
        The size in bytes, a positive int.

    Raises:
        ValueError: if ``text`` is not a positive size in a known unit.

    Example:
        >>> from jaxlora.plan import parse_bytes
        >>> parse_bytes("80GB"), parse_bytes("16 GiB"), parse_bytes("1.5kB"), parse_bytes(512)
        (80000000000, 17179869184, 1500, 512)
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ValueError(f"a memory size must be an int of bytes or text like '80GB'; got {text!r}")
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"cannot read {text!r} as a memory size; write a number and a unit such as "
                "'80GB', '16GiB' or '512MB' (units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        value, unit = float(m.group(1)), m.group(2).lower()
    size = round(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a memory size must be positive; got {text!r}")
    return size


# ------------------------------------------------------------------------ internals


def _quant_options(quantize: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    from jaxlora.quant import FORMATS

    if quantize is None:
        return None
    options = {"format": quantize} if isinstance(quantize, str) else dict(quantize)
    fmt = options.get("format", "nf4")
    if fmt not in FORMATS:
        raise ValueError(
            f"quantize={quantize!r}: unknown format {fmt!r}; use one of {tuple(FORMATS)}"
        )
    return options


def _find_mesh(tree: Any) -> Mesh | None:
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
            if sharding.mesh.size > 1:
                return sharding.mesh
    return None


def _replicated(mesh: Mesh | None) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def _batch_sharding(x: Any, mesh: Mesh | None) -> NamedSharding | None:
    if mesh is None:
        return None
    axis = mesh.axis_names[0]
    if jnp.ndim(x) and jnp.shape(x)[0] % mesh.shape[axis] == 0:
        return NamedSharding(mesh, PartitionSpec(axis))
    return _replicated(mesh)


def _place(tree: Any, mesh: Mesh | None, default: Callable[[Any], Any]) -> Any:
    """``tree`` as ShapeDtypeStructs: with their own NamedSharding on ``mesh``, or ``default``."""

    def one(x: Any) -> Any:
        sharding = None
        if mesh is not None:
            own = getattr(x, "sharding", None)
            sharding = own if isinstance(own, NamedSharding) and own.mesh.size > 1 else default(x)
        return jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def _like(tree: Any, reference: Any) -> Any:
    """``tree``'s shapes with ``reference``'s shardings (same structure)."""
    return jax.tree.map(
        lambda x, r: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=r.sharding), tree, reference
    )


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _state_like(state: Any, params: Any, mesh: Mesh | None) -> Any:
    """Optimizer state placed like the parameter each leaf mirrors (matched by key path)."""
    if mesh is None:
        return state
    by_path = {
        tuple(_paths.key_str(k) for k in path): x
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }

    def one(path: Any, x: Any) -> Any:
        keys = tuple(_paths.key_str(k) for k in path)
        for start in range(len(keys)):
            match = by_path.get(keys[start:])
            if match is not None and tuple(match.shape) == tuple(x.shape):
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=match.sharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_replicated(mesh))

    return jax.tree_util.tree_map_with_path(one, state)


def _quantized(base: Any, options: dict[str, Any], mesh: Mesh | None) -> Any:
    from jaxlora.quant import is_quantized, quantize

    qbase = jax.eval_shape(lambda b: quantize(b, **options), base)
    if mesh is None:
        return qbase

    def place(q: Any, weight: Any) -> Any:
        if not is_quantized(q):
            return jax.ShapeDtypeStruct(q.shape, q.dtype, sharding=weight.sharding)
        spec = weight.sharding.spec if isinstance(weight.sharding, NamedSharding) else ()
        names = tuple(n for e in spec for n in ((e,) if isinstance(e, str) else e or ()))
        devices = math.prod(mesh.shape[n] for n in names)

        def leaf(x: Any) -> Any:
            split_ok = names and x.ndim == 1 and x.shape[0] % devices == 0
            sharding = NamedSharding(mesh, PartitionSpec(names) if split_ok else PartitionSpec())
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        return jax.tree.map(leaf, q)

    return jax.tree.map(place, qbase, base, is_leaf=is_quantized)


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


def _size(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _peak(m: MethodPlan) -> str:
    return "n/a" if m.memory is None else _size(m.memory.peak)


def _yes_no(m: MethodPlan) -> str:
    return "n/a" if m.fits is None else "yes" if m.fits else "no"


# ------------------------------------------------------------------ command line


def _gpt3_175b(**overrides: Any) -> Any:
    from jaxlora.models.llama import LlamaConfig

    fields = dict(
        vocab_size=50257, d_model=12288, n_layers=96, n_heads=96, d_ff=32768, max_len=2048
    )
    return LlamaConfig(**{**fields, **overrides})


def _preset(name: str) -> Callable[..., Any]:
    from jaxlora.models.llama import LlamaConfig

    return {
        "tiny": LlamaConfig.tiny,
        "llama-1b": LlamaConfig.llama_1b,
        "llama-7b": LlamaConfig.llama_7b,
        "gpt3-175b": _gpt3_175b,
    }[name]


PRESETS = ("tiny", "llama-1b", "llama-7b", "gpt3-175b")
"""Model presets of ``jaxlora plan``: :class:`jaxlora.models.llama.LlamaConfig`'s ``tiny``,
``llama_1b`` and ``llama_7b``, and ``gpt3-175b``: GPT-3 175B's attention (96 layers,
d_model 12288, 96 heads, vocabulary 50257) with a SwiGLU MLP of width 32768, which keeps
the total at 175.2B parameters."""

_HF_KEYS = {  # LlamaConfig field: (Llama-style key, GPT-style key)
    "d_model": ("hidden_size", "n_embd"),
    "n_layers": ("num_hidden_layers", "n_layer"),
    "n_heads": ("num_attention_heads", "n_head"),
    "vocab_size": ("vocab_size", "vocab_size"),
}


def llama_config_from_hf(source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> Any:
    """Reads a Hugging Face ``config.json`` into a :class:`jaxlora.models.llama.LlamaConfig`.

    Llama-style keys (``LlamaForCausalLM``, Mistral, Qwen2, ...): ``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
    ``intermediate_size``, ``vocab_size``, ``max_position_embeddings``,
    ``rope_theta``, ``rms_norm_eps``, ``tie_word_embeddings``. GPT-style keys
    (``n_embd``, ``n_layer``, ``n_head``, ``n_inner``, ``n_positions``) are read
    into the same Llama-style decoder: attention shapes, and so adapter counts
    on attention, are exact; the MLP is SwiGLU of width ``n_inner`` (default
    ``4 · n_embd``), three matrices where GPT has two; embeddings are tied
    unless ``tie_word_embeddings`` is false.

    Args:
        source: the path of a ``config.json``, or its parsed contents.
        **overrides: ``LlamaConfig`` fields to set after reading.

    Returns:
        The config.

    Raises:
        ValueError: if the file is not JSON, lacks a size, or the sizes are invalid.
        FileNotFoundError: if the path does not exist.

    Example:
        >>> from jaxlora.plan import llama_config_from_hf
        >>> cfg = llama_config_from_hf({"hidden_size": 2048, "num_hidden_layers": 22,
        ...     "num_attention_heads": 32, "num_key_value_heads": 4,
        ...     "intermediate_size": 5632, "vocab_size": 32000})
        >>> cfg.num_params()  # TinyLlama-1.1B
        1100048384
        >>> llama_config_from_hf({"n_embd": 768, "n_layer": 12, "n_head": 12,
        ...                       "vocab_size": 50257}).d_ff
        3072
    """
    from jaxlora.models.llama import LlamaConfig

    if isinstance(source, Mapping):
        data, where = dict(source), "the config"
    else:
        where = os.fspath(source)
        with open(where, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where} holds a JSON {type(data).__name__}, not an object")
    gpt = "n_embd" in data and "hidden_size" not in data
    fields: dict[str, Any] = {}
    for field, keys in _HF_KEYS.items():
        key = keys[1] if gpt else keys[0]
        if key not in data:
            raise ValueError(
                f"{where} has no {key!r}; a Llama-style config.json needs hidden_size, "
                "num_hidden_layers, num_attention_heads, intermediate_size and vocab_size "
                "(a GPT-style one n_embd, n_layer, n_head and vocab_size)"
            )
        fields[field] = data[key]
    if gpt:
        fields["d_ff"] = data.get("n_inner") or 4 * fields["d_model"]
        fields["max_len"] = data.get("n_positions", 2048)
        fields["tie_embeddings"] = bool(data.get("tie_word_embeddings", True))
    else:
        if "intermediate_size" not in data:
            raise ValueError(f"{where} has no 'intermediate_size' (the MLP width)")
        fields["d_ff"] = data["intermediate_size"]
        fields["n_kv_heads"] = data.get("num_key_value_heads") or fields["n_heads"]
        fields["max_len"] = data.get("max_position_embeddings", 2048)
        fields["tie_embeddings"] = bool(data.get("tie_word_embeddings", False))
        for field, key in (("rope_theta", "rope_theta"), ("norm_eps", "rms_norm_eps")):
            if data.get(key) is not None:
                fields[field] = data[key]
    return LlamaConfig(**{**fields, **overrides})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``jaxlora plan`` options to ``parser``.

    Args:
        parser: the subcommand's parser.

    Example:
        >>> import argparse
        >>> from jaxlora.plan import add_arguments
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> args = parser.parse_args(["llama-7b", "--rank", "16", "--device-memory", "80GB"])
        >>> args.model, args.rank, args.device_memory
        ('llama-7b', 16, 80000000000)
    """
    parser.add_argument(
        "model",
        nargs="?",
        help=f"a preset ({', '.join(PRESETS)}) or the path of a Hugging Face config.json; "
        "the size flags below override its values or, without it, give all sizes",
    )
    sizes = parser.add_argument_group("model sizes (Llama-style decoder)")
    for flag, help_text in (
        ("--d-model", "width of the residual stream"),
        ("--layers", "number of decoder layers"),
        ("--heads", "attention heads"),
        ("--kv-heads", "key/value heads (default: --heads)"),
        ("--d-ff", "MLP hidden width"),
        ("--vocab", "vocabulary size"),
    ):
        sizes.add_argument(flag, type=_positive_int, help=help_text)
    parser.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank (default 8)")
    parser.add_argument(
        "--targets",
        default="attention",
        help="comma-separated regexes of the weights to adapt, or a preset: attention, mlp, "
        "all-linear (default: attention; the LoRA paper: q_proj,v_proj)",
    )
    parser.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")
    parser.add_argument("--seq", type=_positive_int, default=512, help="tokens per sequence")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the weights and activations (default float32; on a CPU host, "
        "bfloat16 plans include XLA:CPU's float32 copies of bfloat16 weights)",
    )
    parser.add_argument("--remat", action="store_true", help="rematerialize each layer")
    parser.add_argument(
        "--device-memory",
        type=_bytes_arg,
        help="memory of one device, e.g. 80GB or 24GiB, to report what fits",
    )
    parser.add_argument(
        "--quantize",
        default="nf4",
        help="QLoRA base format: nf4, fp4, int4, int8, or none (default nf4)",
    )
    parser.add_argument(
        "--skip-compile",
        action="store_true",
        help="count parameters and checkpoint sizes only (for models too slow to compile)",
    )


def run(args: argparse.Namespace) -> int:
    """Runs ``jaxlora plan`` with parsed ``args``; prints the plan; returns the exit code.

    The model is the Llama-style decoder of :mod:`jaxlora.models.llama`, its layers
    stacked with ``nn.scan`` (so that one layer is compiled), trained with Adam on
    the next-token loss of ``--batch`` sequences of ``--seq`` tokens.

    Args:
        args: the namespace parsed by a parser set up with :func:`add_arguments`.

    Returns:
        0 on success, 2 for an invalid model description (the error goes to stderr).

    Example:
        >>> from jaxlora.apps.cli import main
        >>> main(["plan", "gpt3-175b", "--rank", "4", "--targets", "q_proj,v_proj",
        ...       "--skip-compile", "--quantize", "none"])
        model: gpt3-175b: 96 layers, d_model 12288, 96 heads, 96 KV heads, d_ff 32768, vocab 50257
        training: batch 1 x 512 tokens, Adam, float32; LoRA rank 4 on q_proj,v_proj
                            full fine-tuning         LoRA
        parameters           175,183,663,104  175,202,537,472
        trainable            175,183,663,104       18,874,368
        trainable %                     100%        0.01077%
        weights (total)             700.7 GB         700.7 GB
        checkpoint float32          700.7 GB          75.5 MB
        checkpoint 16-bit           350.4 GB          37.7 MB
        checkpoint reduction              1x           9,282x
        memory: not compiled (counts only)
        0
    """
    # XLA reads its flags once, when this process first computes (below, if not before);
    # the environment is restored afterwards so that child processes do not inherit them.
    flags = os.environ.get("XLA_FLAGS")
    _memory.use_memory_minimizing_cpu_scheduler()
    try:
        return _run(args)
    finally:
        if flags is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = flags


def _run(args: argparse.Namespace) -> int:
    try:
        name, cfg = _model_config(args)
    except (ValueError, OSError) as e:
        print(f"jaxlora plan: error: {e}", file=sys.stderr)
        return 2
    from jaxlora.models.llama import Llama, causal_lm_loss

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    cfg = dataclasses.replace(
        cfg,
        scan_layers=True,
        remat=bool(args.remat),
        max_len=max(cfg.max_len, args.seq),
        dtype=dtype,
        param_dtype=dtype,
    )
    targets = [t for t in args.targets.split(",") if t]
    quantize = None if args.quantize.lower() == "none" else args.quantize
    try:
        config = LoraConfig(
            rank=args.rank,
            targets=targets[0] if len(targets) == 1 else targets,
            stacked_axes={r"^layers/": 1},
        )
        model = Llama(cfg)
        tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
        params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]

        def loss(p: Any, t: jax.Array) -> jax.Array:
            logits: jax.Array = model.apply({"params": p}, t)  # type: ignore[assignment]
            return causal_lm_loss(logits, t)

        result = plan(
            loss,
            params,
            config,
            batch=tokens,
            optimizer=optax.adam(1e-4),
            quantize=quantize,
            device_memory=args.device_memory,
            skip_compile=bool(args.skip_compile),
        )
    except (ValueError, TypeError) as e:
        print(f"jaxlora plan: error: {e}", file=sys.stderr)
        return 2
    print(
        f"model: {name}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
        f"{cfg.n_kv_heads} KV heads, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}"
    )
    print(
        f"training: batch {args.batch} x {args.seq} tokens, Adam, {args.dtype}; "
        f"LoRA rank {args.rank} on {','.join(targets)}"
    )
    print(result)
    return 0


def _model_config(args: argparse.Namespace) -> tuple[str, Any]:
    from jaxlora.models.llama import LlamaConfig

    flags = {
        "d_model": "--d-model",
        "n_layers": "--layers",
        "n_heads": "--heads",
        "n_kv_heads": "--kv-heads",
        "d_ff": "--d-ff",
        "vocab_size": "--vocab",
    }
    values = {k: getattr(args, flag[2:].replace("-", "_")) for k, flag in flags.items()}
    given = {k: v for k, v in values.items() if v is not None}
    if args.model is None:
        missing = [f for k, f in flags.items() if k != "n_kv_heads" and k not in given]
        if missing:
            raise ValueError(
                f"no model given: pass a preset ({', '.join(PRESETS)}), a config.json path, or "
                f"all sizes (missing {' '.join(missing)})"
            )
        if "n_kv_heads" not in given:
            given["n_kv_heads"] = given["n_heads"]
        return "custom", LlamaConfig(**given)
    if args.model in PRESETS:
        base = _preset(args.model)()
    elif os.path.exists(args.model):
        base = llama_config_from_hf(args.model)
    else:
        raise ValueError(
            f"{args.model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
            "config.json path"
        )
    if "n_heads" in given and "n_kv_heads" not in given and base.n_kv_heads == base.n_heads:
        given["n_kv_heads"] = given["n_heads"]
    return args.model, dataclasses.replace(base, **given)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _bytes_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
