"""The demo's data: a tokenized set, padded batches in a few fixed lengths, accuracy."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Batch", "Encoded", "accuracy", "bucket_lengths", "encode", "make_batches"]


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


def encode(tokenizer: Any, examples: Sequence[tuple[str, int]]) -> Encoded:
    batch = tokenizer([text for text, _ in examples])
    labels = np.array([label for _, label in examples], np.int32)
    return Encoded(batch["input_ids"], batch["attention_mask"], labels)
