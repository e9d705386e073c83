"""Step time on this machine's CPU, as ratios measured side by side in one run.

Two models, each timed in one interleaved run (every round calls every
function once, so that noise from a shared machine hits them alike; the
median per function is reported, after one untimed call that compiles):

* **MiniLM**: the demo's encoder, all-MiniLM-L6-v2's shapes (6 layers, width
  384, feed-forward 1536; random weights), batch 32 x 64, AdamW, the loss of
  the mean-pooled output;
* **Llama**: the reference decoder at d_model 1024 (16 heads, d_ff 2816,
  4 layers, vocab 8192), batch 4 x 256, Adam, the causal LM loss.

Rows, relative to full fine-tuning's step: LoRA with attention targets and
with attention + MLP targets at r = 8, 16 and 64; the frozen model's backward
pass to the embeddings only (no weight gradient: the floor any adapter method
can reach); QLoRA (NF4 base, r = 16, attention + MLP) relative to LoRA. Then
forwards relative to the base model's: the use-site (unmerged) forward at
r = 16 with attention + MLP targets, and the merged parameters' forward.

``--quick``: tiny shapes (width 32/64, 2 layers, a few tokens), ranks 2 and 4,
2 rounds: a smoke test whose numbers mean nothing.

Run: ``python -m benchmarks.speed [--rounds 7] [--models minilm,llama] [--quick]``
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as ``python benchmarks/speed.py``: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxlora
import jaxlora.memory
from benchmarks._common import interleaved, llama, lm_loss, parse_args
from jaxlora.models.bert import BertConfig, BertModel, mean_pool
from jaxlora.models.llama import LlamaConfig

TARGETS = {"attention": "attention", "attention+mlp": ["attention", "mlp"]}
BARS = {"attention": 0.72, "attention+mlp": 0.80}


@dataclasses.dataclass(frozen=True)
class Case:
    """One model to time: its parameters, a batch, and how to run it."""

    name: str
    description: str
    params: Any
    batch: Any
    apply: Callable[[Any, Any], Any]  # (params, batch) -> outputs
    loss: Callable[[Any, Any], jax.Array]  # (params, batch) -> scalar
    optimizer: optax.GradientTransformation
    embeddings: Callable[[Any], tuple[Any, Callable[[Any, Any], Any]]]  # the floor's split
    quantize: str  # regex of the kernels QLoRA quantizes


def minilm(quick: bool) -> Case:
    """all-MiniLM-L6-v2's shapes with random weights, batch 32 x 64 (quick: tiny)."""
    if quick:
        config = BertConfig(
            vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64
        )
        batch_size, seq = 2, 8
    else:
        config, batch_size, seq = BertConfig.minilm_l6(), 32, 64
    model = BertModel(config)
    key = jax.random.key(0)
    ids = jax.random.randint(key, (batch_size, seq), 0, config.vocab_size)
    mask = jnp.ones((batch_size, seq), jnp.int32)
    params = jax.jit(model.init)(key, ids, mask)["params"]
    apply = lambda p, batch: model.apply({"params": p}, *batch)
    loss = lambda p, batch: jnp.mean(mean_pool(apply(p, batch), batch[1]) ** 2)
    return Case(
        name="MiniLM",
        description=f"MiniLM-L6 shapes (width {config.hidden_size}, {config.num_layers} "
        f"layers), batch {batch_size}x{seq}, AdamW",
        params=params,
        batch=(ids, mask),
        apply=apply,
        loss=loss,
        optimizer=optax.adamw(1e-4),
        embeddings=lambda p: (p["embeddings"], lambda e, rest: {**rest, "embeddings": e}),
        quantize=r"^encoder/.*/kernel$",
    )


def reference_llama(quick: bool) -> Case:
    """The reference decoder at d_model 1024, 4 layers, batch 4 x 256 (quick: tiny)."""
    if quick:
        cfg, batch_size = LlamaConfig.tiny(n_layers=2, max_len=16), 2
    else:
        cfg = LlamaConfig(
            vocab_size=8192, d_model=1024, n_heads=16, d_ff=2816, n_layers=4, max_len=256
        )
        batch_size = 4
    model, tokens, params = llama(cfg, batch_size)
    return Case(
        name="Llama",
        description=f"reference Llama d_model {cfg.d_model}, {cfg.n_layers} layers, "
        f"batch {batch_size}x{cfg.max_len}, Adam",
        params=params,
        batch=tokens,
        apply=lambda p, toks: model.apply({"params": p}, toks),
        loss=lm_loss(model),
        optimizer=optax.adam(1e-4),
        embeddings=lambda p: (p["embed_tokens"], lambda e, rest: {**rest, "embed_tokens": e}),
        quantize=r"^layers.*kernel$",
    )


