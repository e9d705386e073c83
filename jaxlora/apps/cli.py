"""``python -m jaxlora`` / ``jaxlora``: the command-line entry point.

Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen
subcommand's module is imported, so a command runs with just the extra it
needs installed (``jaxlora plan`` with the core alone, ``jaxlora demo`` with
``jaxlora[demo]``); a missing package is named in one line, with the extra
that provides it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name: (module, extra that provides its packages or None, help)
SUBCOMMANDS = {
    "demo": ("jaxlora.apps.demo", "demo", "fine-tune a pretrained model with LoRA, end to end"),
    "demo-llm": (
        "jaxlora.apps.llm_demo",
        "llm",
        "fine-tune a chat LLM (SmolLM2-135M, GGUF) with LoRA and QLoRA, generate, export",
    ),
    "pod-demo": (
        "jaxlora.apps.pod",
        "demo",
        "one LoRA training run on 1 or N local processes joined by jax.distributed",
    ),
    "plan": (
        "jaxlora.apps.plan_cli",
        None,
        "plan training memory for full fine-tuning, LoRA and QLoRA",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` and runs the chosen subcommand; returns its exit code.

    Example:
        >>> import contextlib, io
        >>> from jaxlora.apps.cli import main
        >>> out = io.StringIO()
        >>> with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        ...     main(["--help"])
        >>> "plan" in out.getvalue()
        True
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="jaxlora", description="LoRA fine-tuning for JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, extra, help_text) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = _import(name, module_name, extra)
            module.add_arguments(command)
    args = parser.parse_args(argv)
    return int(module.run(args))


def _import(name: str, module_name: str, extra: str | None):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] == "jaxlora":
            raise
        install = f"pip install 'jaxlora[{extra}]'" if extra else f"pip install {e.name}"
        print(f"jaxlora {name}: needs the {e.name!r} package; {install}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
