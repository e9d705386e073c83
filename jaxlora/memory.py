"""Training-step builders and XLA's compiled memory plan, for the planner and benchmarks.

Every step here is a pure function meant for ``jax.jit(..., donate_argnums=...)``
and abstract inputs (``jax.ShapeDtypeStruct``), so that a model far too large
to allocate can still be measured: ``memory_of`` lowers and compiles the step
and reads XLA's plan.

On the CPU backend, XLA's default scheduler is tuned for concurrency: it starts
independent work early (for example every weight's dequantization or cast at
the top of the step), which keeps many buffers alive at once. GPU and TPU
schedulers minimize memory instead. To read GPU-like plans on a CPU, call
:func:`use_memory_minimizing_cpu_scheduler` before JAX runs anything (the
benchmarks, the planner CLI and the test suite do).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlora._apply import lora_apply
from jaxlora._counts import trainable_mask

__all__ = [
    "MEMORY_MINIMIZING_CPU_FLAG",
    "Loss",
    "MemoryReport",
    "abstract",
    "floor_step",
    "full_step",
    "lora_optimizer",
    "lora_step",
    "memory_of",
    "use_memory_minimizing_cpu_scheduler",
]

MEMORY_MINIMIZING_CPU_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def use_memory_minimizing_cpu_scheduler() -> None:
    """Adds :data:`MEMORY_MINIMIZING_CPU_FLAG` to ``XLA_FLAGS``.

    XLA reads the flags when the backend starts, so call this before the
    first computation; it has no effect afterwards and none on GPU or TPU.

    Example:
        >>> import os
        >>> from jaxlora.memory import MEMORY_MINIMIZING_CPU_FLAG
        >>> from jaxlora.memory import use_memory_minimizing_cpu_scheduler
        >>> use_memory_minimizing_cpu_scheduler()
        >>> MEMORY_MINIMIZING_CPU_FLAG in os.environ["XLA_FLAGS"]
        True
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if MEMORY_MINIMIZING_CPU_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {MEMORY_MINIMIZING_CPU_FLAG}".strip()


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """XLA's memory plan of one compiled function, in bytes.

    ``peak = argument + output - alias + temp``: inputs and outputs live
    together except where a donated input's buffer is reused for an output.

    Attributes:
        argument: bytes of the inputs.
        output: bytes of the outputs.
        alias: bytes of outputs that reuse a donated input's buffer.
        temp: bytes of temporaries at XLA's peak.

    Example:
        >>> from jaxlora.memory import MemoryReport
        >>> MemoryReport(argument=100, output=100, alias=60, temp=30).peak
        170
    """

    argument: int
    output: int
    alias: int
    temp: int

    @property
    def peak(self) -> int:
        """``argument + output - alias + temp``."""
        return self.argument + self.output - self.alias + self.temp


def memory_of(
    fn: Callable[..., Any], *args: Any, donate_argnums: tuple[int, ...] = ()
) -> MemoryReport:
    """Compiles ``jax.jit(fn, donate_argnums)`` for ``args`` (arrays or ShapeDtypeStructs).

    Nothing runs and nothing is allocated: the function is lowered for the
    arguments' shapes and XLA's compiled memory plan is read. Every argument
    counts, used or not (``keep_unused=True``).

    Args:
        fn: the function to plan.
        *args: its arguments, concrete or ``jax.ShapeDtypeStruct`` (with shardings
            for a per-device plan).
        donate_argnums: arguments whose buffers the outputs may reuse, as in
            ``jax.jit``.

    Returns:
        A :class:`MemoryReport` (per device when the arguments are sharded).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxlora.memory import memory_of
        >>> x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
        >>> memory_of(lambda x: x @ x, x).argument
        4194304
    """
    # keep_unused: every input counts, as it sits in device memory whether the step reads it
    # or not (the floor step, fed input embeddings, never reads the embedding table)
    jitted = jax.jit(fn, donate_argnums=donate_argnums, keep_unused=True)
    compiled = jitted.lower(*args).compile()
    m = compiled.memory_analysis()
    return MemoryReport(
        argument=int(m.argument_size_in_bytes),
        output=int(m.output_size_in_bytes),
        alias=int(m.alias_size_in_bytes),
        temp=int(m.temp_size_in_bytes),
    )


Loss = Callable[[Any, Any], jax.Array]  # (params, batch) -> scalar


