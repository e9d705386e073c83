"""What the benchmarks share: the ``--quick`` flag, the models they build, interleaved timing.

Every benchmark runs as ``python -m benchmarks.NAME`` from the repository root
(and as ``python benchmarks/NAME.py``: each script puts the root on
``sys.path`` first). ``--quick`` runs the same code at tiny sizes, for the
smoke tests in ``tests/test_benchmarks.py``; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxlora.memory
from jaxlora.apps.progress import progress
from jaxlora.models.llama import Llama, LlamaConfig, causal_lm_loss

QUICK_HELP = "smoke test: the same code at tiny sizes, a few rounds (numbers mean nothing)"


def parse_args(parser: argparse.ArgumentParser, **quick: Any) -> argparse.Namespace:
    """``parser``'s flags plus ``--quick``, under which ``quick`` replaces their defaults.

    Flags given on the command line still win over the quick defaults.
    """
    parser.add_argument("--quick", action="store_true", help=QUICK_HELP)
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**quick)
    return parser.parse_args()


def installed(*modules: str) -> bool:
    """Whether every one of ``modules`` can be imported (without importing it)."""
    return all(importlib.util.find_spec(m) is not None for m in modules)


def llama(cfg: LlamaConfig, batch: int) -> tuple[Llama, jax.Array, Any]:
    """``(model, tokens, params)``: random ``batch x cfg.max_len`` tokens, initialized weights."""
    model = Llama(cfg)
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (batch, cfg.max_len), 0, cfg.vocab_size)
    params = jax.jit(model.init)(key, tokens[:, :8])["params"]
    return model, tokens, params


def small_llama(batch: int, seq: int = 128, *, quick: bool = False) -> tuple[Llama, jax.Array, Any]:
    """The small decoder the multi-adapter and QLoRA benchmarks time: ``(model, tokens, params)``.

    d_model 512, 4 layers stacked with ``nn.scan``, 8 heads, d_ff 1408, vocab
    4096; ``quick``: ``LlamaConfig.tiny`` (d_model 64, 2 layers), also scanned.
    """
    if quick:
        cfg = LlamaConfig.tiny(max_len=seq, scan_layers=True)
    else:
        cfg = LlamaConfig(
            vocab_size=4096, d_model=512, n_layers=4, n_heads=8, d_ff=1408, max_len=seq,
            scan_layers=True,
        )  # fmt: skip
    return llama(cfg, batch)


def abstract_llama(cfg: LlamaConfig, *, batch: int, seq: int) -> tuple[Llama, Any, Any]:
    """``(model, tokens, params)`` with ``jax.ShapeDtypeStruct`` leaves: nothing allocated.

    For memory plans (``jaxlora.memory.memory_of``), which need only shapes.
    """
    model = Llama(cfg)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    return model, tokens, params


def lm_loss(model: Llama) -> Callable[[Any, Any], jax.Array]:
    """``loss(params, tokens)``: the causal LM loss of ``model`` on ``tokens``."""
    return lambda p, tokens: causal_lm_loss(model.apply({"params": p}, tokens), tokens)


def full_memory(
    loss: Callable[[Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    params: Any,
    tokens: Any,
) -> jaxlora.memory.MemoryReport:
    """XLA's plan of a full fine-tuning step, parameters and optimizer state donated."""
    return jaxlora.memory.memory_of(
        jaxlora.memory.full_step(loss, optimizer),
        params,
        jax.eval_shape(optimizer.init, params),
        tokens,
        donate_argnums=(0, 1),
    )


def _block(x: Any) -> Any:
    return jax.tree.map(lambda a: a.block_until_ready(), x)


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, *, desc: str = "timing"
) -> dict[str, float]:
    """Median seconds per call for each function, timed in interleaved rounds.

    Each function is called once first (compilation and warm-up), untimed; then
    every round calls each once, so that noise from a shared machine hits them
    alike. A progress bar labelled ``desc`` counts the calls on stderr.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    with progress((rounds + 1) * len(fns), desc) as bar:
        for fn in fns.values():
            _block(fn())
            bar.update()
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                _block(fn())
                times[name].append(time.perf_counter() - start)
                bar.update()
    return {name: statistics.median(t) for name, t in times.items()}
