"""The README's quickstart runs as written (with its adapter saved to a temporary directory)."""

import pathlib
import re

import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


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
