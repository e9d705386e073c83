"""Training memory from XLA's compiled plan: full fine-tuning vs LoRA (merge, use-site) vs floor.

Model: the Llama-style reference decoder (``jaxlora.models.llama``) at ~1.1B
parameters (TinyLlama shapes) and optionally LLaMA-7B shapes, layers stacked
with ``nn.scan``, with and without per-layer remat; batch 1 x 512; Adam;
trainable state and optimizer state donated. Inputs are abstract
(``jax.ShapeDtypeStruct``): nothing is allocated.

peak = argument + output - alias + temp (``jaxlora.memory.MemoryReport``).
The floor is the frozen model's step that differentiates only with respect to
its input embeddings: the least any adapter method can need.

CPU plans use XLA's memory-minimizing scheduler (the CPU backend's default
one starts independent work early and keeps more buffers alive than GPU and
TPU schedulers do). The CPU backend also computes bfloat16 matmuls in float32,
so a bfloat16 base pays for float32 copies of its weights here; the floor pays
the same, so the ratios stay fair.

``--quick``: ``LlamaConfig.tiny`` shapes (d_model 64, 2 layers) instead of the
presets, sequence 32, and two rows of the table that between them take each
dtype, remat setting and target set once (each row compiles four steps).

Run: ``python -m benchmarks.memory [--7b] [--quick]``
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as ``python benchmarks/memory.py``: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jaxlora.memory

jaxlora.memory.use_memory_minimizing_cpu_scheduler()  # before JAX starts: GPU-like memory plans

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jaxlora  # noqa: E402
from benchmarks._common import abstract_llama, full_memory, lm_loss, parse_args  # noqa: E402
from jaxlora.apps.progress import progress  # noqa: E402
from jaxlora.models.llama import LlamaConfig, causal_lm_loss  # noqa: E402

GIB = 2**30


def measure(model_config: LlamaConfig, targets: str, *, batch: int, seq: int) -> dict:
    model, tokens, params = abstract_llama(model_config, batch=batch, seq=seq)
    config = jaxlora.LoraConfig(rank=8, targets=targets, stacked_axes=1)
    base, delta = jax.eval_shape(lambda p: jaxlora.split(p, config, key=jax.random.key(0)), params)
    loss = lm_loss(model)
    adam = optax.adam(1e-4)
    out = {}
    out["full"] = full_memory(loss, adam, params, tokens)
    tx = jaxlora.memory.lora_optimizer(adam, delta)
    for strategy in ("merge", "use-site"):
        out[strategy] = jaxlora.memory.memory_of(
            jaxlora.memory.lora_step(loss, tx, strategy=strategy),
            delta,
            jax.eval_shape(tx.init, delta),
            base,
            tokens,
            donate_argnums=(0, 1),
        )
    embed_loss = lambda p, e, toks: causal_lm_loss(
        model.apply({"params": p}, inputs_embeds=e), toks
    )
    embeds = jax.ShapeDtypeStruct((batch, seq, model_config.d_model), model_config.dtype)
    out["floor"] = jaxlora.memory.memory_of(
        jaxlora.memory.floor_step(embed_loss), params, embeds, tokens
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--7b", dest="seven", action="store_true", help="also LLaMA-7B shapes")
    parser.add_argument("--seq", type=int, default=512)
    args = parse_args(parser, seq=32)
    if args.quick:
        presets = [("tiny", LlamaConfig.tiny)]
    else:
        presets = [("1.1B", LlamaConfig.llama_1b)]
        presets += [("7B", LlamaConfig.llama_7b)] if args.seven else []
    header = (
        f"{'model':5} {'base':5} {'remat':5} {'targets':10} | {'full GiB':>8} {'merge':>7} "
        f"{'use-site':>8} {'floor':>7} | {'use/floor':>9} {'use/merge':>9} {'full/use':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = [
        (name, preset, dtype, remat, targets)
        for name, preset in presets
        for dtype in (jnp.float32, jnp.bfloat16)
        for remat in (True, False)
        for targets in ("attention", "all-linear")
    ]
    if args.quick:
        rows = [rows[0], rows[-1]]  # float32, remat, attention; bfloat16, no remat, all-linear
    with progress(len(rows), "memory plans") as bar:
        for name, preset, dtype, remat, targets in rows:
            model_config = preset(
                scan_layers=True, remat=remat, max_len=args.seq, dtype=dtype, param_dtype=dtype
            )
            start = time.perf_counter()
            m = {
                k: v.peak / GIB
                for k, v in measure(model_config, targets, batch=1, seq=args.seq).items()
            }
            bar.write(
                f"{name:5} {jnp.dtype(dtype).name[:5]:5} {remat!s:5} {targets:10} | "
                f"{m['full']:8.2f} {m['merge']:7.2f} {m['use-site']:8.2f} "
                f"{m['floor']:7.2f} | {m['use-site'] / m['floor']:9.3f} "
                f"{m['use-site'] / m['merge']:9.3f} {m['full'] / m['use-site']:8.2f}"
                f"   ({time.perf_counter() - start:.0f}s)",
                file=sys.stdout,
            )
            sys.stdout.flush()
            bar.update()
    print(
        "\nbars: use/floor <= 1.10, use/merge <= 0.65 (float32 base), full/use >= 2.7 "
        "(float32 base)"
    )


if __name__ == "__main__":
    main()
