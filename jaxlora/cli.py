"""``python -m jaxlora``: the command-line entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``jaxlora demo`` (or another subcommand) and returns the exit code."""
    parser = argparse.ArgumentParser(prog="jaxlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fine-tune a small model with LoRA, end to end")
    demo.add_argument("--rank", type=int, default=4)
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from jaxlora import _toy_demo

        return _toy_demo.run(rank=args.rank, steps=args.steps, seed=args.seed)
    return 2


if __name__ == "__main__":
    sys.exit(main())
