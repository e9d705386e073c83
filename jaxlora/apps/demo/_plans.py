"""The demo's planned training memory: XLA's plan of one AdamW step, full and LoRA."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxlora.memory

__all__ = ["memory_plan"]


def memory_plan(
    classify: Callable[..., jax.Array],
    base: Any,
    delta: Any,
    encoder: Any,
    head: Any,
    s: dict[str, Any],
) -> dict[str, jaxlora.memory.MemoryReport]:
    """XLA's memory plan of one AdamW step, full fine-tuning and LoRA, on abstract inputs.

    The planned steps are the library's ``full_step`` / ``lora_step``: in the LoRA one the
    2-class head is frozen (770 parameters, a few KB of optimizer state less than the demo's
    step, which trains it).
    """
    batch = (
        jax.ShapeDtypeStruct((s["batch_size"], s["max_length"]), jnp.int32),
        jax.ShapeDtypeStruct((s["batch_size"], s["max_length"]), jnp.int32),
        jax.ShapeDtypeStruct((s["batch_size"],), jnp.int32),
    )

    def loss(params: Any, batch: Any) -> jax.Array:
        ids, mask, labels = batch
        logits = classify(params["bert"], params["classifier"], ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    tx = optax.adamw(1e-3)
    params = jaxlora.memory.abstract({"bert": encoder, "classifier": head})
    full = jaxlora.memory.memory_of(
        jaxlora.memory.full_step(loss, tx),
        params,
        jax.eval_shape(tx.init, params),
        batch,
        donate_argnums=(0, 1),
    )
    full_delta = {"bert": delta, "classifier": jax.tree.map(lambda _: None, head)}
    lora_tx = jaxlora.memory.lora_optimizer(tx, full_delta)
    lora = jaxlora.memory.memory_of(
        jaxlora.memory.lora_step(loss, lora_tx),
        jaxlora.memory.abstract(full_delta),
        jax.eval_shape(lora_tx.init, full_delta),
        jaxlora.memory.abstract({"bert": base, "classifier": head}),
        batch,
        donate_argnums=(0, 1),
    )
    return {"full fine-tuning": full, "LoRA": lora}
