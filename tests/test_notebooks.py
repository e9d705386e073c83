"""The notebooks in ``notebooks/`` run top to bottom in a fresh kernel, so that they never rot.

Each notebook is executed with nbclient in a new IPython kernel of this interpreter, in a
temporary working directory; any cell error fails the test. The committed files must
carry no outputs, so that their diffs stay readable.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["quickstart", "qlora", "many_adapters"]
CELL_TIMEOUT_S = 600  # per cell; a whole notebook takes 20 to 70 s on 2 busy CPU cores
_KERNEL = "jaxlora-test"


def _install_kernelspec(jupyter_path: pathlib.Path) -> None:
    """Writes a kernelspec that starts an IPython kernel with this interpreter (sys.executable).

    A kernelspec of our own, found first through ``JUPYTER_PATH``, rather than the installed
    ``python3`` one, so that a kernelspec elsewhere on the machine (say in
    ``~/.local/share/jupyter``) cannot swap the interpreter.
    """
    spec = jupyter_path / "kernels" / _KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "jaxlora tests", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))


def _kernel_env() -> dict[str, str]:
    """The environment a user would have: no simulated devices (the suite's conftest adds 8)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env["MPLBACKEND"] = "Agg"
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    return env


def _jaxlora_warnings(nb) -> list[str]:
    """Warnings from jaxlora printed by the cells (a FallbackWarning means a slow path)."""
    found = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            text = output.get("text", "")
            if output.get("name") == "stderr" and "Warning" in text and "jaxlora" in text:
                found.append(text)
    return found


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4 and nb["cells"]
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, (
                f"{name}.ipynb is committed with outputs; clear them "
                "(jupyter nbconvert --clear-output --inplace notebooks/*.ipynb)"
            )


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    _install_kernelspec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(
        nb,
        kernel_name=_KERNEL,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=120,
        resources={"metadata": {"path": str(work)}},
    )
    try:
        client.execute(env=_kernel_env())
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{name}.ipynb failed:\n{e}", pytrace=False)
    warned = _jaxlora_warnings(nb)
    assert not warned, f"{name}.ipynb printed warnings from jaxlora: {warned}"
    images = [
        o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert images, f"{name}.ipynb shows no plot"
    assert not any(work.iterdir()), f"{name}.ipynb left files behind: {list(work.iterdir())}"
