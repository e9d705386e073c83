"""Tests for jaxlora.apps.demo: the quick end-to-end run, bucketing, metrics, progress bars."""

import argparse
import re

import jax
import numpy as np
import pytest
import safetensors.numpy

import jaxlora
from jaxlora.apps import cli, demo
from jaxlora.apps.demo import Encoded, _main, _training, accuracy, bucket_lengths, make_batches


def _encoded(lengths, seed=0):
    """Token ids 1.. on the first ``length`` positions of each row, then padding."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = rng.integers(1, 100, (len(lengths), width)).astype(np.int32)
    mask = (np.arange(width)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    labels = rng.integers(0, 2, len(lengths)).astype(np.int32)
    return Encoded(ids * mask, mask, labels)


# --- the command, end to end -------------------------------------------------------------------


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    code = cli.main(["demo", "--quick", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, out
    for section in (
        "-- parameters --",
        "trainable params:",
        "adapted weights",
        "planned training memory",
        "full fine-tuning needs",
        "-- step time (one AdamW step",
        "x full fine-tuning's step",
        "-- 1. baseline",
        "-- 2. LoRA",
        "merged vs adapted:",
        "(ok, tolerance",
        "saved to",
        "== summary ==",
    ):
        assert section in out, f"{section!r} missing from:\n{out}"
    summary = out[out.index("== summary ==") :]
    # LoRA's step time beside full fine-tuning's, measured even without --full
    assert re.search(r"\nLoRA .* \d+ ms .*MiB", summary), summary
    assert re.search(r"\nfull fine-tuning .* -- .* \d+ ms .*MiB", summary), summary
    assert "LoRA train" in err and "encode test" in err  # the progress bars
    assert (tmp_path / "classifier.safetensors").is_file()
    assert any(p.is_file() for p in (tmp_path / "adapter").rglob("*"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--lr", "-1"], "--lr must be a finite positive number"),
        (["--lr", "inf"], "--lr must be a finite positive number, got inf"),
        (["--full-lr", "nan"], "--full-lr must be a finite positive number, got nan"),
        (["--rank", "100000"], "--rank 100000 exceeds the encoder's width (384)"),
        (["--max-length", "100000"], "exceeds the encoder's 512 positions"),
        (["--out", "FILE"], "is a file; pass a directory"),
        (["--alpha", "inf"], "alpha must be a finite number > 0"),
        (["--targets", "nothing_matches_this"], "matched no"),  # checked on the encoder's shapes
        (["--targets", "query"], None),
        (["--targets", ","], "names no target"),
        (["--out", "ADAPTER"], "already exists"),
    ],
)
def test_bad_flags_exit_2_with_one_line_before_loading_anything(
    tmp_path, monkeypatch, capsys, flags, message
):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "file").write_text("")
    paths = {"ADAPTER": str(tmp_path), "FILE": str(tmp_path / "file")}
    flags = [paths.get(f, f) for f in flags]
    loaded = []
    monkeypatch.setattr(_main, "load_rotten_tomatoes", lambda: loaded.append(1) or ([], []))
    monkeypatch.setattr(_main, "run_on", lambda *a: 0)
    code = cli.main(["demo", "--quick", *flags])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0 and loaded
        return
    assert code == 2 and not loaded
    assert err.count("\n") == 1 and err.startswith("jaxlora demo: error: ") and message in err


@pytest.mark.parametrize("dora", [False, True])
def test_save_writes_adapter_and_head(tmp_path, dora):
    params = {"query": {"kernel": np.ones((4, 6), np.float32)}, "norm": {"scale": np.ones(6)}}
    config = jaxlora.LoraConfig(rank=2, targets="query", use_dora=dora)
    _, delta = jaxlora.split(params, config, key=jax.random.key(0))
    head = {"kernel": np.zeros((6, 2), np.float32), "bias": np.zeros(2, np.float32)}
    _main._save(tmp_path, delta, head, config)
    assert sorted(safetensors.numpy.load_file(tmp_path / "classifier.safetensors")) == [
        "bias",
        "kernel",
    ]
    assert _main._size_kb(tmp_path / "adapter") > 0
    restored, restored_config = jaxlora.load_adapter(tmp_path / "adapter")
    assert restored_config == config
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(delta), strict=True):
        np.testing.assert_array_equal(got, want)


def test_flags_override_quick_defaults_and_bad_values_raise():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    settings = _main._settings(parser.parse_args(["--quick", "--rank", "2", "--lr", "0.1"]))
    assert settings["rank"] == 2 and settings["lr"] == 0.1
    assert settings["max_length"] == demo.QUICK["max_length"]
    assert _main._settings(parser.parse_args([]))["epochs"] == demo.DEFAULTS["epochs"]
    with pytest.raises(ValueError, match="--batch-size must be positive"):
        _main._settings(parser.parse_args(["--batch-size", "0"]))
    with pytest.raises(ValueError, match="--steps must be positive"):
        _main._settings(parser.parse_args(["--steps", "-1"]))
    with pytest.raises(ValueError, match="--full-lr must be a finite positive number"):
        _main._settings(parser.parse_args(["--full-lr", "0"]))


# --- bucketing ---------------------------------------------------------------------------------


def test_bucket_lengths():
    assert bucket_lengths(64) == (32, 64)
    assert bucket_lengths(32) == (32,)
    assert bucket_lengths(20) == (20,)
    assert bucket_lengths(256, smallest=64) == (64, 128, 256)
    with pytest.raises(ValueError, match="must be positive"):
        bucket_lengths(0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_make_batches_covers_every_example_once_in_bucket_shapes(shuffle):
    lengths = [3, 9, 16, 5, 12, 2, 7, 16, 1, 8, 11]
    data = _encoded(lengths)
    rng = np.random.default_rng(1) if shuffle else None
    batches = make_batches(data, 3, (8, 16), rng=rng)
    seen = []
    for batch in batches:
        assert batch.ids.shape in {(3, 8), (3, 16)} and batch.mask.shape == batch.ids.shape
        real = batch.mask[batch.valid].sum(1)
        # every example sits in the shortest bucket that holds it
        assert np.all(real <= batch.ids.shape[1])
        if batch.ids.shape[1] == 16:
            assert np.all(real > 8)
        # filler rows: label 0 and one mask token, so that no row is empty
        assert np.all(batch.mask[~batch.valid].sum(1) == 1)
        for ids, mask, label in zip(
            batch.ids[batch.valid], batch.mask[batch.valid], batch.labels[batch.valid], strict=True
        ):
            seen.append((tuple(ids[mask == 1]), int(label)))
    expected = [
        (tuple(ids[mask == 1]), int(label))
        for ids, mask, label in zip(data.ids, data.mask, data.labels, strict=True)
    ]
    assert sorted(seen) == sorted(expected)
    assert len(batches) == _training.steps_per_epoch(data, 3, (8, 16))
    if not shuffle:
        assert seen == [e for e, n in zip(expected, lengths, strict=True) if n <= 8] + [
            e for e, n in zip(expected, lengths, strict=True) if n > 8
        ]


def test_make_batches_shuffles_differently_per_generator_state():
    data = _encoded(list(range(1, 33)))
    rng = np.random.default_rng(0)
    first = [
        b.labels.tolist() + b.ids[:, 0].tolist() for b in make_batches(data, 4, (32,), rng=rng)
    ]
    second = [
        b.labels.tolist() + b.ids[:, 0].tolist() for b in make_batches(data, 4, (32,), rng=rng)
    ]
    assert first != second


def test_make_batches_errors():
    data = _encoded([4, 10])
    with pytest.raises(ValueError, match="longest bucket is 8"):
        make_batches(data, 2, (8,))
    with pytest.raises(ValueError, match="batch_size must be positive"):
        make_batches(data, 0, (16,))


def test_predict_returns_rows_in_data_order():
    data = _encoded([3, 12, 1, 16, 7, 9, 2], seed=3)
    logits = _training.predict(
        lambda ids, mask: np.stack([ids.sum(1), mask.sum(1)], axis=1),
        data,
        (8, 16),
        "t",
        batch_size=2,
    )
    np.testing.assert_array_equal(logits, np.stack([data.ids.sum(1), data.lengths], axis=1))


# --- metrics and the probe ---------------------------------------------------------------------


def test_accuracy():
    logits = np.array([[0.2, 0.1], [0.0, 1.0], [3.0, -1.0], [1.0, 2.0]])
    assert accuracy(logits, np.array([0, 1, 1, 1])) == 0.75
    with pytest.raises(ValueError, match="one label per row"):
        accuracy(logits, np.array([0, 1]))
    with pytest.raises(ValueError, match="one label per row"):
        accuracy(np.zeros((0, 2)), np.zeros(0, int))


def test_probe_folds_standardization_into_a_plain_head():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    # separable along feature 2, with a large offset and scale the fold must undo
    features = rng.normal(size=(200, 5)).astype(np.float32)
    features[:, 2] = 100.0 + 20.0 * (2 * labels - 1) + rng.normal(size=200)
    head = _training.fit_probe(features, labels, seed=0)
    assert head["kernel"].shape == (5, 2) and head["bias"].shape == (2,)
    logits = features @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    assert accuracy(logits, labels) == 1.0


# --- progress bar ------------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_demo_with_dora_on_a_4_bit_base(tmp_path, capsys):
    code = cli.main(
        ["demo", "--quick", "--variant", "dora", "--quantize", "nf4", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "quantized to nf4" in out
    assert "100.00% of predictions agree" in out
    restored, config = jaxlora.load_adapter(tmp_path / "adapter")  # DoRA saves as any adapter
    assert (
        config.use_dora
        and type(restored["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]).__name__
        == "DoraNode"
    )
