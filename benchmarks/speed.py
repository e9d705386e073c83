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

Run: ``python benchmarks/speed.py [--rounds 15]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import optax

import jaxlora
from jaxlora import memory as _memory
from jaxlora.models.llama import Llama, LlamaConfig, causal_lm_loss


def _block(x):
    return jax.tree.map(lambda a: a.block_until_ready(), x)


def small_llama(batch: int, seq: int = 128) -> tuple[Llama, jax.Array, dict]:
    """The small decoder the multi-adapter and QLoRA benchmarks share: (model, tokens, params).

    d_model 512, 4 layers stacked with ``nn.scan``, 8 heads, d_ff 1408, vocab 4096.
    """
    cfg = LlamaConfig(
        vocab_size=4096,
        d_model=512,
        n_layers=4,
        n_heads=8,
        d_ff=1408,
        max_len=seq,
        scan_layers=True,
    )
    model = Llama(cfg)
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (batch, seq), 0, cfg.vocab_size)
    params = jax.jit(model.init)(key, tokens[:, :8])["params"]
    return model, tokens, params


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call for each function, timed in interleaved rounds."""
    for fn in fns.values():
        _block(fn())  # compile and warm up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            _block(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()

    cfg = LlamaConfig(
        vocab_size=8192, d_model=1024, n_layers=args.layers, n_heads=16, d_ff=2816, max_len=args.seq
    )
    model = Llama(cfg)
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (args.batch, args.seq), 0, cfg.vocab_size)
    params = jax.jit(model.init)(key, tokens[:, :8])["params"]
    config = jaxlora.LoraConfig(rank=8, targets="attention")
    base, delta = jaxlora.split(params, config, key=key)
    delta = jax.tree.map(lambda x: x + 0.01, delta)  # b away from zero: a real adapter

    apply = lambda p, toks: model.apply({"params": p}, toks)
    loss = lambda p, toks: causal_lm_loss(apply(p, toks), toks)
    adam = optax.adam(1e-4)
    full = jax.jit(_memory.full_step(loss, adam))
    tx = _memory.lora_optimizer(adam, delta)
    lora_use = jax.jit(_memory.lora_step(loss, tx, strategy="use-site"))
    lora_merge = jax.jit(_memory.lora_step(loss, tx, strategy="merge"))
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
    )
    fwd = interleaved(
        {
            "base": lambda: forward(params, tokens),
            "use-site": lambda: unmerged(base, delta, tokens),
            "merged": lambda: forward(merged_params, tokens),
        },
        args.rounds,
    )
    print(
        f"Llama d_model 1024, {args.layers} layers, batch {args.batch}x{args.seq}, "
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
