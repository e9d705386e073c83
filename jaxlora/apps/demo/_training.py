"""The demo's training and evaluation loops: AdamW with warmup, bucketed batches, a probe."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlora.apps.demo._batches import Encoded, make_batches
from jaxlora.apps.progress import progress

__all__ = ["adamw", "fit", "fit_probe", "make_step", "predict", "steps_per_epoch"]

EVAL_BATCH = 128
_PROBE_STEPS, _PROBE_LR = 500, 0.02
_WARMUP_FRACTION = 0.1


def schedule(lr: float, steps: int) -> optax.Schedule:
    """Linear warmup over the first 10% of steps, then cosine decay to zero."""
    warmup = max(1, round(_WARMUP_FRACTION * steps))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), 0.0)


def adamw(lr: float, steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule(lr, steps), weight_decay=0.01)
    )


def make_step(
    logits_fn: Callable[..., jax.Array], optimizer: optax.GradientTransformation
) -> Callable[..., Any]:
    """A jitted ``step(trainable, opt_state, frozen, ids, mask, labels, valid, key)``."""

    def loss(trainable: Any, frozen: Any, ids: Any, mask: Any, labels: Any, valid: Any, key: Any):
        logits = logits_fn(trainable, frozen, ids, mask, key)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        weights = valid.astype(ce.dtype)
        return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    def step(trainable: Any, opt_state: Any, frozen: Any, *batch: Any) -> tuple[Any, Any, Any]:
        value, grads = jax.value_and_grad(loss)(trainable, frozen, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1))


def steps_per_epoch(data: Encoded, batch_size: int, buckets: Sequence[int]) -> int:
    which = np.searchsorted(np.asarray(buckets), data.lengths, side="left")
    return sum(math.ceil(np.sum(which == b) / batch_size) for b in range(len(buckets)))


def fit(
    step: Callable[..., Any],
    trainable: Any,
    optimizer: optax.GradientTransformation,
    frozen: Any,
    data: Encoded,
    *,
    steps: int,
    batch_size: int,
    buckets: Sequence[int],
    seed: int,
    desc: str,
) -> Any:
    trainable = jax.tree.map(jnp.array, trainable)  # a copy: the step donates its input
    opt_state = optimizer.init(trainable)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    done, smooth = 0, None
    with progress(steps, desc) as bar:
        while done < steps:
            for batch in make_batches(data, batch_size, buckets, rng=rng):
                if done == steps:
                    break
                trainable, opt_state, loss = step(
                    trainable,
                    opt_state,
                    frozen,
                    batch.ids,
                    batch.mask,
                    batch.labels,
                    batch.valid,
                    jax.random.fold_in(key, done),
                )
                done += 1
                smooth = float(loss) if smooth is None else 0.9 * smooth + 0.1 * float(loss)
                bar.set_postfix(loss=f"{smooth:.3f}", refresh=False)
                bar.update()
    return trainable


def predict(
    logits_fn: Callable[..., jax.Array],
    data: Encoded,
    buckets: Sequence[int],
    desc: str,
    *,
    batch_size: int = EVAL_BATCH,
) -> np.ndarray:
    """Runs ``logits_fn(ids, mask)`` over ``data`` in bucketed batches; rows in data order."""
    batches = make_batches(data, batch_size, buckets)
    which = np.searchsorted(np.asarray(buckets), data.lengths, side="left")
    order = np.concatenate([np.flatnonzero(which == b) for b in range(len(buckets))])
    outputs = []
    with progress(len(batches), desc) as bar:
        for batch in batches:
            outputs.append(np.asarray(logits_fn(batch.ids, batch.mask))[batch.valid])
            bar.update()
    result = np.empty((len(data), *outputs[0].shape[1:]), outputs[0].dtype)
    result[order] = np.concatenate(outputs)
    return result


def fit_probe(features: np.ndarray, labels: np.ndarray, *, seed: int) -> dict[str, jax.Array]:
    """Logistic regression on frozen features, returned as a ``nn.Dense(2)`` head.

    Trained full-batch with Adam on centered features scaled by one overall standard
    deviation, then the centering and scale are folded into the head's kernel and bias.
    Adam's per-coordinate step sizes make per-feature standardization unnecessary, and
    avoiding it keeps the head's weights small: MiniLM's pooled features have a nearly
    constant coordinate, which standardization would blow up by orders of magnitude, and
    later fine-tuning would then move the logits wildly.
    """
    x = jnp.asarray(features)
    mean = x.mean(axis=0)
    std = jnp.sqrt(jnp.mean((x - mean) ** 2))
    z = (x - mean) / std
    y = jnp.asarray(labels)
    init = jax.random.normal(jax.random.key(seed), (x.shape[1], 2)) * 0.01
    head = {"kernel": init, "bias": jnp.zeros(2)}
    tx = optax.adamw(_PROBE_LR, weight_decay=0.01)

    def loss(h: Any) -> jax.Array:
        logits = z @ h["kernel"] + h["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def body(_: Any, carry: Any) -> Any:
        h, state = carry
        updates, state = tx.update(jax.grad(loss)(h), state, h)
        return optax.apply_updates(h, updates), state

    head, _ = jax.jit(lambda h: jax.lax.fori_loop(0, _PROBE_STEPS, body, (h, tx.init(h))))(head)
    kernel = head["kernel"] / std
    return {"kernel": kernel, "bias": head["bias"] - mean @ kernel}
