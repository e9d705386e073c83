"""``jaxlora plan``: the memory planner on a Llama-style decoder, from the command line.

The model is a preset, size flags or a Hugging Face ``config.json``
(:func:`jaxlora.models.hf.llama_config_from_hf`); :func:`jaxlora.plan.plan` does
the planning.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxlora.memory
from jaxlora._config import LoraConfig
from jaxlora.models.hf import llama_config_from_hf
from jaxlora.models.llama import Llama, LlamaConfig, causal_lm_loss
from jaxlora.plan import parse_bytes, plan

__all__ = ["PRESETS", "add_arguments", "run"]


def _gpt3_175b(**overrides: Any) -> Any:
    fields = dict(
        vocab_size=50257, d_model=12288, n_layers=96, n_heads=96, d_ff=32768, max_len=2048
    )
    return LlamaConfig(**{**fields, **overrides})


def _preset(name: str) -> Callable[..., Any]:
    return {
        "tiny": LlamaConfig.tiny,
        "llama-1b": LlamaConfig.llama_1b,
        "llama-7b": LlamaConfig.llama_7b,
        "gpt3-175b": _gpt3_175b,
    }[name]


PRESETS = ("tiny", "llama-1b", "llama-7b", "gpt3-175b")
"""Model presets of ``jaxlora plan``: :class:`jaxlora.models.llama.LlamaConfig`'s ``tiny``,
``llama_1b`` and ``llama_7b``, and ``gpt3-175b``: GPT-3 175B's attention (96 layers,
d_model 12288, 96 heads, vocabulary 50257) with a SwiGLU MLP of width 32768, which keeps
the total at 175.2B parameters."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``jaxlora plan`` options to ``parser``.

    Args:
        parser: the subcommand's parser.

    Example:
        >>> import argparse
        >>> from jaxlora.apps.plan_cli import add_arguments
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> args = parser.parse_args(["llama-7b", "--rank", "16", "--device-memory", "80GB"])
        >>> args.model, args.rank, args.device_memory
        ('llama-7b', 16, 80000000000)
    """
    parser.add_argument(
        "model",
        nargs="?",
        help=f"a preset ({', '.join(PRESETS)}) or the path of a Hugging Face config.json; "
        "the size flags below override its values or, without it, give all sizes",
    )
    sizes = parser.add_argument_group("model sizes (Llama-style decoder)")
    for flag, help_text in (
        ("--d-model", "width of the residual stream"),
        ("--layers", "number of decoder layers"),
        ("--heads", "attention heads"),
        ("--kv-heads", "key/value heads (default: --heads)"),
        ("--d-ff", "MLP hidden width"),
        ("--vocab", "vocabulary size"),
    ):
        sizes.add_argument(flag, type=_positive_int, help=help_text)
    parser.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank (default 8)")
    parser.add_argument(
        "--targets",
        default="attention",
        help="comma-separated regexes of the weights to adapt, or a preset: attention, mlp, "
        "all-linear (default: attention; the LoRA paper: q_proj,v_proj)",
    )
    parser.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")
    parser.add_argument("--seq", type=_positive_int, default=512, help="tokens per sequence")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the weights and activations (default float32; on a CPU host, "
        "bfloat16 plans include XLA:CPU's float32 copies of bfloat16 weights)",
    )
    parser.add_argument("--remat", action="store_true", help="rematerialize each layer")
    parser.add_argument(
        "--device-memory",
        type=_bytes_arg,
        help="memory of one device, e.g. 80GB or 24GiB, to report what fits",
    )
    parser.add_argument(
        "--quantize",
        default="nf4",
        help="QLoRA base format: nf4, fp4, int4, int8, or none (default nf4)",
    )
    parser.add_argument(
        "--skip-compile",
        action="store_true",
        help="count parameters and checkpoint sizes only (for models too slow to compile)",
    )


def run(args: argparse.Namespace) -> int:
    """Runs ``jaxlora plan`` with parsed ``args``; prints the plan; returns the exit code.

    The model is the Llama-style decoder of :mod:`jaxlora.models.llama`, its layers
    stacked with ``nn.scan`` (so that one layer is compiled), trained with Adam on
    the next-token loss of ``--batch`` sequences of ``--seq`` tokens.

    Args:
        args: the namespace parsed by a parser set up with :func:`add_arguments`.

    Returns:
        0 on success, 2 for an invalid model description (the error goes to stderr).

    Example:
        >>> from jaxlora.apps.cli import main
        >>> main(["plan", "gpt3-175b", "--rank", "4", "--targets", "q_proj,v_proj",
        ...       "--skip-compile", "--quantize", "none"])
        model: gpt3-175b: 96 layers, d_model 12288, 96 heads, 96 KV heads, d_ff 32768, vocab 50257
        training: batch 1 x 512 tokens, Adam, float32; LoRA rank 4 on q_proj,v_proj
                            full fine-tuning         LoRA
        parameters           175,183,663,104  175,202,537,472
        trainable            175,183,663,104       18,874,368
        trainable %                     100%        0.01077%
        weights (total)             700.7 GB         700.7 GB
        checkpoint float32          700.7 GB          75.5 MB
        checkpoint 16-bit           350.4 GB          37.7 MB
        checkpoint reduction              1x           9,282x
        memory: not compiled (counts only)
        0
    """
    # XLA reads its flags once, when this process first computes (below, if not before);
    # the environment is restored afterwards so that child processes do not inherit them.
    flags = os.environ.get("XLA_FLAGS")
    jaxlora.memory.use_memory_minimizing_cpu_scheduler()
    try:
        return _run(args)
    finally:
        if flags is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = flags


def _run(args: argparse.Namespace) -> int:
    try:
        name, cfg = _model_config(args)
    except (ValueError, OSError) as e:
        print(f"jaxlora plan: error: {e}", file=sys.stderr)
        return 2
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    cfg = dataclasses.replace(
        cfg,
        scan_layers=True,
        remat=bool(args.remat),
        max_len=max(cfg.max_len, args.seq),
        dtype=dtype,
        param_dtype=dtype,
    )
    targets = [t for t in args.targets.split(",") if t]
    quantize = None if args.quantize.lower() == "none" else args.quantize
    try:
        config = LoraConfig(
            rank=args.rank,
            targets=targets[0] if len(targets) == 1 else targets,
            stacked_axes={r"^layers/": 1},
        )
        model = Llama(cfg)
        tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
        params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]

        def loss(p: Any, t: jax.Array) -> jax.Array:
            logits: jax.Array = model.apply({"params": p}, t)  # type: ignore[assignment]
            return causal_lm_loss(logits, t)

        result = plan(
            loss,
            params,
            config,
            batch=tokens,
            optimizer=optax.adam(1e-4),
            quantize=quantize,
            device_memory=args.device_memory,
            skip_compile=bool(args.skip_compile),
        )
    except (ValueError, TypeError) as e:
        print(f"jaxlora plan: error: {e}", file=sys.stderr)
        return 2
    print(
        f"model: {name}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
        f"{cfg.n_kv_heads} KV heads, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}"
    )
    print(
        f"training: batch {args.batch} x {args.seq} tokens, Adam, {args.dtype}; "
        f"LoRA rank {args.rank} on {','.join(targets)}"
    )
    print(result)
    return 0


def _model_config(args: argparse.Namespace) -> tuple[str, Any]:
    flags = {
        "d_model": "--d-model",
        "n_layers": "--layers",
        "n_heads": "--heads",
        "n_kv_heads": "--kv-heads",
        "d_ff": "--d-ff",
        "vocab_size": "--vocab",
    }
    values = {k: getattr(args, flag[2:].replace("-", "_")) for k, flag in flags.items()}
    given = {k: v for k, v in values.items() if v is not None}
    if args.model is None:
        missing = [f for k, f in flags.items() if k != "n_kv_heads" and k not in given]
        if missing:
            raise ValueError(
                f"no model given: pass a preset ({', '.join(PRESETS)}), a config.json path, or "
                f"all sizes (missing {' '.join(missing)})"
            )
        if "n_kv_heads" not in given:
            given["n_kv_heads"] = given["n_heads"]
        return "custom", LlamaConfig(**given)
    if args.model in PRESETS:
        base = _preset(args.model)()
    elif os.path.exists(args.model):
        base = llama_config_from_hf(args.model)
    else:
        raise ValueError(
            f"{args.model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
            "config.json path"
        )
    if "n_heads" in given and "n_kv_heads" not in given and base.n_kv_heads == base.n_heads:
        given["n_kv_heads"] = given["n_heads"]
    return args.model, dataclasses.replace(base, **given)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _bytes_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
