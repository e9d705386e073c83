"""Smoke tests for ``benchmarks/``: every benchmark's ``--quick`` run exits 0 and prints its tables.

The benchmarks are the modules ``benchmarks/*.py`` whose names do not start
with ``_``, found on disk, so a new one is smoke-tested without being listed
here. Each runs as ``python -m benchmarks.NAME --quick`` in a subprocess from
the repository root, the way the docstrings tell a user to run it. Its numbers
at tiny sizes mean nothing; what is checked is that the code still runs end to
end, that the progress bars go to stderr, not into the tables, and, for the
benchmarks listed in ``TABLES``, that every table's header line (its column
names) reaches stdout and that a known progress bar is on stderr.

The subprocess inherits this process's environment, ``XLA_FLAGS`` included,
so it sees the root ``conftest.py``'s 8 simulated CPU devices and its
memory-minimizing scheduler. That is deliberate: the benchmarks place
everything on the default device, so neither flag changes which code runs
(the memory benchmarks set the scheduler flag themselves anyway; a --quick run
took the same time with and without the flags); running them with several
devices visible also checks that none of them assumes a single-device host;
and stripping the flags again would mean guessing which ones conftest added
and which ones a developer set on purpose.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# 9 runs of 5-80 s, about 5 minutes in all on 2 shared, loaded cores: marked slow.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # for a hung run; the slowest, peers, takes 45-85 s on 2 loaded cores

# The benchmarks: benchmarks/*.py, less the package's __init__ and private helpers (_common).
BENCHMARKS = sorted(
    p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_")
)

# For a benchmark listed here: the column names of each of its tables' header lines (each tuple must
# stand on one line of stdout) and the label of one of its progress bars (on stderr).
TABLES: dict[str, tuple[list[tuple[str, ...]], str]] = {
    "gpu": ([("method", "step / jaxlora", "tokens/s", "planned peak")], "train steps"),
    "memory": (
        [("model", "remat", "targets", "full GiB", "merge", "use-site", "floor", "use/floor")],
        "memory plans",
    ),
    "moe": (
        [
            ("targets", "full MiB", "merge", "use-site", "floor", "use/floor", "use/merge"),
            ("step", "ms", "/ floor", "/ full"),
        ],
        "memory plans",
    ),
    "multi": (
        [
            ("prefill", "ms", "vs 1 adapter", "vs plain", "vs merged"),
            ("decode", "ms", "vs 1 adapter", "vs plain", "vs merged"),
            ("routing crossover", "distinct", "gather ms", "grouped ms", "grouped/gather"),
            ("decode step", "temp MiB", "peak MiB"),
            ("multi-tenant training", "N", "one step ms", "N steps ms", "N steps / one"),
        ],
        "training 8 adapters",
    ),
    "peers": (
        [("method", "trainable", "step ms", "time/ref", "MiB", "mem/ref", "GFLOP", "loss0")],
        "train steps",
    ),
    "qlora": (
        [
            ("model", "full FT", "LoRA", "QLoRA", "4-bit base", "B/param", "QLoRA-qbase"),
            ("||ΔW||/||W||", "float merge", "requantize=True"),
            ("CPU step time", "QLoRA/LoRA"),
        ],
        "memory plans",
    ),
    "quant_error": (
        [("format", "dq", "MSE", "MSE/nf4", "max |err|", "bytes/param", "quant ms")],
        "formats",
    ),
    "speed": ([("measure", "ratio", "bar")], "MiniLM train steps"),
    "variants": (
        [("variant", "trainable", "% model", "lr", "accuracy", "loss", "step/LoRA")],
        "pretrain",
    ),
}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return proc


def _has_line(text: str, columns: tuple[str, ...]) -> bool:
    return any(all(c in line for c in columns) for line in text.splitlines())


def _rows(text: str) -> set[str]:
    """The first cell of every line: the row labels of a table."""
    return {line.split("  ")[0] for line in text.splitlines()}


def test_tables_name_only_benchmarks_that_exist():
    stale = sorted(set(TABLES) - set(BENCHMARKS))
    assert not stale, f"TABLES lists {stale}, not in benchmarks/; found {BENCHMARKS}"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_quick_run_prints_its_tables(name):
    proc = _run(["-m", f"benchmarks.{name}", "--quick"])
    assert "it/s]" not in proc.stdout and "s/it]" not in proc.stdout  # bars stay off stdout
    if name not in TABLES:  # a new benchmark: it runs; its tables are not described yet
        return
    headers, bar = TABLES[name]
    for columns in headers:
        assert _has_line(proc.stdout, columns), f"no line with {columns} in:\n{proc.stdout}"
    assert bar in proc.stderr, f"no {bar!r} progress bar on stderr:\n{proc.stderr[-3000:]}"
    if name == "peers":  # every installed peer has its row; a missing one is named
        if importlib.util.find_spec("qwix") is None:
            assert "skipped the Qwix rows: qwix is not installed" in proc.stdout
        else:
            assert {"Qwix", "Qwix QLoRA"} <= _rows(proc.stdout)
        assert "checks passed" in proc.stdout


def test_peers_skips_the_peers_that_are_not_installed():
    # qwix and the torch stack hidden as if not installed (a None in sys.modules makes
    # importlib.util.find_spec return None): the JAX rows still run and are checked.
    hidden = ["qwix", "torch", "transformers", "peft"]
    code = (
        f"import runpy, sys; sys.modules.update(dict.fromkeys({hidden})); "
        "sys.argv[1:] = ['--quick', '--no-qlora', '--no-rss']; "
        "runpy.run_module('benchmarks.peers', run_name='__main__', alter_sys=True)"
    )
    proc = _run(["-c", code])
    assert "skipped the Qwix rows: qwix is not installed" in proc.stdout
    assert "skipped the PEFT row: torch, transformers or peft is not installed" in proc.stdout
    rows = _rows(proc.stdout)
    assert {"jaxlora", "jaxlora (NNX model)", "nnx.LoRA", "floor (no adapter)"} <= rows
    assert not any(row.startswith(("Qwix", "PEFT")) for row in rows)
    assert "checks passed" in proc.stdout
