"""Many adapters: serving a batch routed to 1-256 adapters, the routing crossover, training many.

Model: the Llama-style reference decoder (d_model 512, 4 layers stacked with
``nn.scan``, 8 heads, d_ff 1408), LoRA r = 8 on all linear layers, float32.

1. Serving throughput, at a prefill shape (256 sequences x 16 tokens, a
   forward pass) and at the decode shape (256 sequences, one new token each,
   KV cache of 64 slots): a pool of 256 adapters with the batch routed to 1,
   8, 64 or 256 distinct adapters (``routing="auto"``), against the same
   batch on 1 adapter of the pool, on one plain adapter (no routing) and on
   the merged model. Medians of interleaved rounds.
2. The routing crossover: ``routing="gather"`` vs ``"grouped"`` as the number
   of distinct adapters grows (a pool of that many), at both shapes.
3. Memory (XLA's plans of the decode step): the pool's bytes, and the step's
   temporaries per routing.
4. Multi-tenant training: one step that trains N = 1, 8, 32 adapters on a
   batch of 32 sequences x 64 tokens (``jaxlora.multi.per_adapter``) vs N
   separate steps, each on its adapter's own sequences.
5. Filling a pool slot (``jaxlora.multi.put``) vs a call that recompiles.

``--quick``: ``LlamaConfig.tiny`` (d_model 64, 2 layers), small batches, 2 rounds.

Run: ``python -m benchmarks.multi [--rounds 10] [--quick]``
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as ``python benchmarks/multi.py``: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxlora
import jaxlora.memory
from benchmarks._common import interleaved, parse_args, small_llama
from jaxlora.apps.progress import progress
from jaxlora.models.llama import KVCache, Llama


def _adapters(params: Any, n: int, rank: int) -> tuple[Any, list[Any]]:
    config = jaxlora.LoraConfig(rank=rank, targets="all-linear", stacked_axes=1)
    base, delta = jaxlora.split(params, config, key=jax.random.key(0))
    # distinct, non-zero adapters (b = 0 would hide the work): a small offset per adapter
    deltas = [jax.tree.map(lambda x, i=i: x + 0.001 * (i + 1), delta) for i in range(n)]
    return base, deltas


class _Shapes:
    """The serving functions at one shape: prefill (a forward) or decode (one token, a cache)."""

    def __init__(self, model: Llama, batch: int, seq: int, decode: bool) -> None:
        cfg = model.config
        self.tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
        kw: dict[str, Any] = {}
        if decode:
            cache = KVCache.empty(cfg, batch=batch, slots=cfg.max_len)
            kw = dict(
                cache=dataclasses.replace(cache, index=jnp.asarray(cfg.max_len - 16, jnp.int32)),
                positions=jnp.full((batch, 1), cfg.max_len - 16),
                logits_at=jnp.zeros((batch, 1), jnp.int32),
            )
        self.kw = kw
        apply = lambda p, t, **k: model.apply({"params": p}, t, **k)
        first = (lambda out: out[0]) if decode else (lambda out: out)
        self.merged = jax.jit(lambda p, t, kw: first(apply(p, t, **kw)))
        self.plain = jax.jit(lambda b, d, t, kw: first(jaxlora.lora_apply(apply)(b, d, t, **kw)))
        self.routed = {
            r: jax.jit(
                lambda b, d, t, ids, kw, r=r: first(
                    jaxlora.lora_apply(apply, routing=r)(b, d, t, adapter_ids=ids, **kw)
                )
            )
            for r in ("auto", "gather", "grouped")
        }


def _serving(model: Llama, params: Any, args: argparse.Namespace) -> None:
    base, deltas = _adapters(params, args.adapters, args.rank)
    pool = jaxlora.stack(deltas)
    pool16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), pool)
    merged = jaxlora.merge(base, deltas[0])
    counts = [k for k in (1, 8, 64, 256) if k <= args.adapters]
    print(
        f"Llama d_model {model.config.d_model}, {model.config.n_layers} layers, LoRA r={args.rank} "
        f"all-linear, a pool of {args.adapters} adapters, {jax.devices()[0].platform}, "
        f"{args.rounds} interleaved rounds, median"
    )
    for name, shape in (
        (f"prefill {args.batch}x{args.seq}", _Shapes(model, args.batch, args.seq, False)),
        (f"decode {args.batch}x1", _Shapes(model, args.batch, 1, True)),
    ):
        t, kw = shape.tokens, shape.kw
        fns = {
            "merged model": lambda s=shape, t=t, kw=kw: s.merged(merged, t, kw),
            "one plain adapter": lambda s=shape, t=t, kw=kw: s.plain(base, deltas[0], t, kw),
        }
        for k in counts:
            ids = jnp.arange(args.batch) % k
            fns[f"pool, {k} distinct"] = lambda s=shape, t=t, kw=kw, ids=ids: s.routed["auto"](
                base, pool, t, ids, kw
            )
        # the pool in bfloat16, as servers keep adapters: half the bytes to read at many adapters
        ids = jnp.arange(args.batch) % counts[-1]
        fns[f"bf16 pool, {counts[-1]} distinct"] = lambda s=shape, t=t, kw=kw, ids=ids: s.routed[
            "auto"
        ](base, pool16, t, ids, kw)
        times = interleaved(fns, args.rounds, desc=name)
        one = times["pool, 1 distinct"]
        print(f"\n{name:24} {'ms':>8} {'vs 1 adapter':>13} {'vs plain':>9} {'vs merged':>10}")
        for row, seconds in times.items():
            plain, dense = times["one plain adapter"], times["merged model"]
            print(
                f"{row:24} {seconds * 1e3:8.1f} {one / seconds:13.3f} "
                f"{plain / seconds:9.3f} {dense / seconds:10.3f}"
            )
        print("(throughput ratios: > 1 is faster than the column's reference)")


def _crossover(model: Llama, params: Any, args: argparse.Namespace) -> None:
    base, deltas = _adapters(params, max(args.crossover), args.rank)
    print(f"\n{'routing crossover':24} {'distinct':>8} {'gather ms':>10} {'grouped ms':>11} "
          f"{'grouped/gather':>15}")  # fmt: skip
    for name, shape in (
        (f"prefill {args.batch}x{args.seq}", _Shapes(model, args.batch, args.seq, False)),
        (f"decode {args.batch}x1", _Shapes(model, args.batch, 1, True)),
    ):
        for k in args.crossover:
            pool = jaxlora.stack(deltas[:k])
            ids = jnp.arange(args.batch) % k
            fns = {
                r: lambda r=r, s=shape, pool=pool, ids=ids: s.routed[r](
                    base, pool, s.tokens, ids, s.kw
                )
                for r in ("gather", "grouped")
            }
            times = interleaved(fns, args.rounds, desc=f"{name}, {k} adapters")
            print(
                f"{name:24} {k:8} {times['gather'] * 1e3:10.1f} {times['grouped'] * 1e3:11.1f} "
                f"{times['grouped'] / times['gather']:15.3f}"
            )
    print("(grouped/gather < 1: grouping wins; routing='auto' groups up to 16 distinct adapters "
          "at one token per sequence, up to 4 otherwise)")  # fmt: skip


def _memory_plans(model: Llama, params: Any, args: argparse.Namespace) -> None:
    base, deltas = _adapters(params, 1, args.rank)
    shape = _Shapes(model, args.batch, 1, True)
    abstract_pool = jax.eval_shape(
        lambda d: jaxlora.multi.adapter_pool(d, capacity=args.adapters, rank=args.rank), deltas[0]
    )
    ids = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    a_base, a_kw = jaxlora.memory.abstract(base), jaxlora.memory.abstract(shape.kw)
    tokens = jaxlora.memory.abstract(shape.tokens)
    plans = {
        "one plain adapter": jaxlora.memory.memory_of(
            shape.plain, a_base, jaxlora.memory.abstract(deltas[0]), tokens, a_kw
        )
    }
    with progress(3, "memory plans") as bar:
        for r in ("gather", "grouped", "auto"):
            plans[f"pool, routing={r}"] = jaxlora.memory.memory_of(
                shape.routed[r], a_base, abstract_pool, tokens, ids, a_kw
            )
            bar.update()
    pool_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_pool))
    base_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(a_base))
    print(
        f"\nmemory (XLA plan of the decode step, batch {args.batch}): the pool of {args.adapters} "
        f"adapters holds {pool_bytes / 2**20:.1f} MiB ({pool_bytes / base_bytes:.2f}x the "
        f"{base_bytes / 2**20:.1f} MiB base)"
    )
    print(f"{'decode step':28} {'temp MiB':>9} {'peak MiB':>9}")
    for name, plan in plans.items():
        print(f"{name:28} {plan.temp / 2**20:9.1f} {plan.peak / 2**20:9.1f}")


def _training(model: Llama, params: Any, args: argparse.Namespace) -> None:
    print(f"\n{'multi-tenant training':24} {'N':>4} {'one step ms':>12} {'N steps ms':>11} "
          f"{'N steps / one':>14}")  # fmt: skip
    for n in [n for n in (1, 8, 32) if n <= args.train_batch]:
        together, alone = _tenant_steps(model, params, args, n)
        times = interleaved(
            {"one step": together, "N steps": alone}, args.rounds, desc=f"training {n} adapters"
        )
        print(
            f"{'':24} {n:4} {times['one step'] * 1e3:12.1f} {times['N steps'] * 1e3:11.1f} "
            f"{times['N steps'] / times['one step']:14.2f}"
        )


def _tenant_steps(model: Llama, params: Any, args: argparse.Namespace, n: int) -> tuple:
    """``(one step training n adapters, n separate steps)``, each a call timed as a whole."""
    tokens = jax.random.randint(
        jax.random.key(2), (args.train_batch, args.train_seq), 0, model.config.vocab_size
    )
    apply = jaxlora.lora_apply(lambda p, t: model.apply({"params": p}, t))
    base, deltas = _adapters(params, n, args.rank)
    ids = jnp.arange(args.train_batch) % n

    def token_losses(logits: jax.Array, t: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], t[:, 1:]).mean(-1)

    tx = jaxlora.multi.per_adapter(optax.adamw(1.0, weight_decay=0.01), learning_rates=[1e-3] * n)

    @jax.jit
    def together(stacked: Any, state: Any) -> Any:
        def loss(s: Any) -> jax.Array:
            per = token_losses(apply(base, s, tokens, adapter_ids=ids), tokens)
            return jaxlora.multi.per_adapter_loss(per, ids, n)[0]

        updates, state = tx.update(jax.grad(loss)(stacked), state, stacked)
        return optax.apply_updates(stacked, updates), state

    alone_tx = optax.adamw(1e-3, weight_decay=0.01)

    @jax.jit
    def alone(delta: Any, state: Any, rows: jax.Array) -> Any:
        loss = lambda d: token_losses(apply(base, d, rows), rows).mean()
        updates, state = alone_tx.update(jax.grad(loss)(delta), state, delta)
        return optax.apply_updates(delta, updates), state

    stacked = jaxlora.stack(deltas, fold_scales=False)
    state = tx.init(stacked)
    rows = [tokens[i::n] for i in range(n)]
    states = [alone_tx.init(d) for d in deltas]
    return (
        lambda: together(stacked, state),
        lambda: [alone(d, s, r) for d, s, r in zip(deltas, states, rows, strict=True)],
    )


def _swaps(model: Llama, params: Any, args: argparse.Namespace) -> None:
    base, deltas = _adapters(params, 2, args.rank)
    shape = _Shapes(model, args.batch, 1, True)
    pool = jaxlora.multi.adapter_pool(deltas[0], capacity=args.adapters, rank=args.rank)
    ids = jnp.zeros(args.batch, jnp.int32)
    serve = shape.routed["auto"]
    jax.block_until_ready(serve(base, pool, shape.tokens, ids, shape.kw))
    start = time.perf_counter()
    pool = jax.block_until_ready(jaxlora.multi.put(pool, 0, deltas[0]))  # compiles the write
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for slot in range(1, 5):
        pool = jax.block_until_ready(jaxlora.multi.put(pool, slot, deltas[slot % 2]))
    put_s = (time.perf_counter() - start) / 4
    start = time.perf_counter()
    jax.block_until_ready(serve(base, pool, shape.tokens, ids, shape.kw))
    call_s = time.perf_counter() - start
    entries = serve._cache_size()
    bigger = jaxlora.multi.adapter_pool(deltas[0], capacity=args.adapters, rank=2 * args.rank)
    start = time.perf_counter()
    jax.block_until_ready(serve(base, bigger, shape.tokens, ids, shape.kw))
    recompile_s = time.perf_counter() - start
    print(
        f"\npool slot filled with put: {put_s * 1e3:.1f} ms (the first put, which compiles the "
        f"write: {first_s * 1e3:.0f} ms); the next decode step {call_s * 1e3:.1f} ms without "
        f"recompiling ({entries} jit cache entry); a pool of another rank recompiles: "
        f"{recompile_s * 1e3:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--adapters", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--crossover", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-seq", type=int, default=64)
    args = parse_args(
        parser, rounds=2, adapters=8, batch=8, seq=4, rank=2, crossover=[1, 4],
        train_batch=8, train_seq=8,
    )  # fmt: skip
    model, _, params = small_llama(1, seq=64, quick=args.quick)
    _serving(model, params, args)
    _crossover(model, params, args)
    _memory_plans(model, params, args)
    _training(model, params, args)
    _swaps(model, params, args)


if __name__ == "__main__":
    main()
