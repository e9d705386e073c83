"""Step time on this machine's CPU, as ratios measured side by side in one run.

Model: the Llama-style reference decoder at d_model 1024 (16 heads, d_ff 2816,
4 layers, vocab 8192), batch 4 x 256, float32. LoRA r = 8 on the attention
projections. Each function is compiled first, then the functions are timed in
interleaved rounds (so that noise from a shared machine hits them alike) and
the median per function is reported.

Rows:
* train step: LoRA (use-site) and LoRA (merge strategy) vs full fine-tuning, Adam;
* forward: use-site (unmerged) forward vs the base model's forward, and the
  forward of the merged parameters vs the base model's.

``--quick``: ``LlamaConfig.tiny`` (d_model 64), 2 layers, batch 2 x 32, 2 rounds.

Run: ``python -m benchmarks.speed [--rounds 15] [--quick]``
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as ``python benchmarks/speed.py``: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse

import jax
import optax

import jaxlora
import jaxlora.memory
from benchmarks._common import interleaved, llama, lm_loss, parse_args
from jaxlora.models.llama import LlamaConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parse_args(parser, rounds=2, layers=2, batch=2, seq=32)

    sizes = dict(n_layers=args.layers, max_len=args.seq)
    if args.quick:
        cfg = LlamaConfig.tiny(**sizes)
    else:
        cfg = LlamaConfig(vocab_size=8192, d_model=1024, n_heads=16, d_ff=2816, **sizes)
    model, tokens, params = llama(cfg, args.batch)
    config = jaxlora.LoraConfig(rank=8, targets="attention")
    base, delta = jaxlora.split(params, config, key=jax.random.key(0))
    delta = jax.tree.map(lambda x: x + 0.01, delta)  # b away from zero: a real adapter

    apply = lambda p, toks: model.apply({"params": p}, toks)
    loss = lm_loss(model)
    adam = optax.adam(1e-4)
    full = jax.jit(jaxlora.memory.full_step(loss, adam))
    tx = jaxlora.memory.lora_optimizer(adam, delta)
    lora_use = jax.jit(jaxlora.memory.lora_step(loss, tx, strategy="use-site"))
    lora_merge = jax.jit(jaxlora.memory.lora_step(loss, tx, strategy="merge"))
    full_state, lora_state = adam.init(params), tx.init(delta)

    forward = jax.jit(apply)
    unmerged = jax.jit(jaxlora.lora_apply(apply))
    merged_params = jaxlora.merge(base, delta)

    train = interleaved(
        {
            "full": lambda: full(params, full_state, tokens),
            "lora use-site": lambda: lora_use(delta, lora_state, base, tokens),
            "lora merge": lambda: lora_merge(delta, lora_state, base, tokens),
        },
        args.rounds,
        desc="train steps",
    )
    fwd = interleaved(
        {
            "base": lambda: forward(params, tokens),
            "use-site": lambda: unmerged(base, delta, tokens),
            "merged": lambda: forward(merged_params, tokens),
        },
        args.rounds,
        desc="forwards",
    )
    print(
        f"Llama d_model {cfg.d_model}, {args.layers} layers, batch {args.batch}x{args.seq}, "
        f"{jax.devices()[0].platform}, {args.rounds} interleaved rounds, median"
    )
    print(f"{'measure':44} {'ms':>8} {'ratio':>7}  bar")
    rows = [
        ("train step: full fine-tuning", train["full"], 1.0, ""),
        (
            "train step: LoRA use-site / full",
            train["lora use-site"],
            train["lora use-site"] / train["full"],
            "<= 0.75",
        ),
        (
            "train step: LoRA merge / full",
            train["lora merge"],
            train["lora merge"] / train["full"],
            "",
        ),
        ("forward: base", fwd["base"], 1.0, ""),
        (
            "forward: use-site (unmerged, r=8) / base",
            fwd["use-site"],
            fwd["use-site"] / fwd["base"],
            "<= 1.10",
        ),
        ("forward: merged / base", fwd["merged"], fwd["merged"] / fwd["base"], "1.00 within noise"),
    ]
    for name, seconds, ratio, bar in rows:
        print(f"{name:44} {seconds * 1e3:8.1f} {ratio:7.3f}  {bar}")


if __name__ == "__main__":
    main()
