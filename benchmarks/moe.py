"""LoRA on mixture-of-experts weights: memory vs the merge strategy and full fine-tuning, speed.

Model: the reference MoE decoder (``jaxlora.models.moe``): Llama attention and,
in every layer, 8 SwiGLU experts used through ``jax.lax.ragged_dot``, top-2
routing, per-layer remat. LoRA (r = 8) on the experts' ``(experts, in, out)``
weights with one adapter per expert (``stacked_axes=1``, read by
``jaxlora.infer_layout``), Adam, trainable and optimizer state donated.

Memory comes from XLA's compiled plan on abstract inputs (``memory_of``; peak
= argument + output - alias + temp), at d_model 1024, 8 layers, experts of
width 2816 (~0.6B parameters), batch 1 x 512. The merge strategy builds every
expert's ``W + s·a@b``; the use-site engine factors the grouped matmuls. The
floor is the frozen model's step that differentiates only with respect to its
input embeddings: the least any adapter method can need.

Step time: a smaller model (d_model 256, 2 layers, experts of width 512),
batch 4 x 128, on this machine's CPU, steps timed in interleaved rounds;
ratios to the frozen floor step.

``--quick``: tiny shapes for the smoke test; its numbers mean nothing.

Run: ``python -m benchmarks.moe [--rounds N] [--quick]``
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as ``python benchmarks/moe.py``: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jaxlora.memory

jaxlora.memory.use_memory_minimizing_cpu_scheduler()  # before JAX starts: GPU-like memory plans

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jaxlora  # noqa: E402
from benchmarks._common import full_memory, interleaved, parse_args  # noqa: E402
from jaxlora.apps.progress import progress  # noqa: E402
from jaxlora.models.llama import LlamaConfig, causal_lm_loss  # noqa: E402
from jaxlora.models.moe import MoeConfig, MoeDecoder  # noqa: E402

MIB = 2**20
TARGETS = {"experts": r"moe/experts/", "experts+attention": [r"moe/experts/", "attention"]}


def _config(*, quick: bool, large: bool, seq: int) -> MoeConfig:
    if quick:
        return MoeConfig.tiny(llama=LlamaConfig.tiny(max_len=seq, remat=True))
    if large:
        llama = LlamaConfig(
            vocab_size=32000, d_model=1024, n_layers=8, n_heads=16, d_ff=2816, max_len=seq,
            remat=True,
        )  # fmt: skip
        return MoeConfig(llama=llama, n_experts=8, top_k=2, d_expert=2816)
    llama = LlamaConfig(
        vocab_size=4096, d_model=256, n_layers=2, n_heads=4, d_ff=512, max_len=seq, remat=True
    )
    return MoeConfig(llama=llama, n_experts=8, top_k=2, d_expert=512)


def _setup(cfg: MoeConfig, targets: object, tokens: jax.Array, params: object) -> tuple:
    model = MoeDecoder(cfg)
    loss = lambda p, t: causal_lm_loss(model.apply({"params": p}, t), t)
    layout = jaxlora.infer_layout(lambda p, t: model.apply({"params": p}, t), params, tokens)
    config = jaxlora.LoraConfig(rank=8, targets=targets, **layout)
    split = lambda p: jaxlora.split(p, config, key=jax.random.key(0))
    embed_loss = lambda p, e, t: causal_lm_loss(model.apply({"params": p}, inputs_embeds=e), t)
    return model, loss, split, embed_loss


def memory_rows(cfg: MoeConfig, *, batch: int, seq: int) -> list[dict]:
    model = MoeDecoder(cfg)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    adam = optax.adam(1e-4)
    rows = []
    with progress(len(TARGETS) * 4, "memory plans") as bar:
        for name, targets in TARGETS.items():
            _, loss, split, embed_loss = _setup(cfg, targets, tokens, params)
            base, delta = jax.eval_shape(split, params)
            row = {"targets": name, "full": full_memory(loss, adam, params, tokens).peak}
            bar.update()
            tx = jaxlora.memory.lora_optimizer(adam, delta)
            for strategy in ("merge", "use-site"):
                row[strategy] = jaxlora.memory.memory_of(
                    jaxlora.memory.lora_step(loss, tx, strategy=strategy),
                    delta,
                    jax.eval_shape(tx.init, delta),
                    base,
                    tokens,
                    donate_argnums=(0, 1),
                ).peak
                bar.update()
            embeds = jax.ShapeDtypeStruct((batch, seq, cfg.llama.d_model), jnp.float32)
            row["floor"] = jaxlora.memory.memory_of(
                jaxlora.memory.floor_step(embed_loss), params, embeds, tokens
            ).peak
            bar.update()
            rows.append(row)
    return rows


def speed_row(cfg: MoeConfig, *, batch: int, seq: int, rounds: int) -> dict:
    model = MoeDecoder(cfg)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.llama.vocab_size)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:, :8])["params"]
    _, loss, split, embed_loss = _setup(cfg, TARGETS["experts"], tokens, params)
    base, delta = split(params)
    adam = optax.adam(1e-4)
    tx = jaxlora.memory.lora_optimizer(adam, delta)
    lora = {
        s: jax.jit(jaxlora.memory.lora_step(loss, tx, strategy=s)) for s in ("use-site", "merge")
    }
    full = jax.jit(jaxlora.memory.full_step(loss, adam))
    floor = jax.jit(jaxlora.memory.floor_step(embed_loss))
    embeds = jnp.zeros((batch, seq, cfg.llama.d_model), jnp.float32)
    opt, full_opt = tx.init(delta), adam.init(params)
    fns = {
        "floor": lambda: floor(params, embeds, tokens),
        "use-site": lambda: lora["use-site"](delta, opt, base, tokens),
        "merge": lambda: lora["merge"](delta, opt, base, tokens),
        "full": lambda: full(params, full_opt, tokens),
    }
    return interleaved(fns, rounds, desc="train steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seq", type=int, default=512, help="sequence of the memory plans")
    args = parse_args(parser, rounds=1, seq=16)
    cfg = _config(quick=args.quick, large=True, seq=args.seq)
    header = (
        f"{'targets':18} | {'full MiB':>8} {'merge':>7} {'use-site':>8} {'floor':>7} | "
        f"{'use/floor':>9} {'use/merge':>9} {'full/use':>8}"
    )
    print(f"memory: MoE decoder, {_describe(cfg)}, batch 1 x {args.seq}, Adam, r = 8, remat")
    print(header)
    print("-" * len(header))
    for m in memory_rows(cfg, batch=1, seq=args.seq):
        print(
            f"{m['targets']:18} | {m['full'] / MIB:8.0f} {m['merge'] / MIB:7.0f} "
            f"{m['use-site'] / MIB:8.0f} {m['floor'] / MIB:7.0f} | "
            f"{m['use-site'] / m['floor']:9.3f} {m['use-site'] / m['merge']:9.3f} "
            f"{m['full'] / m['use-site']:8.2f}"
        )
    seq = 16 if args.quick else 128
    small = _config(quick=args.quick, large=False, seq=seq)
    t = speed_row(small, batch=4, seq=seq, rounds=args.rounds)
    print(f"\nstep time: MoE decoder, {_describe(small)}, batch 4 x {seq}, LoRA on the experts")
    header = f"{'step':10} | {'ms':>8} {'/ floor':>8} {'/ full':>8}"
    print(header)
    print("-" * len(header))
    for name in ("floor", "use-site", "merge", "full"):
        print(
            f"{name:10} | {t[name] * 1e3:8.1f} {t[name] / t['floor']:8.3f} "
            f"{t[name] / t['full']:8.3f}"
        )


def _describe(cfg: MoeConfig) -> str:
    n = cfg.llama
    return (
        f"d_model {n.d_model}, {n.n_layers} layers, {cfg.n_experts} experts of width "
        f"{cfg.d_expert}, top-{cfg.top_k}"
    )


if __name__ == "__main__":
    main()
