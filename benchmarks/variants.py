"""The LoRA family side by side on one small fine-tuning task.

Model: the Llama-style reference decoder, tiny (d_model 64, 2 layers, 4 heads,
d_ff 128), vocab 128, float32. Task: sequences that follow a fixed random
permutation of the tokens (``t[i+1] = π(t[i])``). The base model is first
trained on ``π_A`` (full fine-tuning); every adapter is then trained on
``π_B``, which sends half of the tokens elsewhere, so the base starts near
50% next-token accuracy on it and an adapter must learn the changed
transitions.

Every variant adapts the attention projections (q, k, v, o) for the same
number of Adam steps through the use-site engine, at each of a few learning
rates; the one with the best validation accuracy is reported on the test set
(adapters differ in their best learning rate, so one shared rate would rank
the rates, not the variants):

* LoRA r = 4; rsLoRA r = 4 (scale alpha/sqrt(r)); DoRA r = 4;
* LoRA+ r = 4 (b at 16× a's rate; a's rates a quarter of LoRA's);
* VeRA r = 256 (the paper's setting: far fewer trainable numbers; rates 10×
  LoRA's, as in the paper);
* AdaLoRA from 1.5 r to an average of r ranks (the cubic schedule over the run);
* layer-wise ranks: ``allocate_ranks`` with LoRA r = 4's parameter budget, from
  the gradients on 4 calibration batches of the task.

The table reports trainable parameters, the final held-out next-token accuracy
and loss, and each variant's train-step time relative to LoRA's (medians,
timed in interleaved rounds after training so that machine noise hits all
alike). The model is tiny, so the adapter branch is a large share of a step:
VeRA's rank-256 products cost several base matmuls here, a few percent at
d_model 4096.

``--quick``: the model with 1 layer, 10 pretraining steps, 6 fine-tuning steps
per run (AdaLoRA's schedule scaled to them), one learning rate, 2 timing rounds.

Run: ``python -m benchmarks.variants [--steps 200] [--rank 4] [--lrs 3e-3,1e-2,3e-2] [--quick]``
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as ``python benchmarks/variants.py``: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora
from benchmarks._common import interleaved, lm_loss, parse_args
from jaxlora.apps.progress import progress
from jaxlora.models.llama import Llama, LlamaConfig, causal_lm_loss
from jaxlora.variants import (
    AdaLoraConfig,
    VeraConfig,
    adalora,
    allocate_ranks,
    loraplus,
    orthogonality_loss,
)

VOCAB, SEQ, BATCH = 128, 32, 32
CHANGED = VOCAB // 2
TARGETS = "attention"


def sequences(perm: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` sequences that start anywhere and follow ``perm``."""
    out = np.empty((n, SEQ), np.int32)
    out[:, 0] = rng.integers(0, VOCAB, n)
    for i in range(1, SEQ):
        out[:, i] = perm[out[:, i - 1]]
    return out


def accuracy(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:])


@dataclasses.dataclass
class Result:
    name: str
    trainable: int
    lr: float
    accuracy: float
    loss: float
    step: Callable[[], Any]
    seconds: float = float("nan")


def pretrain(model: Llama, perm: np.ndarray, steps: int, seed: int) -> Any:
    """The base model: full fine-tuning on ``perm``."""
    rng = np.random.default_rng(seed)
    params = model.init(jax.random.key(seed), jnp.zeros((1, SEQ), jnp.int32))["params"]
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, state, tokens):
        loss = lambda p: causal_lm_loss(model.apply({"params": p}, tokens), tokens)
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    with progress(steps, "pretrain") as bar:
        for _ in range(steps):
            params, state = step(params, state, sequences(perm, rng, BATCH))
            bar.update()
    return params


