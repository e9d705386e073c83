"""One accelerator, one command: LoRA, QLoRA and full fine-tuning of a ~1B Llama in bfloat16.

Prepared for a GPU (or TPU) host; every number comes from this one run. The
model is the reference decoder at TinyLlama-1.1B's shapes (d_model 2048, 22
layers, 32 heads, 4 KV heads, d_ff 5632, vocab 32000), weights and compute in
bfloat16, batch 8 x 1024 by default. Methods, each a jitted Adam step with
its trainable state donated:

* full fine-tuning (every weight, Adam in bfloat16);
* jaxlora LoRA and QLoRA (NF4 base, block 64, double quantization), r = 8 on
  q/k/v/o (``lora_apply``, use-site);
* nnx.LoRA, Qwix LoRA and Qwix QLoRA on the same weights and adapters, built
  as in ``benchmarks/peers.py`` (whose docstring describes each peer's API).

Printed per method: median step time relative to jaxlora LoRA, tokens per
second, XLA's planned peak (arguments + outputs - donated + temporaries) and
the device's measured peak after the run (``memory_stats``, where the backend
reports it; cumulative over the process, so only its maximum means something).

Run: ``python -m benchmarks.gpu [--layers 22] [--batch 8] [--seq 1024] [--rounds 10]``
(``--quick``: tiny shapes, float32 on any backend: a smoke test).
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as ``python benchmarks/gpu.py``: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks._common import installed, interleaved, lm_loss, parse_args
from benchmarks.peers import JaxMethod, build_jax_methods, shared_adapters
from jaxlora.memory import full_step
from jaxlora.models.llama import Llama, LlamaConfig

MIB = 2**20


def model_config(args: argparse.Namespace) -> LlamaConfig:
    if args.quick:
        return LlamaConfig.tiny(n_layers=args.layers, max_len=args.seq)
    return LlamaConfig.llama_1b(
        n_layers=args.layers, max_len=args.seq, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=10)
    args = parse_args(parser, layers=2, batch=2, seq=32, rounds=2)
    t0 = time.perf_counter()
    cfg = model_config(args)
    model = Llama(cfg)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:, :8])["params"]
    n_params = sum(x.size for x in jax.tree.leaves(params))

    adam = optax.adam(1e-5)
    step = full_step(lm_loss(model), adam)
    full = JaxMethod(
        "full fine-tuning",
        lambda train, opt_state, _frozen, toks: step(train, opt_state, toks),
        jax.tree.map(jnp.copy, params),  # a copy: the step donates it, the others share params
        adam.init(params),
        None,
        n_params,
        "every weight",
    )
    has_qwix = installed("qwix")
    adapters = shared_adapters(cfg, params)
    peers = build_jax_methods(
        cfg, params, tokens, adapters, jax.random.key(0), qlora=True, qwix=has_qwix
    )
    methods = [full, *(m for m in peers if m.name != "jaxlora (NNX model)")]
    planned = {}
    for m in methods:  # the plan of the very executable the timing runs (compiled once)
        compiled = m.jitted.lower(m.train, m.opt_state, m.frozen, tokens).compile()
        plan = compiled.memory_analysis()
        planned[m.name] = (
            plan.argument_size_in_bytes
            + plan.output_size_in_bytes
            - plan.alias_size_in_bytes
            + plan.temp_size_in_bytes
        )
    interleaved({m.name: m.runner(tokens) for m in methods}, args.rounds, desc="train steps")
    seconds = {m.name: statistics.median(m.seconds[1:]) for m in methods}
    stats = jax.devices()[0].memory_stats() or {}

    device = jax.devices()[0]
    print(
        f"{device.platform} {device.device_kind}: Llama {n_params / 1e9:.2f}B parameters "
        f"({cfg.n_layers} layers, d_model {cfg.d_model}), {jnp.dtype(cfg.dtype).name}, batch "
        f"{args.batch}x{args.seq}, r = 8 on q/k/v/o, Adam, {args.rounds} interleaved rounds"
    )
    if not has_qwix:
        print("(Qwix rows skipped: qwix is not installed; pip install -e '.[bench]')")
    ref = seconds["jaxlora"]
    print(f"{'method':20} {'step / jaxlora':>15} {'tokens/s':>10} {'planned peak':>14}")
    for m in methods:
        s = seconds[m.name]
        print(
            f"{m.name:20} {s / ref:15.3f} {args.batch * args.seq / s:10,.0f} "
            f"{planned[m.name] / MIB:11,.0f} MiB"
        )
    if "peak_bytes_in_use" in stats:
        print(f"device peak over the run: {stats['peak_bytes_in_use'] / MIB:,.0f} MiB")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
