"""QLoRA: training memory with a 4-bit NF4 base vs LoRA and full fine-tuning, and CPU step time.

Memory (XLA's compiled plan, abstract inputs, nothing allocated): the
Llama-style decoder at ~1.1B parameters (TinyLlama shapes; ``--7b`` adds
LLaMA-7B shapes), layers stacked with ``nn.scan`` and rematerialized per
layer, batch 1 x 512, Adam, adapters r = 8 on every linear layer of the
decoder blocks, trainable state donated. QLoRA quantizes those linear weights
to NF4 with double quantization (block 64); embeddings, norms and the output
head stay in the base dtype. CPU plans use the memory-minimizing scheduler
(``jaxlora.memory.use_memory_minimizing_cpu_scheduler``).

Bar: QLoRA's peak minus its base bytes <= 1.10 x LoRA's peak minus its base
bytes, plus one dequantized weight (the largest kernel): the 4-bit base may
only shrink the weights' share.

Step time: a small decoder (d_model 512) on this CPU, QLoRA vs LoRA,
interleaved medians.

``--quick``: ``LlamaConfig.tiny`` shapes (d_model 64, 2 layers) for the memory
rows (float32 only) and the step time, sequence 32, a 256 x 256 matrix for the
merge errors, 2 rounds.

Run: ``python -m benchmarks.qlora [--7b] [--rounds 7] [--quick]``
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as ``python benchmarks/qlora.py``: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses

import jaxlora.memory

jaxlora.memory.use_memory_minimizing_cpu_scheduler()

import argparse  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jaxlora  # noqa: E402
from benchmarks._common import (  # noqa: E402
    abstract_llama,
    full_memory,
    interleaved,
    lm_loss,
    parse_args,
    small_llama,
)
from jaxlora.apps.progress import progress  # noqa: E402
from jaxlora.models.llama import LlamaConfig  # noqa: E402

MIB = 2**20
QUANT_TARGETS = r"^layers/.*kernel$"


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory_rows(preset, dtype, *, seq: int) -> dict:
    cfg = preset(scan_layers=True, remat=True, max_len=seq, dtype=dtype, param_dtype=dtype)
    model, tokens, params = abstract_llama(cfg, batch=1, seq=seq)
    config = jaxlora.LoraConfig(rank=8, targets="all-linear", stacked_axes=1)
    base, delta = jax.eval_shape(lambda p: jaxlora.split(p, config, key=jax.random.key(0)), params)
    qbase = jax.eval_shape(lambda b: jaxlora.quantize(b, targets=QUANT_TARGETS), base)
    loss = lm_loss(model)
    adam = optax.adam(1e-4)
    tx = jaxlora.memory.lora_optimizer(adam, delta)
    lora = jaxlora.memory.lora_step(loss, tx)
    full = full_memory(loss, adam, params, tokens)
    state = jax.eval_shape(tx.init, delta)
    lora_m = jaxlora.memory.memory_of(lora, delta, state, base, tokens, donate_argnums=(0, 1))
    qlora_m = jaxlora.memory.memory_of(lora, delta, state, qbase, tokens, donate_argnums=(0, 1))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    kernels = [x for p, x in flat if jax.tree_util.keystr(p).endswith("'kernel']")]
    largest = max(math.prod(x.shape[1:]) for x in kernels) * jnp.dtype(dtype).itemsize
    quantized = [
        x for x in jax.tree.leaves(qbase, is_leaf=jaxlora.quant.is_quantized)
        if isinstance(x, jaxlora.QuantizedArray)
    ]  # fmt: skip
    n_quantized = sum(q.size for q in quantized)
    return dict(
        params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        full=full.peak,
        lora=lora_m.peak,
        qlora=qlora_m.peak,
        base_bytes=_nbytes(base),
        qbase_bytes=_nbytes(qbase),
        adapter_bytes=_nbytes(delta),
        largest=largest,
        bytes_per_param=sum(q.nbytes for q in quantized) / n_quantized,
    )


def step_times(rounds: int, *, quick: bool = False) -> tuple[dict, LlamaConfig]:
    """Interleaved medians of the LoRA and the QLoRA train step, and the model's config."""
    model, tokens, params = small_llama(8, quick=quick)
    key = jax.random.key(0)
    config = jaxlora.LoraConfig(rank=8, targets="all-linear", stacked_axes=1)
    base, delta = jaxlora.split(params, config, key=key)
    qbase = jaxlora.quantize(base, targets=QUANT_TARGETS)
    loss = lm_loss(model)
    tx = jaxlora.memory.lora_optimizer(optax.adam(1e-4), delta)
    step = jax.jit(jaxlora.memory.lora_step(loss, tx))
    state = tx.init(delta)
    times = interleaved(
        {
            "LoRA": lambda: step(delta, state, base, tokens),
            "QLoRA": lambda: step(delta, state, qbase, tokens),
        },
        rounds,
        desc="step times",
    )
    return times, model.config


