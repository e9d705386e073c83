"""The LLM demo's task: Rotten Tomatoes sentences as chat prompts, answered in one word.

Each review becomes a chat (a short system message, the review and the
question) rendered with the model's own chat template and tokenized with its
own tokenizer; the answer is the first token of ``positive`` or ``negative``.
Batches are left-padded to a few fixed lengths, so the model's last position
is every prompt's answer position and each length compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["ANSWERS", "Prompts", "encode_prompts", "iterate_batches", "label_words", "messages"]

ANSWERS = ("negative", "positive")  # label 0, label 1
SYSTEM = "You label the sentiment of movie reviews."
QUESTION = "Is this review positive or negative? Answer with one word."


def messages(review: str) -> list[dict[str, str]]:
    """The chat of one review (before the template).

    Example:
        >>> messages("a witty film")[1]["content"]
        'Review: a witty film\\nIs this review positive or negative? Answer with one word.'
    """
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Review: {review}\n{QUESTION}"},
    ]


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Tokenized prompts and labels.

    Attributes:
        ids: one token list per prompt, the chat template applied, ending where the
            assistant's answer starts.
        labels: ``(n,)`` int: 0 negative, 1 positive.
        texts: the reviews (as truncated).
    """

    ids: list[list[int]]
    labels: np.ndarray
    texts: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def encode_prompts(
    examples: Sequence[tuple[str, int]],
    tokenizer: Any,
    template: Any,
    *,
    max_review_tokens: int,
) -> Prompts:
    """Tokenizes ``(review, label)`` examples as chat prompts.

    Args:
        examples: reviews and labels.
        tokenizer: a ``tokenizers.Tokenizer``.
        template: ``messages -> text``: the chat template with the generation prompt.
        max_review_tokens: reviews longer than this are cut to as many tokens.
    """
    ids, texts = [], []
    for text, _ in examples:
        review_ids = tokenizer.encode(text).ids
        if len(review_ids) > max_review_tokens:
            text = tokenizer.decode(review_ids[:max_review_tokens]).strip() + " ..."
        texts.append(text)
        ids.append(tokenizer.encode(template(messages(text))).ids)
    return Prompts(ids, np.asarray([label for _, label in examples], np.int32), texts)


def label_words(tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(answer ids, alternative ids)``: the token of each answer word, and capitalized too.

    Scoring takes the better of ``negative``/``Negative`` against the better of
    ``positive``/``Positive``, so that the base model is not marked wrong for a
    capital letter.
    """
    first = lambda word: tokenizer.encode(word).ids[0]
    answers = np.asarray([first(w) for w in ANSWERS])
    capitals = np.asarray([first(w.capitalize()) for w in ANSWERS])
    return answers, capitals


def iterate_batches(
    prompts: Prompts,
    batch_size: int,
    buckets: Sequence[int],
    *,
    pad_id: int,
    rng: np.random.Generator | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Left-padded batches ``(tokens, mask, positions, labels, rows)`` of one bucket each.

    With ``rng``, the order is shuffled (training); without, it is the data's order
    within each bucket (evaluation). Every batch has ``batch_size`` rows, so each
    bucket compiles once: a short last batch is filled with copies of its first
    prompt, whose ``rows`` entry is ``-1``.
    """
    lengths = np.asarray([len(p) for p in prompts.ids])
    if lengths.max() > buckets[-1]:
        raise ValueError(f"a prompt of {lengths.max()} tokens exceeds the longest bucket")
    which = np.searchsorted(np.asarray(buckets), lengths)
    batches = []
    for bucket in range(len(buckets)):
        rows = np.flatnonzero(which == bucket)
        if rng is not None:
            rows = rng.permutation(rows)
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    for rows in batches:
        length = buckets[which[rows[0]]]
        rows = np.concatenate([rows, np.full(batch_size - len(rows), -1)]).astype(np.int64)
        tokens = np.full((batch_size, length), pad_id, np.int32)
        mask = np.zeros((batch_size, length), bool)
        for r, row in enumerate(rows):
            ids = prompts.ids[row if row >= 0 else rows[0]]
            tokens[r, length - len(ids) :], mask[r, length - len(ids) :] = ids, True
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        yield tokens, mask, positions, prompts.labels[np.maximum(rows, 0)], rows
