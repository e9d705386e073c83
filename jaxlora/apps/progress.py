"""Progress bars for the apps' long loops: ``tqdm``, with one setting for all of them."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress"]


def progress(total: int, desc: str, **kwargs: Any) -> tqdm:
    """A ``tqdm`` bar on stderr for ``total`` steps, labelled ``desc``.

    Redrawn at most twice a second, so that a log file gets a few lines per
    minute, not one per step.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> with progress(3, "work", file=out) as bar:
        ...     for _ in range(3):
        ...         bar.update()
        >>> "work" in out.getvalue() and "3/3" in out.getvalue()
        True
    """
    options: dict[str, Any] = {"file": sys.stderr, "mininterval": 0.5, "dynamic_ncols": True}
    return tqdm(total=total, desc=desc, **{**options, **kwargs})