def requantization_errors(n: int = 2048) -> list[tuple[float, float, float]]:
    """Merging into a 4-bit base and requantizing: how much of the adapter survives.

    W ~ N(0, 0.02²) (``n`` x ``n``, NF4 + double quant), an r = 8 adapter whose
    update has norm ``rel · ||W||``. Returns ``(rel, err_full, err_requant)``:
    the relative error ``||merged - (Ŵ + ΔW)|| / ||ΔW||`` of the float merge
    (``merge(qbase, delta)``) and of the requantized one (``requantize=True``).
    """
    key = jax.random.key(0)
    w = 0.02 * jax.random.normal(key, (n, n))
    rows = []
    for rel in (0.01, 0.05, 0.2):
        config = jaxlora.LoraConfig(rank=8, targets="w")
        base, delta = jaxlora.split({"w": w}, config, key=key)
        b = jax.random.normal(jax.random.key(1), delta["w"].b.shape)
        delta = {"w": dataclasses.replace(delta["w"], b=b)}
        dw = delta["w"].delta_weight()
        factor = rel * jnp.linalg.norm(w) / jnp.linalg.norm(dw)
        delta = {"w": dataclasses.replace(delta["w"], b=b * factor)}
        dw = delta["w"].delta_weight()
        qbase = jaxlora.quantize(base)
        exact = qbase["w"].dequantize(jnp.float32) + dw
        full = jaxlora.merge(qbase, delta)["w"]
        requant = jaxlora.merge(qbase, delta, requantize=True)["w"].dequantize(jnp.float32)
        norm = jnp.linalg.norm(dw)
        rows.append(
            (
                rel,
                float(jnp.linalg.norm(full - exact) / norm),
                float(jnp.linalg.norm(requant - exact) / norm),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--7b", dest="seven", action="store_true")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    args = parse_args(parser, seq=32, rounds=2)
    presets = [("1.1B", LlamaConfig.llama_1b)]
    if args.seven:
        presets.append(("7B", LlamaConfig.llama_7b))
    dtypes = (jnp.float32, jnp.bfloat16)
    if args.quick:
        presets, dtypes = [("tiny", LlamaConfig.tiny)], (jnp.float32,)
    print(f"train-step peak memory, batch 1 x {args.seq}, per-layer remat, r=8 all-linear (MiB)")
    print(
        f"{'model':5} {'base':8} {'full FT':>9} {'LoRA':>8} {'QLoRA':>8} | {'base':>7} "
        f"{'4-bit base':>10} {'B/param':>7} | {'LoRA-base':>9} {'QLoRA-qbase':>11} "
        f"{'bar':>8} {'ok':>3} | {'full/QLoRA':>10}"
    )
    rows = [(name, preset, dtype) for name, preset in presets for dtype in dtypes]
    with progress(len(rows), "memory plans") as pbar:
        for name, preset, dtype in rows:
            r = memory_rows(preset, dtype, seq=args.seq)
            lora_rest = r["lora"] - r["base_bytes"]
            qlora_rest = r["qlora"] - r["qbase_bytes"]
            bar = 1.10 * lora_rest + r["largest"]
            lines = [
                f"{name:5} {jnp.dtype(dtype).name:8} {r['full'] / MIB:9.0f} {r['lora'] / MIB:8.0f} "
                f"{r['qlora'] / MIB:8.0f} | {r['base_bytes'] / MIB:7.0f} "
                f"{r['qbase_bytes'] / MIB:10.0f} {r['bytes_per_param']:7.4f} | "
                f"{lora_rest / MIB:9.0f} {qlora_rest / MIB:11.0f} {bar / MIB:8.0f} "
                f"{'yes' if qlora_rest <= bar else 'NO':>3} | {r['full'] / r['qlora']:10.2f}"
            ]
            if name == "7B" and dtype == jnp.bfloat16:
                lines.append(
                    f"      QLoRA paper, LLaMA-7B: 5,048 MB 4-bit base, 26 MB adapters, 567 MB "
                    f"adapter input gradients; here: {r['qbase_bytes'] / 1e6:,.0f} MB base "
                    f"(embeddings and head unquantized), {r['adapter_bytes'] / 1e6:,.0f} MB "
                    "adapters (r=8 on all linear layers)"
                )
            pbar.write("\n".join(lines), file=sys.stdout)
            sys.stdout.flush()
            pbar.update()
    print("\nmerging into the 4-bit base: error relative to the adapter's update ||ΔW||")
    print(f"{'||ΔW||/||W||':>13} {'float merge':>12} {'requantize=True':>16}")
    for rel, full, requant in requantization_errors(256 if args.quick else 2048):
        print(f"{rel:13.2f} {full:12.2e} {requant:16.2f}")
    times, cfg = step_times(args.rounds, quick=args.quick)
    print(
        f"\nCPU step time (d_model {cfg.d_model}, {cfg.n_layers} layers, batch 8x{cfg.max_len}): "
        f"LoRA {times['LoRA'] * 1e3:.0f} ms,"
        f" QLoRA {times['QLoRA'] * 1e3:.0f} ms, QLoRA/LoRA = {times['QLoRA'] / times['LoRA']:.2f}"
    )


if __name__ == "__main__":
    main()
