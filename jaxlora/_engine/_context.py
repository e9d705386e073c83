"""What one evaluation of the interpreter carries: the fallback policy and its errors.

``Context`` holds the fallback policy (warn once, or raise under ``strict``),
the dropout keys of the use sites and whether derivatives must allow forward
mode; ``bind`` runs one jaxpr equation as JAX would.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax

from jaxlora._engine import _adapted
from jaxlora._engine._adapted import Adapted


class FallbackWarning(UserWarning):
    """A use of an adapted weight that the engine could not factor: it merged the weight there."""


class FallbackError(ValueError):
    """Raised in strict mode where the engine would otherwise merge a weight at its use."""


@dataclasses.dataclass(frozen=True)
class Squared:
    """``v ⊙ v`` of an adapted weight, kept unevaluated: a weight norm sums it over inputs."""

    v: Adapted


@dataclasses.dataclass
class Context:
    """What one evaluation needs beyond the values: fallback policy, dropout keys, and whether
    derivatives must allow forward mode (then no ``custom_vjp``: see ``_backward``)."""

    strict: bool
    warned: set[tuple[str, str]]
    dropout_key: jax.Array | None = None
    forward_mode: bool = False
    sites: int = 0

    def next_key(self) -> jax.Array | None:
        """A fresh key for the next use site (deterministic in trace order)."""
        self.sites += 1
        if self.dropout_key is None:
            return None
        return jax.random.fold_in(self.dropout_key, self.sites)

    def child(self, key: jax.Array | None, *, forward_mode: bool = False) -> Context:
        return Context(self.strict, self.warned, key, self.forward_mode or forward_mode)

    def fallback(self, primitive: str, v: Adapted) -> jax.Array:
        if not v.has_factors:  # a quantized weight without adapter: dequantize it here
            return _adapted.materialize(v)
        if v.route is not None:
            raise FallbackError(
                f"`{primitive}` uses the adapted weight {v.path!r} in a way the use-site engine "
                "cannot factor, and with adapter_ids (a different adapter per example) there is "
                "no single merged weight to fall back to. Serve this model one adapter at a time."
            )
        if self.strict:
            raise FallbackError(
                f"`{primitive}` uses the adapted weight {v.path!r} in a way the use-site "
                "engine cannot factor, and strict=True forbids merging it there. Use "
                "strategy='merge', strict=False (merges this weight at this use only), "
                "or change how the model uses the weight."
            )
        if (primitive, v.path) not in self.warned:
            self.warned.add((primitive, v.path))
            warnings.warn(
                f"jaxlora: `{primitive}` uses the adapted weight {v.path!r} in a way the "
                "use-site engine cannot factor; it merges W + s·a@b at this use only.",
                FallbackWarning,
                stacklevel=2,
            )
        return _adapted.materialize(v)


def bind(eqn: Any, invals: list) -> list:
    """Runs the equation ``eqn`` on ``invals`` as JAX would (its context and parameters)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]