MODELS = {"minilm": minilm, "llama": reference_llama}


def time_case(case: Case, ranks: tuple[int, ...], rounds: int) -> list[tuple[str, float, str]]:
    """``(row, ratio, bar)`` for every measure of ``case``, from two interleaved runs."""
    params, batch, tx = case.params, case.batch, case.optimizer
    full = jax.jit(jaxlora.memory.full_step(case.loss, tx))
    full_state = tx.init(params)
    table, place = case.embeddings(params)
    rest = dict(params)
    floor = jax.jit(jax.grad(lambda e, rest, b: case.loss(place(e, rest), b)))
    lora = jax.jit(jaxlora.memory.lora_step(case.loss, tx))

    def adapter(targets: Any, rank: int) -> tuple[Any, Any]:
        config = jaxlora.LoraConfig(rank=rank, alpha=2 * rank, targets=targets)
        base, delta = jaxlora.split(params, config, key=jax.random.key(1))
        return base, jax.tree.map(lambda x: x + 0.01, delta)  # b away from zero

    steps: dict[str, Callable[[], Any]] = {
        "full": lambda: full(params, full_state, batch),
        "floor": lambda: floor(table, rest, batch),
    }
    mid_rank = ranks[len(ranks) // 2]
    for label, targets in TARGETS.items():
        for rank in ranks:
            base, delta = adapter(targets, rank)
            state = tx.init(delta)
            steps[f"{label} r{rank}"] = functools.partial(lora, delta, state, base, batch)
    base, delta = adapter(TARGETS["attention+mlp"], mid_rank)
    qbase = jaxlora.quantize(base, targets=case.quantize)
    steps["qlora"] = functools.partial(lora, delta, tx.init(delta), qbase, batch)
    train = interleaved(steps, rounds, desc=f"{case.name} train steps")

    forward = jax.jit(case.apply)
    unmerged = jax.jit(jaxlora.lora_apply(case.apply))
    merged = jaxlora.merge(base, delta)
    fwd = interleaved(
        {
            "base": lambda: forward(params, batch),
            "unmerged": lambda: unmerged(base, delta, batch),
            "merged": lambda: forward(merged, batch),
        },
        rounds,
        desc=f"{case.name} forwards",
    )
    rows = [(f"train step: full fine-tuning ({train['full'] * 1e3:.0f} ms)", 1.0, "")]
    for label in TARGETS:
        for rank in ranks:
            ratio = train[f"{label} r{rank}"] / train["full"]
            rows.append((f"train step: LoRA {label}, r={rank} / full", ratio, f"<= {BARS[label]}"))
    rows.append(
        (
            "train step: frozen, embeddings' gradient only / full",
            train["floor"] / train["full"],
            "the floor",
        )
    )
    rows.append(
        (
            f"train step: QLoRA (nf4) / LoRA, attention+mlp r={mid_rank}",
            train["qlora"] / train[f"attention+mlp r{mid_rank}"],
            "<= 1.15",
        )
    )
    rows.append(
        (
            f"forward: unmerged (attention+mlp, r={mid_rank}) / base",
            fwd["unmerged"] / fwd["base"],
            "<= 1.10",
        )
    )
    rows.append(("forward: merged / base", fwd["merged"] / fwd["base"], "1.00 within noise"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", default="minilm,llama", help="comma-separated: minilm, llama")
    args = parse_args(parser, rounds=2)
    ranks = (2, 4) if args.quick else (8, 16, 64)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown or not names:
        parser.error(
            f"--models takes a comma-separated subset of {sorted(MODELS)}; got {args.models!r}"
        )
    print(f"{jax.devices()[0].platform}, {args.rounds} interleaved rounds, median; ratios")
    for name in names:
        case = MODELS[name](args.quick)
        rows = time_case(case, ranks, args.rounds)
        print(f"\n{case.name}: {case.description}")
        print(f"{'measure':62} {'ratio':>7}  bar")
        for row, ratio, bar in rows:
            print(f"{row:62} {ratio:7.3f}  {bar}")


if __name__ == "__main__":
    main()