def full_step(loss: Loss, optimizer: optax.GradientTransformation) -> Callable[..., Any]:
    """``step(params, opt_state, batch) -> (params, opt_state, loss)``: full fine-tuning.

    Donate arguments 0 and 1 (``jax.jit(step, donate_argnums=(0, 1))``).

    Args:
        loss: ``(params, batch) -> scalar``.
        optimizer: any optax optimizer.

    Returns:
        The step function.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from jaxlora.memory import full_step
        >>> step = full_step(lambda p, b: jnp.sum((b @ p["w"]) ** 2), optax.sgd(0.1))
        >>> params = {"w": jnp.ones((3, 2))}
        >>> params, _, loss = step(params, optax.sgd(0.1).init(params), jnp.ones((4, 3)))
        >>> float(loss)
        72.0
    """

    def step(params: Any, opt_state: Any, batch: Any) -> tuple[Any, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def lora_optimizer(
    optimizer: optax.GradientTransformation, delta: Any
) -> optax.GradientTransformation:
    """``optimizer`` on the adapter leaves of a tree only; other leaves get no state.

    A delta needs no such wrapper (every leaf of a delta trains); this is for trees
    that hold adapters next to other arrays, such as ``{"bert": delta, "head": None}``.

    Args:
        optimizer: any optax optimizer.
        delta: the tree (or one of its structure) the optimizer will update.

    Returns:
        ``optax.transforms.partition`` of ``optimizer`` and ``set_to_zero``.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxlora
        >>> from jaxlora.memory import lora_optimizer
        >>> base, delta = jaxlora.split({"w": jnp.ones((4, 3))},
        ...                             jaxlora.LoraConfig(rank=1, targets="w"),
        ...                             key=jax.random.key(0))
        >>> tx = lora_optimizer(optax.adam(1e-3), {"delta": delta, "bias": jnp.zeros(3)})
        >>> state = tx.init({"delta": delta, "bias": jnp.zeros(3)})
        >>> sum(x.size for x in jax.tree.leaves(state) if x.ndim)  # adam's 2 moments of a, b
        14
    """
    labels = jax.tree.map(lambda m: "train" if m else "freeze", trainable_mask(delta))
    return optax.transforms.partition({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def lora_step(
    loss: Loss, optimizer: optax.GradientTransformation, *, strategy: str = "use-site"
) -> Callable[..., Any]:
    """``step(delta, opt_state, base, batch) -> (delta, opt_state, loss)``: LoRA training.

    ``loss(params, batch)`` runs through :func:`jaxlora.lora_apply`; donate
    arguments 0 and 1.

    Args:
        loss: ``(params, batch) -> scalar`` on the full parameters.
        optimizer: the optimizer of the delta (any optax optimizer; see
            :func:`lora_optimizer` for trees that mix adapters and other arrays).
        strategy: ``"use-site"`` or ``"merge"``, as in :func:`jaxlora.lora_apply`.

    Returns:
        The step function.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxlora
        >>> from jaxlora.memory import lora_step
        >>> base, delta = jaxlora.split({"w": jnp.ones((3, 2))},
        ...                             jaxlora.LoraConfig(rank=1, targets="w"),
        ...                             key=jax.random.key(0))
        >>> tx = optax.sgd(0.1)
        >>> step = lora_step(lambda p, b: jnp.sum((b @ p["w"]) ** 2), tx)
        >>> delta, _, loss = step(delta, tx.init(delta), base, jnp.ones((4, 3)))
        >>> float(loss)
        72.0
    """
    apply_loss = lora_apply(loss, strategy=strategy)

    def step(delta: Any, opt_state: Any, base: Any, batch: Any) -> tuple[Any, Any, jax.Array]:
        value, grads = jax.value_and_grad(lambda d: apply_loss(base, d, batch))(delta)
        updates, opt_state = optimizer.update(grads, opt_state, delta)
        return optax.apply_updates(delta, updates), opt_state, value

    return step


def floor_step(embed_loss: Callable[[Any, jax.Array, Any], jax.Array]) -> Callable[..., Any]:
    """``step(params, embeds, batch)``: the gradient w.r.t. the input embeddings only.

    No weight trains, so this is the least memory any adapter method can need
    for the same model and batch: the frozen weights, the activations the
    backward pass keeps, and one gradient of activation size.

    Args:
        embed_loss: ``(params, embeds, batch) -> scalar``, the model run from its
            input embeddings.

    Returns:
        ``step(params, embeds, batch) -> (grad of embeds, loss)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxlora.memory import floor_step
        >>> step = floor_step(lambda p, e, b: jnp.sum(e @ p["w"]))
        >>> grad, loss = step({"w": jnp.ones((3, 2))}, jnp.ones((4, 3)), None)
        >>> grad.shape, float(loss)
        ((4, 3), 24.0)
    """

    def step(params: Any, embeds: jax.Array, batch: Any) -> tuple[jax.Array, jax.Array]:
        value, grad = jax.value_and_grad(lambda e: embed_loss(params, e, batch))(embeds)
        return grad, value

    return step


def abstract(tree: Any) -> Any:
    """``tree`` with every array replaced by its ``jax.ShapeDtypeStruct``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxlora.memory import abstract
        >>> abstract({"w": jnp.ones((2, 3))})["w"]
        ShapeDtypeStruct(shape=(2, 3), dtype=float32)
    """
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)
