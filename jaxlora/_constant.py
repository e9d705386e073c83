"""``Constant``: a frozen array held in an adapter node's static metadata (DoRA's base
column norms, imported VeRA projections), hashable and compared by content."""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np

from jaxlora._hosts import to_host

__all__ = ["Constant"]


class Constant:
    """A frozen array kept in a node's static metadata, outside the trainable tree.

    It is hashable and compares by content (a SHA-256 digest of dtype, shape
    and bytes, computed once), so two nodes holding equal constants have equal
    tree structures, ``jax.jit`` caches on it cheaply, and a checkpoint stores
    a constant shared by many nodes once. The value is a read-only numpy array.

    Args:
        value: the array (copied to the host; an array spanning several processes'
            devices is gathered, which every process must then do alike).

    Example:
        >>> import numpy as np
        >>> from jaxlora._constant import Constant
        >>> c = Constant(np.arange(3.0))
        >>> c == Constant(np.arange(3.0)), c.shape, c[1:].value.tolist()
        (True, (3,), [1.0, 2.0])
    """

    __slots__ = ("digest", "value")

    def __init__(self, value: Any) -> None:
        array = np.array(to_host(value))
        array.flags.writeable = False
        digest = hashlib.sha256()
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
        self.value = array
        self.digest = digest.hexdigest()

    @classmethod
    def of(cls, value: Any) -> Constant | None:
        """A constant of ``value``, or ``None`` when ``value`` is traced (no concrete value)."""
        if isinstance(value, jax.core.Tracer):
            return None
        return cls(value)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.value.dtype

    def __getitem__(self, index: Any) -> Constant:
        return Constant(self.value[index])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Constant) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"Constant(shape={self.shape}, dtype={self.dtype})"
