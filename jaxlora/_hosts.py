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

__all__ = ["global_batch", "is_primary", "multi_process", "process_rows", "sync", "to_host"]


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


def process_rows(rows: Any) -> Any:
    """This process's share of a batch every process knows: its block of the leading axis.

    Process ``i`` of ``n`` gets rows ``[i·B/n, (i+1)·B/n)`` of each array (``B`` the
    batch size), which is what :func:`global_batch` expects on a mesh whose batch
    axis runs over the processes in order. In one process: ``rows`` unchanged.

    Args:
        rows: an array, or a tree of arrays with one leading batch axis ``B``.

    Raises:
        ValueError: if ``B`` does not divide among the processes.

    Example:
        >>> import numpy as np, jaxlora
        >>> jaxlora.process_rows(np.arange(4)).tolist()  # one process: all of them
        [0, 1, 2, 3]
    """
    n, i = jax.process_count(), jax.process_index()

    def share(x: Any) -> Any:
        size = np.shape(x)[0] if np.ndim(x) else None
        if size is None or size % n:
            raise ValueError(
                f"process_rows: a batch of {size} rows does not divide among {n} processes; "
                "make the global batch size a multiple of jax.process_count()"
            )
        return x[i * size // n : (i + 1) * size // n]

    return jax.tree.map(share, rows)


def global_batch(local: Any, sharding: jax.sharding.Sharding) -> Any:
    """The global arrays of which ``local`` is this process's rows, placed with ``sharding``.

    Every process calls it with the rows its own data loader read (or with
    :func:`process_rows` of a batch all know), so a training loop runs unchanged
    on one host or many: ``jax.make_array_from_process_local_data`` per leaf. In
    one process it is ``jax.device_put(local, sharding)``.

    Args:
        local: an array or a tree of arrays: this process's rows.
        sharding: where the global arrays live, usually
            ``NamedSharding(mesh, P("data"))`` (the batch axis over the data axis).

    Raises:
        TypeError: if ``sharding`` is not a ``jax.sharding.Sharding``.

    Example:
        >>> import jax, numpy as np, jaxlora
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((len(jax.devices()),), ("data",))
        >>> rows = jaxlora.process_rows(np.ones((8, 3), np.float32))
        >>> x = jaxlora.global_batch(rows, NamedSharding(mesh, P("data")))
        >>> x.shape, x.sharding.spec
        ((8, 3), P('data',))
    """
    if not isinstance(sharding, jax.sharding.Sharding):
        raise TypeError(
            f"global_batch: sharding must be a jax.sharding.Sharding such as "
            f"NamedSharding(mesh, P('data')); got {type(sharding).__name__}"
        )
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
    )
