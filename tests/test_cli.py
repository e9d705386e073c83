"""The command line imports only the chosen subcommand, so each runs with just its own extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

# runs the CLI with some top-level packages made unimportable (as if not installed)
_BLOCKED = """
import importlib.abc, sys
blocked = set(sys.argv[1].split(","))
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
from jaxlora.apps.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _cli(blocked: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED, blocked, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("missing", ["tqdm", "tokenizers", "jinja2", "gguf"])
def test_plan_runs_without_the_demo_packages(missing):
    done = _cli(missing, "plan", "--help")
    assert done.returncode == 0, done.stderr
    assert "--rank" in done.stdout


def test_top_level_help_imports_no_subcommand():
    done = _cli("tqdm,tokenizers,jinja2,gguf", "--help")
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in ("demo", "demo-llm", "pod-demo", "plan"))


@pytest.mark.parametrize(
    ("command", "missing", "extra"),
    [("demo", "tokenizers", "demo"), ("demo-llm", "jinja2", "llm"), ("demo", "tqdm", "demo")],
)
def test_a_missing_package_is_named_with_its_extra(command, missing, extra):
    done = _cli(missing, command, "--help")
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "\n" not in line and repr(missing) in line and f"jaxlora[{extra}]" in line, line
