"""The demo as a command: flags, the run from data to summary, the memory plan, saving."""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

import jaxlora
from jaxlora.apps.data import load_rotten_tomatoes
from jaxlora.apps.demo._batches import accuracy, bucket_lengths, encode
from jaxlora.apps.demo._plans import memory_plan, step_times
from jaxlora.apps.demo._training import (
    adamw,
    fit,
    fit_probe,
    make_step,
    predict,
    steps_per_epoch,
)
from jaxlora.models.bert import BertClassifier, BertConfig, BertModel, abstract_params, mean_pool
from jaxlora.models.minilm import load_minilm, load_tokenizer

__all__ = ["DEFAULTS", "QUANT_FORMATS", "QUICK", "VARIANTS", "add_arguments", "run", "run_on"]

# Defaults chosen by measurement: LoRA and full fine-tuning accuracy on a validation split
# carved from the training set, and wall time on 2 CPU cores.
VARIANTS = ("lora", "rslora", "dora")
QUANT_FORMATS = ("none", "nf4", "fp4", "int8")
DEFAULTS: dict[str, Any] = dict(
    rank=16,
    alpha=32.0,
    targets="attention,mlp",
    epochs=2,
    steps=None,
    batch_size=32,
    lr=1e-3,
    full_lr=5e-5,
    max_length=64,
)
# --quick: a tiny run (a few hundred sentences, a few steps) for tests; flags still win.
QUICK: dict[str, Any] = dict(DEFAULTS, epochs=1, steps=6, batch_size=16, max_length=32)
_QUICK_TRAIN, _QUICK_TEST = 96, 64
_MERGE_TOLERANCE = 1e-3  # max |logit difference| allowed between merged and adapted models
_MINILM_WIDTH = 384  # all-MiniLM-L6-v2: hidden size (every adapted matrix has min(in, out) = 384)
_MINILM_POSITIONS = 512  # and its position embeddings
_print = functools.partial(print, flush=True)  # keep stdout in step with the bars on stderr