def finetune(
    name: str,
    model: Llama,
    params: Any,
    config: Any,
    make_tx: Callable[[Any, Any], optax.GradientTransformation],
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    lrs: list[float],
    orth_weight: float = 0.0,
    seed: int = 0,
) -> Result:
    """Trains one adapter per learning rate; keeps the best on validation, reports test.

    ``make_tx(delta, lr)`` is called inside the jitted step with ``lr`` traced, so
    every learning rate runs the same compiled program.
    """
    train, val, test = data
    base, delta0 = jaxlora.split(params, config, key=jax.random.key(seed))
    apply = jaxlora.lora_apply(lambda p, t: model.apply({"params": p}, t))

    def loss_fn(delta, tokens):
        loss = causal_lm_loss(apply(base, delta, tokens), tokens)
        if orth_weight:
            loss = loss + orth_weight * orthogonality_loss(delta)
        return loss

    @jax.jit
    def step(delta, state, tokens, lr):
        grads = jax.grad(loss_fn)(delta, tokens)
        updates, state = make_tx(delta, lr).update(grads, state, delta)
        return optax.apply_updates(delta, updates), state

    @jax.jit
    def evaluate(delta, tokens):
        logits = apply(base, delta, tokens)
        return jnp.stack([causal_lm_loss(logits, tokens), accuracy(logits, tokens)])

    best = None
    with progress(len(lrs) * len(train), name) as bar:
        for lr in lrs:
            delta, state = delta0, make_tx(delta0, lr).init(delta0)
            rate = jnp.float32(lr)
            for i in range(len(train)):
                delta, state = step(delta, state, train[i], rate)
                bar.update()
            val_metrics = np.mean([np.asarray(evaluate(delta, t)) for t in val], axis=0)
            if best is None or val_metrics[1] > best[0]:
                best = (val_metrics[1], lr, delta, state)
    _, lr, delta, state = best
    loss, acc = np.mean([np.asarray(evaluate(delta, t)) for t in test], axis=0)
    trainable = jaxlora.count_parameters(base, delta).trainable
    final = (delta, state, train[0], jnp.float32(lr))
    return Result(name, trainable, lr, float(acc), float(loss), lambda: step(*final))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per run")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=20, help="timing rounds")
    parser.add_argument(
        "--lrs", default="3e-3,1e-2,3e-2", help="learning rates tried per variant (VeRA: 10x)"
    )
    args = parse_args(parser, steps=6, pretrain_steps=10, rounds=2, lrs="1e-2")
    lrs = [float(x) for x in args.lrs.split(",")]
    started = time.perf_counter()

    rng = np.random.default_rng(0)
    perm_a = rng.permutation(VOCAB)
    perm_b = perm_a.copy()
    moved = rng.choice(VOCAB, CHANGED, replace=False)
    perm_b[moved] = perm_a[np.roll(moved, 1)]  # half of the tokens go elsewhere
    model = Llama(LlamaConfig.tiny(vocab_size=VOCAB, max_len=SEQ, n_layers=1 if args.quick else 2))
    params = pretrain(model, perm_a, args.pretrain_steps, seed=0)
    split_data = lambda n: sequences(perm_b, rng, BATCH * n).reshape(n, BATCH, SEQ)
    data = (split_data(args.steps), split_data(4), split_data(8))  # train, validation, test

    apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    test = data[2]
    base_acc = float(np.mean([accuracy(apply(params, t), t) for t in test]))
    base_loss = float(np.mean([causal_lm_loss(apply(params, t), t) for t in test]))
    n_params = sum(x.size for x in jax.tree.leaves(params))

    r = args.rank
    adam = lambda delta, lr: optax.adam(lr)  # a delta holds only what trains
    lora = jaxlora.LoraConfig(rank=r, targets=TARGETS)
    budget = jaxlora.count_parameters(*jaxlora.split(params, lora, key=jax.random.key(0)))
    calibration = [jnp.asarray(b) for b in data[0][:4]]
    t0 = time.perf_counter()
    pattern = allocate_ranks(lm_loss(model), params, calibration, lora, budget=budget.trainable)
    allocate_seconds = time.perf_counter() - t0
    ada = AdaLoraConfig(
        init_rank=(3 * r + 1) // 2,
        target_rank=r,
        tinit=args.steps // 10,
        tfinal=args.steps // 5,
        delta_t=max(1, args.steps // 30),
        total_step=args.steps,
        targets=TARGETS,
    )
    runs = [
        (f"LoRA r={r}", lora, adam, lrs, 0.0),
        (f"rsLoRA r={r}", dataclasses.replace(lora, rslora=True), adam, lrs, 0.0),
        (f"DoRA r={r}", dataclasses.replace(lora, use_dora=True), adam, lrs, 0.0),
        (
            f"LoRA+ r={r} (b 16x)",
            lora,
            lambda d, lr: loraplus(optax.adam, lr, ratio=16),
            [lr / 4 for lr in lrs],
            0.0,
        ),
        ("VeRA r=256", VeraConfig(rank=256, targets=TARGETS), adam, [10 * lr for lr in lrs], 0.0),
        (
            f"AdaLoRA {ada.init_rank}->{r}",
            ada,
            lambda d, lr: adalora(ada, adam(d, lr)),
            lrs,
            ada.orth_reg_weight,
        ),
        ("layer-wise ranks", dataclasses.replace(lora, rank_pattern=pattern), adam, lrs, 0.0),
    ]
    results = []
    for name, config, make_tx, rates, orth in runs:
        t0 = time.perf_counter()
        result = finetune(name, model, params, config, make_tx, data, lrs=rates, orth_weight=orth)
        results.append(result)
        print(f"  {name}: {len(rates)} learning rates in {time.perf_counter() - t0:.1f} s")
    times = interleaved({r.name: r.step for r in results}, args.rounds, desc="step times")
    for res in results:
        res.seconds = times[res.name]

    ranks = sorted(pattern.values())
    print(
        f"\nTiny Llama ({n_params:,} params), vocab {VOCAB}, batch {BATCH} x {SEQ}; "
        f"{args.steps} Adam steps per run; targets {TARGETS!r}; best of lr in {lrs} on "
        "validation (LoRA+: a quarter of those for a, 16x for b; VeRA: 10x)."
    )
    print(
        f"Layer-wise ranks from {len(calibration)} calibration batches in "
        f"{allocate_seconds:.1f} s: min {ranks[0]}, median {ranks[len(ranks) // 2]}, "
        f"max {ranks[-1]} over {len(ranks)} weights, {budget.trainable:,}-parameter budget.\n"
    )
    header = (
        f"{'variant':20} {'trainable':>10} {'% model':>8} {'lr':>7} {'accuracy':>9} "
        f"{'loss':>7} {'step/LoRA':>10}"
    )
    print(header)
    print("-" * len(header))
    print(f"{'base (no adapter)':20} {0:>10,} {0:>8.2f} {'':>7} {base_acc:>9.3f} {base_loss:>7.3f}")
    lora_seconds = results[0].seconds
    for res in results:
        print(
            f"{res.name:20} {res.trainable:>10,} {100 * res.trainable / n_params:>8.2f} "
            f"{res.lr:>7.0e} {res.accuracy:>9.3f} {res.loss:>7.3f} "
            f"{res.seconds / lora_seconds:>10.2f}"
        )
    print(f"\nLoRA step: {lora_seconds * 1e3:.1f} ms. Total {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
