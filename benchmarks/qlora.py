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

Run: ``python -m benchmarks.qlora [--7b] [--rounds 7]``
"""

from __future__ import annotations

import dataclasses

from jaxlora import memory as _memory

_memory.use_memory_minimizing_cpu_scheduler()

import argparse  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jaxlora  # noqa: E402
from benchmarks.speed import interleaved, small_llama  # noqa: E402
from jaxlora.models.llama import Llama, LlamaConfig, causal_lm_loss  # noqa: E402

MIB = 2**20
QUANT_TARGETS = r"^layers/.*kernel$"


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory_rows(preset, dtype, *, seq: int) -> dict:
    cfg = preset(scan_layers=True, remat=True, max_len=seq, dtype=dtype, param_dtype=dtype)
    model = Llama(cfg)
    tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    config = jaxlora.LoraConfig(rank=8, targets="all-linear", stacked_axes=1)
    base, delta = jax.eval_shape(lambda p: jaxlora.split(p, config, key=jax.random.key(0)), params)
    qbase = jax.eval_shape(lambda b: jaxlora.quantize(b, targets=QUANT_TARGETS), base)
    loss = lambda p, t: causal_lm_loss(model.apply({"params": p}, t), t)
    adam = optax.adam(1e-4)
    tx = _memory.lora_optimizer(adam, delta)
    lora = _memory.lora_step(loss, tx)
    full = _memory.memory_of(
        _memory.full_step(loss, adam),
        params,
        jax.eval_shape(adam.init, params),
        tokens,
        donate_argnums=(0, 1),
    )
    state = jax.eval_shape(tx.init, delta)
    lora_m = _memory.memory_of(lora, delta, state, base, tokens, donate_argnums=(0, 1))
    qlora_m = _memory.memory_of(lora, delta, state, qbase, tokens, donate_argnums=(0, 1))
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


def step_times(rounds: int) -> dict:
    model, tokens, params = small_llama(8)
    key = jax.random.key(0)
    config = jaxlora.LoraConfig(rank=8, targets="all-linear", stacked_axes=1)
    base, delta = jaxlora.split(params, config, key=key)
    qbase = jaxlora.quantize(base, targets=QUANT_TARGETS)
    loss = lambda p, t: causal_lm_loss(model.apply({"params": p}, t), t)
    tx = _memory.lora_optimizer(optax.adam(1e-4), delta)
    step = jax.jit(_memory.lora_step(loss, tx))
    state = tx.init(delta)
    return interleaved(
        {
            "LoRA": lambda: step(delta, state, base, tokens),
            "QLoRA": lambda: step(delta, state, qbase, tokens),
        },
        rounds,
    )


def requantization_errors() -> list[tuple[float, float, float]]:
    """Merging into a 4-bit base and requantizing: how much of the adapter survives.

    W ~ N(0, 0.02²) (2048 x 2048, NF4 + double quant), an r = 8 adapter whose
    update has norm ``rel · ||W||``. Returns ``(rel, err_full, err_requant)``:
    the relative error ``||merged - (Ŵ + ΔW)|| / ||ΔW||`` of the float merge
    (``merge(qbase, delta)``) and of the requantized one (``requantize=True``).
    """
    key = jax.random.key(0)
    w = 0.02 * jax.random.normal(key, (2048, 2048))
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
    args = parser.parse_args()
    presets = [("1.1B", LlamaConfig.llama_1b)]
    if args.seven:
        presets.append(("7B", LlamaConfig.llama_7b))
    print(f"train-step peak memory, batch 1 x {args.seq}, per-layer remat, r=8 all-linear (MiB)")
    print(
        f"{'model':5} {'base':8} {'full FT':>9} {'LoRA':>8} {'QLoRA':>8} | {'base':>7} "
        f"{'4-bit base':>10} {'B/param':>7} | {'LoRA-base':>9} {'QLoRA-qbase':>11} "
        f"{'bar':>8} {'ok':>3} | {'full/QLoRA':>10}"
    )
    for name, preset in presets:
        for dtype in (jnp.float32, jnp.bfloat16):
            r = memory_rows(preset, dtype, seq=args.seq)
            lora_rest = r["lora"] - r["base_bytes"]
            qlora_rest = r["qlora"] - r["qbase_bytes"]
            bar = 1.10 * lora_rest + r["largest"]
            print(
                f"{name:5} {jnp.dtype(dtype).name:8} {r['full'] / MIB:9.0f} {r['lora'] / MIB:8.0f} "
                f"{r['qlora'] / MIB:8.0f} | {r['base_bytes'] / MIB:7.0f} "
                f"{r['qbase_bytes'] / MIB:10.0f} {r['bytes_per_param']:7.4f} | "
                f"{lora_rest / MIB:9.0f} {qlora_rest / MIB:11.0f} {bar / MIB:8.0f} "
                f"{'yes' if qlora_rest <= bar else 'NO':>3} | {r['full'] / r['qlora']:10.2f}",
                flush=True,
            )
            if name == "7B" and dtype == jnp.bfloat16:
                print(
                    f"      QLoRA paper, LLaMA-7B: 5,048 MB 4-bit base, 26 MB adapters, 567 MB "
                    f"adapter input gradients; here: {r['qbase_bytes'] / 1e6:,.0f} MB base "
                    f"(embeddings and head unquantized), {r['adapter_bytes'] / 1e6:,.0f} MB "
                    "adapters (r=8 on all linear layers)"
                )
    print("\nmerging into the 4-bit base: error relative to the adapter's update ||ΔW||")
    print(f"{'||ΔW||/||W||':>13} {'float merge':>12} {'requantize=True':>16}")
    for rel, full, requant in requantization_errors():
        print(f"{rel:13.2f} {full:12.2e} {requant:16.2f}")
    times = step_times(args.rounds)
    print(
        f"\nCPU step time (d_model 512, 4 layers, batch 8x128): LoRA {times['LoRA'] * 1e3:.0f} ms,"
        f" QLoRA {times['QLoRA'] * 1e3:.0f} ms, QLoRA/LoRA = {times['QLoRA'] / times['LoRA']:.2f}"
    )


if __name__ == "__main__":
    main()