def _save(directory: pathlib.Path, delta: Any, head: Any, config: jaxlora.LoraConfig) -> None:
    """Saves the adapter under ``directory/adapter`` and the head beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    jaxlora.save_adapter(directory / "adapter", delta, config=config)
    safetensors.numpy.save_file(_flat_arrays(head), str(directory / "classifier.safetensors"))


def _flat_arrays(tree: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): np.asarray(leaf)
        for path, leaf in leaves
    }


def _size_kb(path: pathlib.Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the demo's flags to ``parser``.

    Args:
        parser: The ``demo`` subcommand's parser.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> args = parser.parse_args(["--quick", "--rank", "4"])
        >>> args.rank, args.quick, args.full
        (4, True, False)
    """
    d = DEFAULTS
    add = parser.add_argument
    add("--rank", type=int, help=f"LoRA rank r (default {d['rank']})")
    add("--alpha", type=float, help=f"LoRA alpha; scale = alpha / rank (default {d['alpha']})")
    add(
        "--targets",
        help="comma-separated presets (attention, mlp, all-linear) or regexes on parameter "
        f"paths (default {d['targets']!r})",
    )
    add("--epochs", type=int, help=f"passes over the training set (default {d['epochs']})")
    add("--steps", type=int, help="train for exactly this many steps (overrides --epochs)")
    add("--batch-size", type=int, help=f"training batch size (default {d['batch_size']})")
    add("--lr", type=float, help=f"peak LoRA learning rate (default {d['lr']})")
    add("--full-lr", type=float, help=f"peak full fine-tuning learning rate ({d['full_lr']})")
    add("--max-length", type=int, help=f"tokens kept per sentence (default {d['max_length']})")
    add("--seed", type=int, default=0, help="seed of the adapters, shuffling and dropout")
    add("--full", action="store_true", help="also run full fine-tuning, for comparison")
    add("--out", type=pathlib.Path, help="adapter directory (default: a new temp directory)")
    add("--quick", action="store_true", help="a tiny run (a few seconds of training), for tests")
    add(
        "--variant",
        choices=VARIANTS,
        default="lora",
        help="lora, rslora (alpha/sqrt(r) scale) or dora (weight-decomposed LoRA)",
    )
    add(
        "--quantize",
        choices=QUANT_FORMATS,
        default="none",
        help="store the encoder's linear weights in 4 bits (nf4, fp4) or int8, with double "
        "quantization (QLoRA); default: none",
    )


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    defaults = QUICK if args.quick else DEFAULTS
    settings = {k: getattr(args, k, None) for k in defaults}
    settings = {k: defaults[k] if v is None else v for k, v in settings.items()}
    for name in ("rank", "batch_size", "max_length"):
        if settings[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {settings[name]}")
    for name in ("epochs", "steps"):
        if settings[name] is not None and settings[name] < 1:
            raise ValueError(f"--{name} must be positive, got {settings[name]}")
    for name in ("lr", "full_lr"):
        if not (settings[name] > 0 and math.isfinite(settings[name])):
            flag = f"--{name.replace('_', '-')}"
            raise ValueError(f"{flag} must be a finite positive number, got {settings[name]}")
    if settings["rank"] > _MINILM_WIDTH:
        raise ValueError(
            f"--rank {settings['rank']} exceeds the encoder's width ({_MINILM_WIDTH}): a rank "
            f"above min(in, out) of every adapted weight adds nothing; pass at most {_MINILM_WIDTH}"
        )
    if settings["max_length"] > _MINILM_POSITIONS:
        raise ValueError(
            f"--max-length {settings['max_length']} exceeds the encoder's {_MINILM_POSITIONS} "
            "positions; pass at most that"
        )
    return settings


def _prepare(args: argparse.Namespace) -> tuple[dict[str, Any], jaxlora.LoraConfig]:
    """The checked settings and the LoRA config of ``args``; raises for invalid flags."""
    s = _settings(args)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file; pass a directory (new or existing)")
    if args.out is not None and (args.out / "adapter").exists():
        raise ValueError(
            f"{args.out / 'adapter'} already exists; pass an --out directory without an "
            "adapter in it (or omit --out for a new temporary directory)"
        )
    targets = [t.strip() for t in s["targets"].split(",") if t.strip()]
    if not targets:
        raise ValueError(f"--targets {s['targets']!r} names no target")
    config = jaxlora.LoraConfig(
        rank=s["rank"],
        alpha=s["alpha"],
        targets=targets[0] if len(targets) == 1 else targets,
        rslora=args.variant == "rslora",
        use_dora=args.variant == "dora",
    )
    # the encoder's shapes only (no weights, no data): targets that miss it fail here
    encoder = abstract_params(BertConfig.minilm_l6())
    jax.eval_shape(lambda p: jaxlora.split(p, config, key=jax.random.key(0)), encoder)
    return s, config


def run(args: argparse.Namespace) -> int:
    """Runs the demo from parsed flags.

    Args:
        args: Flags from the parser that :func:`add_arguments` filled.

    Returns:
        0 when the merged model matches the adapted one and (except with ``--quick``) LoRA
        beats the frozen-encoder baseline; 1 otherwise; 2 for invalid flags (checked before
        any data or model is loaded; the one-line error goes to stderr).
    """
    try:
        _prepare(args)
    except (ValueError, TypeError) as e:
        print(f"jaxlora demo: error: {e}", file=sys.stderr)
        return 2
    train, test = load_rotten_tomatoes()
    if args.quick:
        train, test = train[:_QUICK_TRAIN], test[:_QUICK_TEST]
    return run_on(args, train, test)


def run_on(
    args: argparse.Namespace,
    train: Sequence[tuple[str, int]],
    test: Sequence[tuple[str, int]],
) -> int:
    """Runs the demo on the given ``(text, label)`` examples (what :func:`run` does after loading).

    Args:
        args: Flags from the parser that :func:`add_arguments` filled.
        train: Training examples.
        test: Evaluation examples.

    Returns:
        The exit code, as :func:`run`.
    """
    s, config = _prepare(args)
    t_start = time.perf_counter()
    buckets = bucket_lengths(s["max_length"])

    _print("== jaxlora demo: LoRA fine-tuning of all-MiniLM-L6-v2 for sentence sentiment ==")
    model_config, encoder = load_minilm()
    tokenizer = load_tokenizer(max_length=s["max_length"])
    train_data, test_data = encode(tokenizer, train), encode(tokenizer, test)
    _print(
        f"data: Rotten Tomatoes, {len(train_data)} train / {len(test_data)} test sentences; "
        f"max {s['max_length']} tokens, padded to buckets {buckets}"
    )
    model = BertClassifier(model_config, num_classes=2)
    base, delta = jaxlora.split(encoder, config, key=jax.random.key(args.seed))
    if args.quantize != "none":  # QLoRA: the frozen linear weights in 4 (or 8) bits
        base = jaxlora.quantize(base, format=args.quantize, targets=r"^encoder/.*/kernel$")
        _print(f"base: encoder linear weights quantized to {args.quantize} (double quantization)")

    def classify(params: Any, head: Any, ids: Any, mask: Any) -> jax.Array:
        return model.apply({"params": {"bert": params, "classifier": head}}, ids, mask)

    lora_classify = jaxlora.lora_apply(classify)  # the use-site strategy: no merged copy
    head_shapes = {"kernel": jnp.zeros((model_config.hidden_size, 2)), "bias": jnp.zeros(2)}
    head_size = sum(x.size for x in jax.tree.leaves(head_shapes))

    _print("\n-- parameters --")
    count = jaxlora.count_parameters(base, delta)
    _print(f"LoRA adapters: {count}")
    _print(f"+ classifier head (trained beside the adapters): {head_size:,} parameters")
    _print(jaxlora.summary(delta))

    _print("\n-- planned training memory (XLA memory_analysis of the compiled AdamW step) --")
    t = time.perf_counter()
    plan = memory_plan(classify, base, delta, encoder, head_shapes, s)
    _print(
        f"batch {s['batch_size']} x {s['max_length']} tokens, float32, abstract inputs, "
        f"donated state  [planned in {time.perf_counter() - t:.1f} s]"
    )
    _print(f"{'':18}{'arguments':>12}{'outputs':>12}{'aliased':>12}{'temp':>12}{'peak':>12}")
    for name, report in plan.items():
        _print(
            f"{name:18}"
            + "".join(
                f"{_mib(v):>12}"
                for v in (report.argument, report.output, report.alias, report.temp, report.peak)
            )
        )
    ratio = plan["full fine-tuning"].peak / plan["LoRA"].peak
    saved = plan["full fine-tuning"].peak - plan["LoRA"].peak
    _print(
        f"full fine-tuning needs {ratio:.2f}x LoRA's peak memory: LoRA saves {_mib(saved)} of "
        "weight gradients and AdamW moments; the rest is mostly activations kept for the "
        "backward pass, which grow with batch x tokens"
    )

    _print("\n-- step time (one AdamW step at that shape, full and LoRA timed side by side) --")
    t = time.perf_counter()
    step = step_times(classify, base, delta, encoder, head_shapes, s, rounds=1 if args.quick else 5)
    _print(
        f"full fine-tuning {step['full fine-tuning'] * 1e3:.0f} ms, LoRA {step['LoRA'] * 1e3:.0f} "
        f"ms: LoRA takes {step['LoRA'] / step['full fine-tuning']:.2f}x full fine-tuning's step "
        f"(median of {1 if args.quick else 5}; measured in {time.perf_counter() - t:.0f} s)"
    )

    results: list[tuple[str, int, float, float]] = []  # (method, trainable, accuracy, seconds)

    _print("\n-- 1. baseline: frozen encoder, trained classifier head --")
    t = time.perf_counter()
    features = jax.jit(
        lambda ids, mask: mean_pool(
            BertModel(model_config).apply({"params": encoder}, ids, mask), mask
        )
    )
    train_features = predict(features, train_data, buckets, "encode train")
    test_features = predict(features, test_data, buckets, "encode test ")
    probe = fit_probe(train_features, train_data.labels, seed=args.seed)
    test_logits = test_features @ np.asarray(probe["kernel"]) + np.asarray(probe["bias"])
    baseline = accuracy(test_logits, test_data.labels)
    results.append(("frozen + head", head_size, baseline, time.perf_counter() - t))
    _print(f"test accuracy {baseline:.2%}  ({results[-1][3]:.0f} s)")

    steps = s["steps"] or s["epochs"] * steps_per_epoch(train_data, s["batch_size"], buckets)
    epochs = steps / steps_per_epoch(train_data, s["batch_size"], buckets)
    _print(
        f"\n-- 2. LoRA: rank {config.rank}, alpha {s['alpha']:g}, targets {s['targets']}, "
        f"{steps} steps ({epochs:.1f} epochs) of {s['batch_size']}, lr {s['lr']:g} --"
    )
    t = time.perf_counter()
    lora_tx = adamw(s["lr"], steps)  # (delta, head): every leaf of both trains

    def lora_logits(trainable: Any, frozen: Any, ids: Any, mask: Any, key: Any) -> jax.Array:
        del key  # the demo trains without dropout (neither LoRA's nor the head's)
        d, head = trainable
        return lora_classify(frozen, d, head, ids, mask)

    delta, lora_head = fit(
        make_step(lora_logits, lora_tx),
        (delta, probe),
        lora_tx,
        base,
        train_data,
        steps=steps,
        batch_size=s["batch_size"],
        buckets=buckets,
        seed=args.seed,
        desc="LoRA train  ",
    )
    lora_eval = jax.jit(lora_classify)
    lora_test = predict(
        lambda ids, mask: lora_eval(base, delta, lora_head, ids, mask),
        test_data,
        buckets,
        "LoRA eval   ",
    )
    lora_accuracy = accuracy(lora_test, test_data.labels)
    results.append(("LoRA", count.trainable + head_size, lora_accuracy, time.perf_counter() - t))
    _print(f"test accuracy {lora_accuracy:.2%}  ({results[-1][3]:.0f} s)")

    _print("\n-- merge: jaxlora.merge(base, delta), then the plain model --")
    merged = jaxlora.merge(base, delta)
    plain_eval = jax.jit(classify)
    merged_test = predict(
        lambda ids, mask: plain_eval(merged, lora_head, ids, mask),
        test_data,
        buckets,
        "merged eval ",
    )
    agree = float(np.mean(merged_test.argmax(-1) == lora_test.argmax(-1)))
    gap = float(np.max(np.abs(merged_test - lora_test)))
    merged_ok = gap <= _MERGE_TOLERANCE
    _print(
        f"merged vs adapted: {agree:.2%} of predictions agree, max |logit diff| = {gap:.2e} "
        f"({'ok' if merged_ok else 'MISMATCH'}, tolerance {_MERGE_TOLERANCE:g})"
    )

    out = args.out if args.out is not None else pathlib.Path(tempfile.mkdtemp(prefix="jaxlora-"))
    _save(out, delta, lora_head, config)
    _print(
        f"saved to {out}: adapter {_size_kb(out / 'adapter'):.1f} KB "
        f"({jaxlora.adapter_nbytes(delta) / 1024:.1f} KB of arrays; jaxlora.save_adapter), "
        f"classifier head {_size_kb(out / 'classifier.safetensors'):.1f} KB; "
        f"the base model is {_mib(_nbytes(encoder))}"
    )

    if args.full:
        _print(
            f"\n-- 3. full fine-tuning: all {_nbytes(encoder) // 4 + head_size:,} parameters, "
            f"{steps} steps of {s['batch_size']}, lr {s['full_lr']:g} --"
        )
        t = time.perf_counter()
        full_tx = adamw(s["full_lr"], steps)
        params, full_head = fit(
            make_step(lambda tr, _, ids, mask, key: classify(*tr, ids, mask), full_tx),
            (encoder, probe),
            full_tx,
            None,
            train_data,
            steps=steps,
            batch_size=s["batch_size"],
            buckets=buckets,
            seed=args.seed,
            desc="full train  ",
        )
        full_test = predict(
            lambda ids, mask: plain_eval(params, full_head, ids, mask),
            test_data,
            buckets,
            "full eval   ",
        )
        full_accuracy = accuracy(full_test, test_data.labels)
        results.append(
            (
                "full fine-tuning",
                count.total - count.trainable + head_size,
                full_accuracy,
                time.perf_counter() - t,
            )
        )
        _print(f"test accuracy {full_accuracy:.2%}  ({results[-1][3]:.0f} s)")

    _print("\n== summary ==")
    _print(
        f"{'method':18}{'trainable':>13}{'test acc':>10}{'time':>8}{'step':>9}"
        f"{'planned memory':>16}"
    )
    if not args.full:  # its step is timed and planned all the same
        full_trainable = count.total - count.trainable + head_size
        results.append(("full fine-tuning", full_trainable, float("nan"), float("nan")))
    for method, trainable, acc, seconds in results:
        memory = _mib(plan[method].peak) if method in plan else ""
        ms = f"{step[method] * 1e3:.0f} ms" if method in step else ""
        acc_s = "--" if math.isnan(acc) else f"{acc:.2%}"
        sec_s = "--" if math.isnan(seconds) else f"{seconds:.0f}s"
        _print(f"{method:18}{trainable:>13,}{acc_s:>10}{sec_s:>8}{ms:>9}{memory:>16}")
    if not args.full:
        _print("(full fine-tuning: step time and memory only; --full trains it)")
    _print(f"total time {time.perf_counter() - t_start:.0f} s")
    if not merged_ok:
        _print("FAILED: the merged model does not match the adapted one")
        return 1
    if not args.quick and lora_accuracy <= baseline:
        _print("FAILED: LoRA did not beat the frozen-encoder baseline")
        return 1
    return 0


def _nbytes(tree: Any) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
