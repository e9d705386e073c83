"""Serving many adapters: a mixed batch over 8 adapters vs the same batch on 1, and swaps.

Model: the Llama-style reference decoder (d_model 512, 4 layers, 8 heads),
LoRA r = 8 on all linear layers, batch 16 x 128, float32, forward pass.

* throughput: one stacked delta of 8 adapters with ``adapter_ids`` cycling
  through all 8, vs a stacked delta of 1 adapter (every id 0), vs one plain
  adapter (no routing): medians of interleaved rounds;
* swap: calling the jitted function with another padded adapter of equal
  shapes (no recompilation: the jit cache keeps one entry) vs compiling for a
  new shape.

``--quick``: ``LlamaConfig.tiny`` (d_model 64, 2 layers), batch 16 x 32, 2 rounds.

Run: ``python -m benchmarks.multi [--rounds 10] [--quick]``
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as ``python benchmarks/multi.py``: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import time

import jax
import jax.numpy as jnp

import jaxlora
from benchmarks._common import interleaved, parse_args, small_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seq", type=int, default=128)
    args = parse_args(parser, rounds=2, seq=32)
    model, tokens, params = small_llama(16, args.seq, quick=args.quick)
    cfg = model.config
    key = jax.random.key(0)
    config = jaxlora.LoraConfig(rank=8, targets="all-linear", stacked_axes=1)
    deltas = []
    for i in range(8):
        base, delta = jaxlora.split(params, config, key=jax.random.fold_in(key, i))
        deltas.append(jax.tree.map(lambda x, i=i: x + 0.01 * (i + 1), delta))
    apply = lambda p, t: model.apply({"params": p}, t)
    routed = jax.jit(jaxlora.lora_apply(apply))
    single = jax.jit(jaxlora.lora_apply(apply))
    stacked8 = jaxlora.stack(deltas)
    stacked1 = jaxlora.stack(deltas[:1])
    ids8 = jnp.arange(16) % 8
    ids1 = jnp.zeros(16, jnp.int32)
    times = interleaved(
        {
            "8 adapters": lambda: routed(base, stacked8, tokens, adapter_ids=ids8),
            "1 adapter (stacked)": lambda: routed(base, stacked1, tokens, adapter_ids=ids1),
            "1 adapter (plain)": lambda: single(base, deltas[0], tokens),
        },
        args.rounds,
        desc="forwards",
    )
    print(
        f"Llama d_model {cfg.d_model}, {cfg.n_layers} layers, batch 16x{args.seq}, "
        f"{jax.devices()[0].platform}, {args.rounds} interleaved rounds, median"
    )
    print(f"{'forward':34} {'ms':>8} {'throughput vs 1 adapter':>24}")
    for name in times:
        print(
            f"{name:34} {times[name] * 1e3:8.1f} {times['1 adapter (plain)'] / times[name]:24.3f}"
        )

    # swap: another adapter of equal shapes reuses the compiled function
    swap_fn = jax.jit(jaxlora.lora_apply(apply))
    jax.block_until_ready(swap_fn(base, deltas[0], tokens))
    start = time.perf_counter()
    for d in deltas[1:]:
        jax.block_until_ready(swap_fn(base, d, tokens))
    swap = (time.perf_counter() - start) / (len(deltas) - 1)
    assert swap_fn._cache_size() == 1
    other = jaxlora.split(
        params, jaxlora.LoraConfig(rank=16, targets="all-linear", stacked_axes=1), key=key
    )[1]
    start = time.perf_counter()
    jax.block_until_ready(swap_fn(base, other, tokens))  # a new rank: a new compilation
    recompile = time.perf_counter() - start
    print(
        f"\nswap to another adapter of equal shapes: {swap * 1e3:8.1f} ms per call "
        f"(jit cache entries: 1)"
    )
    print(
        f"call that needs a recompilation (rank 16): {recompile * 1e3:8.1f} ms "
        f"({recompile / swap:.1f}x a swapped call)"
    )


if __name__ == "__main__":
    main()
