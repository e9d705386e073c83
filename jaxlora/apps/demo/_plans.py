"""What one training step of the demo costs, full fine-tuning and LoRA: XLA's memory plan of
the AdamW step and its measured time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxlora.memory

__all__ = ["memory_plan", "step_times"]


def _steps(classify: Callable[..., jax.Array]) -> tuple[Callable, Callable, Any]:
    """``(full step, LoRA step factory, optimizer)``: the library's steps on the demo."""

    def loss(params: Any, batch: Any) -> jax.Array:
        ids, mask, labels = batch
        logits = classify(params["bert"], params["classifier"], ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    tx = optax.adamw(1e-3)
    full = jaxlora.memory.full_step(loss, tx)
    lora = lambda lora_tx: jaxlora.memory.lora_step(loss, lora_tx)
    return full, lora, tx


def _lora_tree(delta: Any, head: Any) -> Any:
    return {"bert": delta, "classifier": jax.tree.map(lambda _: None, head)}


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
    full_step, lora_step, tx = _steps(classify)
    params = jaxlora.memory.abstract({"bert": encoder, "classifier": head})
    full = jaxlora.memory.memory_of(
        full_step,
        params,
        jax.eval_shape(tx.init, params),
        batch,
        donate_argnums=(0, 1),
    )
    full_delta = _lora_tree(delta, head)
    lora_tx = jaxlora.memory.lora_optimizer(tx, full_delta)
    lora = jaxlora.memory.memory_of(
        lora_step(lora_tx),
        jaxlora.memory.abstract(full_delta),
        jax.eval_shape(lora_tx.init, full_delta),
        jaxlora.memory.abstract({"bert": base, "classifier": head}),
        batch,
        donate_argnums=(0, 1),
    )
    return {"full fine-tuning": full, "LoRA": lora}


def step_times(
    classify: Callable[..., jax.Array],
    base: Any,
    delta: Any,
    encoder: Any,
    head: Any,
    s: dict[str, Any],
    *,
    rounds: int,
) -> dict[str, float]:
    """Median seconds of one AdamW step, full fine-tuning and LoRA, timed side by side.

    The steps of :func:`memory_plan`, compiled and run on one random batch of the
    longest training shape; each is called once first (compilation), then both
    once per round, so that a shared machine's noise hits them alike.
    """
    shape = (s["batch_size"], s["max_length"])
    ids = jax.random.randint(jax.random.key(0), shape, 0, 1000)
    batch = (ids, jnp.ones(shape, jnp.int32), jnp.zeros(shape[:1], jnp.int32))
    full_step, lora_step, tx = _steps(classify)
    copy = lambda tree: jax.tree.map(jnp.array, tree)
    full_state = [copy({"bert": encoder, "classifier": head})]
    full_state.append(tx.init(full_state[0]))
    lora_delta = _lora_tree(delta, head)
    lora_tx = jaxlora.memory.lora_optimizer(tx, lora_delta)
    lora_state = [copy(lora_delta), lora_tx.init(lora_delta)]
    frozen = {"bert": base, "classifier": head}
    full = jax.jit(full_step, donate_argnums=(0, 1))
    lora = jax.jit(lora_step(lora_tx), donate_argnums=(0, 1))

    def run_full() -> None:
        *full_state[:2], loss = full(*full_state, batch)
        loss.block_until_ready()

    def run_lora() -> None:
        *lora_state[:2], loss = lora(*lora_state, frozen, batch)
        loss.block_until_ready()

    times: dict[str, list[float]] = {"full fine-tuning": [], "LoRA": []}
    runs = {"full fine-tuning": run_full, "LoRA": run_lora}
    for run in runs.values():
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
