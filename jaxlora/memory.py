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

MEMORY_MINIMIZING_CPU_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def use_memory_minimizing_cpu_scheduler() -> None:
    """Adds :data:`MEMORY_MINIMIZING_CPU_FLAG` to ``XLA_FLAGS``.

    XLA reads the flags when the backend starts, so call this before the
    first computation; it has no effect afterwards and none on GPU or TPU.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if MEMORY_MINIMIZING_CPU_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {MEMORY_MINIMIZING_CPU_FLAG}".strip()


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """XLA's memory plan of one compiled function, in bytes.

    ``peak = argument + output - alias + temp``: inputs and outputs live
    together except where a donated input's buffer is reused for an output.
    """

    argument: int
    output: int
    alias: int
    temp: int

    @property
    def peak(self) -> int:
        return self.argument + self.output - self.alias + self.temp


def memory_of(
    fn: Callable[..., Any], *args: Any, donate_argnums: tuple[int, ...] = ()
) -> MemoryReport:
    """Compiles ``jax.jit(fn, donate_argnums)`` for ``args`` (arrays or ShapeDtypeStructs).

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
    """``step(params, opt_state, batch)``: full fine-tuning (donate arguments 0 and 1)."""

    def step(params: Any, opt_state: Any, batch: Any) -> tuple[Any, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def lora_optimizer(
    optimizer: optax.GradientTransformation, delta: Any
) -> optax.GradientTransformation:
    """``optimizer`` on the trainable adapter leaves only; frozen leaves get no state."""
    labels = jax.tree.map(lambda m: "train" if m else "freeze", trainable_mask(delta))
    return optax.transforms.partition({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def lora_step(
    loss: Loss, optimizer: optax.GradientTransformation, *, strategy: str = "use-site"
) -> Callable[..., Any]:
    """``step(delta, opt_state, base, batch)``: LoRA training (donate arguments 0 and 1).

    ``optimizer`` should already skip frozen leaves (see :func:`lora_optimizer`).
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
    """

    def step(params: Any, embeds: jax.Array, batch: Any) -> tuple[jax.Array, jax.Array]:
        value, grad = jax.value_and_grad(lambda e: embed_loss(params, e, batch))(embeds)
        return grad, value

    return step


def abstract(tree: Any) -> Any:
    """``tree`` with every array replaced by its ``jax.ShapeDtypeStruct``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)
