"""``python -m jaxlora`` / ``jaxlora``: the command-line entry point.

Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS = {
    "demo": ("jaxlora.apps.demo", "fine-tune a pretrained model with LoRA, end to end"),
    "demo-llm": (
        "jaxlora.apps.llm_demo",
        "fine-tune a chat LLM (SmolLM2-135M, GGUF) with LoRA and QLoRA, generate, export",
    ),
    "pod-demo": (
        "jaxlora.apps.pod",
        "one LoRA training run on 1 or N local processes joined by jax.distributed",
    ),
    "plan": ("jaxlora.apps.plan_cli", "plan training memory for full fine-tuning, LoRA and QLoRA"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` and runs the chosen subcommand; returns its exit code."""
    parser = argparse.ArgumentParser(prog="jaxlora", description="LoRA fine-tuning for JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args))


if __name__ == "__main__":
    sys.exit(main())
