"""Processes of a multi-controller run (``jax.distributed``): who writes, where all meet.

Under ``jax.distributed.initialize()`` every host runs the same program and one
global array may span devices that a process cannot address. The library's
file writers follow one rule: every process calls them (as SPMD code does), one
process (the primary, ``jax.process_index() == 0``) writes what is written once,
and all processes meet at named barriers so that none returns before the write
is committed. In a single process every helper here is the identity or a no-op.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = ["is_primary", "multi_process", "sync", "to_host"]


def multi_process() -> bool:
    """Whether this program runs as one of several processes (``jax.distributed``)."""
    return jax.process_count() > 1


def is_primary() -> bool:
    """Whether this process writes what is written once (process 0)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier every process passes with the same ``name`` (a no-op in one process)."""
    if multi_process():
        multihost_utils.sync_global_devices(name)


def to_host(array: Any) -> np.ndarray:
    """The whole value of ``array`` as numpy, on every process.

    An array spanning devices of other processes is gathered (a collective:
    every process must call this for the same arrays, in the same order);
    anything else is read in place.
    """
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)
