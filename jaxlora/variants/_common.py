"""What the variant configs share with ``LoraConfig``: targets, exclusions and layouts."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from jaxlora import _paths
from jaxlora._config import LoraConfig, _check_int, _check_positive, _hashable

__all__ = ["TargetsConfig", "check_int", "check_positive", "check_unit_interval"]

check_int = _check_int
check_positive = _check_positive


def check_unit_interval(name: str, value: Any) -> None:
    """Raises unless ``value`` is a real number in ``(0, 1)``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < float(value) < 1:
        raise ValueError(f"{name} must be a float in (0, 1); got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetsConfig:
    """The fields every variant config shares with :class:`jaxlora.LoraConfig`.

    ``targets``, ``exclude``, ``dropout``, ``stacked_axes``, ``input_axes`` and
    ``dtype`` mean exactly what they mean there; they are validated by building
    the equivalent ``LoraConfig``, so the two never disagree.
    """

    targets: _paths.Targets = "attention"
    exclude: _paths.Targets | None = None
    dropout: float = 0.0
    stacked_axes: int | Mapping[str, int] | None = None
    input_axes: int | Mapping[str, int] | None = None
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        lora = self._as_lora()
        for name in ("targets", "exclude", "stacked_axes", "input_axes"):
            object.__setattr__(self, name, getattr(lora, name))  # lists -> tuples, etc.

    def __hash__(self) -> int:
        return hash(tuple(_hashable(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def _as_lora(self) -> LoraConfig:
        return LoraConfig(
            targets=self.targets,
            exclude=self.exclude,
            dropout=self.dropout,
            stacked_axes=self.stacked_axes,
            input_axes=self.input_axes,
            dtype=self.dtype,
        )

    def matcher(self) -> Callable[[str, Any], bool]:
        """The predicate ``(path, leaf) -> bool`` that ``targets`` and ``exclude`` define."""
        return _paths.target_predicate(self.targets, self.exclude)

    def layout_for(self, path: str, shape: tuple[int, ...]) -> _paths.Layout:
        """Reads the weight at ``path`` as ``stacked + inputs + outputs`` axes."""
        return self._as_lora().layout_for(path, shape)

    def check_targets(self, path: str) -> None:
        """Raises unless ``targets`` and ``exclude`` select ``path``, as LoraConfig's."""
        self._as_lora().check_targets(path)
