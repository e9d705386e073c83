"""``LoraConfig``: which weights to adapt, and how."""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlora import _paths

INITS = ("gaussian", "kaiming", "pissa", "olora")

_CONFIG_KINDS: dict[str, type] = {}


def register_config(kind: str) -> Callable[[type], type]:
    """Registers a config class under ``kind``, the name adapter checkpoints store.

    ``LoraConfig`` is ``"lora"``; :mod:`jaxlora.variants` registers its configs.
    """

    def register(cls: type) -> type:
        if _CONFIG_KINDS.get(kind, cls).__qualname__ != cls.__qualname__:
            raise ValueError(f"config kind {kind!r} is taken by {_CONFIG_KINDS[kind].__name__}")
        cls.kind = kind  # type: ignore[attr-defined]
        _CONFIG_KINDS[kind] = cls
        return cls

    return register


def config_type(kind: str) -> type:
    """The config class registered under ``kind``.

    Raises:
        ValueError: for an unknown kind.

    Example:
        >>> import jaxlora
        >>> from jaxlora._config import config_type
        >>> config_type("lora") is jaxlora.LoraConfig
        True
    """
    try:
        return _CONFIG_KINDS[kind]
    except KeyError:
        raise ValueError(
            f"no adapter config has kind {kind!r}; known kinds: {sorted(_CONFIG_KINDS)}"
        ) from None


def check_node_matches(
    path: str, node: Any, *, kind: str, rank: int, scale: float, dtype: Any, arrays: tuple[str, ...]
) -> None:
    """Raises unless ``node`` is the ``kind`` node of ``rank``, ``scale``, ``dtype`` a config makes.

    ``arrays`` names the node's fields whose dtype is the config's ``dtype``.
    """
    fix = "Pass the config the delta was made with."
    if getattr(node, "kind", None) != kind:
        raise ValueError(
            f"the adapter at {path!r} is a {type(node).__name__} (kind "
            f"{getattr(node, 'kind', None)!r}), but config makes {kind!r} adapters. {fix}"
        )
    if node.rank != rank:
        raise ValueError(
            f"the adapter at {path!r} has rank {node.rank}, but config gives that path rank "
            f"{rank}. {fix}"
        )
    if float(node.scale) != float(scale):
        raise ValueError(
            f"the adapter at {path!r} has scale {float(node.scale)!r}, but config gives that "
            f"path scale {float(scale)!r} (alpha / rank); the stored config would disagree with "
            f"the arrays. {fix}"
        )
    want = jnp.dtype(dtype)
    for name in arrays:
        found = jnp.dtype(getattr(node, name).dtype)
        if found != want:
            raise TypeError(
                f"the adapter at {path!r} has {name} of dtype {found.name}, but config.dtype is "
                f"{want.name}. {fix[:-1]}, or dataclasses.replace(config, dtype=jnp."
                f"{found.name}) if you cast the delta."
            )


@register_config("lora")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """A frozen, validated description of a LoRA adapter.

    For each targeted weight ``W`` (Flax layout ``(in, out)``) the model uses
    ``W + s · a @ b`` with ``a: (in, rank)``, ``b: (rank, out)`` and
    ``s = alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora``).

    Args:
        rank: the adapter rank ``r`` (PEFT's ``r``), at least 1.
        alpha: the scaling numerator (PEFT's ``lora_alpha``). ``None`` means twice
            each path's rank, so that the scale is 2 everywhere.
        targets: which parameters to adapt: a regex searched in ``/``-joined
            parameter paths (``'layers_0/attention/query/kernel'``), a list of such
            regexes, a preset (``"attention"``, ``"mlp"``, ``"all-linear"``) or a
            predicate ``(path, leaf) -> bool``. Leaves with fewer than two axes
            (biases, norm scales) and non-float leaves are never adapted.
        exclude: paths to leave out, in the same forms as ``targets``.
        dropout: dropout rate on the low-rank branch's input, in ``[0, 1)``.
        init: how ``a`` starts (``b`` starts at zero unless stated):
            ``"gaussian"`` (``a ~ N(0, std=1/rank)``, PEFT's ``"gaussian"``),
            ``"kaiming"`` (kaiming-uniform ``a``, PEFT's default), ``"pissa"`` (``a``,
            ``b`` from the top singular vectors of ``W``) or ``"olora"`` (from a QR
            decomposition of ``W``). For ``pissa`` and ``olora`` the base becomes
            ``W - s·a@b`` so that the model is unchanged at step 0.
        rslora: use the rank-stabilized scale ``alpha / sqrt(rank)``.
        use_dora: build DoRA adapters (:class:`jaxlora.variants.DoraNode`): the
            adapted weight is ``m · (W + s·a@b) / ||W + s·a@b||`` with a trainable
            magnitude ``m`` per output unit (Liu et al. 2024,
            https://arxiv.org/abs/2402.09353).
        rank_pattern: regex -> rank for some paths; the first regex found in a
            path wins.
        alpha_pattern: regex -> alpha for some paths; the first regex found wins.
        stacked_axes: how many leading axes of a weight index stacked layers
            (``nn.scan``, ``vmap``): an int for all targets or a mapping regex ->
            int. ``None`` means 0.
        input_axes: how many axes after the stacked ones are inputs: an int or a
            mapping regex -> int. ``None`` means 1, and weights with four or more
            non-stacked axes must then be described explicitly.
        dtype: the dtype of ``a`` and ``b``.

    Raises:
        ValueError: for out-of-range values or invalid regexes.
        TypeError: for values of the wrong type.

    Example:
        >>> import jaxlora
        >>> config = jaxlora.LoraConfig(rank=4, targets=["query", "value"])
        >>> config.scale_for("layers_0/query/kernel")
        2.0
        >>> jaxlora.LoraConfig(rank=4, rslora=True, alpha=8).scale_for("q")
        4.0
    """

    rank: int = 8
    alpha: float | None = None
    targets: _paths.Targets = "attention"
    exclude: _paths.Targets | None = None
    dropout: float = 0.0
    init: str = "gaussian"
    rslora: bool = False
    use_dora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    stacked_axes: int | Mapping[str, int] | None = None
    input_axes: int | Mapping[str, int] | None = None
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        _check_int("rank", self.rank, minimum=1)
        if self.alpha is not None:
            _check_positive("alpha", self.alpha)
        check_unit_interval_open_right("dropout", self.dropout)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}; got {self.init!r}")
        check_bool("rslora", self.rslora)
        check_bool("use_dora", self.use_dora)
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.exclude, list):
            object.__setattr__(self, "exclude", tuple(self.exclude))
        _paths.target_predicate(self.targets, self.exclude)  # validates both
        for name, check in (
            ("rank_pattern", lambda k, v: _check_int(k, v, minimum=1)),
            ("alpha_pattern", _check_positive),
        ):
            pattern = getattr(self, name)
            if not isinstance(pattern, Mapping):
                raise TypeError(f"{name} must be a mapping regex -> value; got {pattern!r}")
            for key, value in pattern.items():
                _paths.compile_pattern(key, f"{name} key")
                check(f"{name}[{key!r}]", value)
            object.__setattr__(self, name, types.MappingProxyType(dict(pattern)))
        for name, minimum in (("stacked_axes", 0), ("input_axes", 1)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, Mapping):
                for key, n in value.items():
                    _paths.compile_pattern(key, f"{name} key")
                    _check_int(f"{name}[{key!r}]", n, minimum=minimum)
                object.__setattr__(self, name, types.MappingProxyType(dict(value)))
            else:
                _check_int(name, value, minimum=minimum)
        check_float_dtype("dtype", self.dtype)

    def __hash__(self) -> int:
        return hash(tuple(_hashable(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def matcher(self) -> Callable[[str, Any], bool]:
        """The predicate ``(path, leaf) -> bool`` that ``targets`` and ``exclude`` define."""
        return _paths.target_predicate(self.targets, self.exclude)

    def check_targets(self, path: str) -> None:
        """Raises unless ``targets`` and ``exclude`` select ``path`` (a predicate is trusted).

        ``save_adapter`` calls it, so that a stored config would make the stored
        adapters; loading does not (a preset's definition may change between
        versions, and the stored adapters stay what they are).
        """
        by_name = not callable(self.targets) and not callable(self.exclude)
        if by_name and not self.matcher()(path, None):
            raise ValueError(
                f"the delta adapts {path!r}, but config's targets={self.targets!r} "
                f"(exclude={self.exclude!r}) leave that path out: the stored config would not "
                "make this adapter. Pass the config the delta was made with."
            )

    def rank_for(self, path: str) -> int:
        """The rank used at ``path`` (``rank_pattern`` first, then ``rank``)."""
        return int(_paths.first_match(self.rank_pattern, path, self.rank))

    def alpha_for(self, path: str) -> float:
        """The alpha used at ``path`` (``alpha_pattern``, then ``alpha``, then 2 × rank)."""
        default = 2.0 * self.rank_for(path) if self.alpha is None else self.alpha
        return float(_paths.first_match(self.alpha_pattern, path, default))

    def scale_for(self, path: str) -> float:
        """The scale ``s`` used at ``path``: ``alpha / rank``, or ``alpha / sqrt(rank)``."""
        rank = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(rank) if self.rslora else rank)

    def check_node(self, path: str, node: Any) -> None:
        """Raises unless ``node`` is the adapter this config makes at ``path``.

        Compares the node type (LoRA or DoRA), rank, scale and dtype; the
        checkpoint writer and reader call it so that a stored config never
        disagrees with the stored arrays.

        Raises:
            ValueError: for another node type, rank or scale.
            TypeError: for another dtype of ``a`` or ``b``.
        """
        check_node_matches(
            path,
            node,
            kind="dora" if self.use_dora else "lora",
            rank=self.rank_for(path),
            scale=self.scale_for(path),
            dtype=self.dtype,
            arrays=("a", "b"),
        )

    def layout_for(self, path: str, shape: tuple[int, ...]) -> _paths.Layout:
        """Reads the weight at ``path`` as ``stacked + inputs + outputs`` axes."""
        stacked = self.stacked_axes
        if isinstance(stacked, Mapping):
            stacked = _paths.first_match(stacked, path, None)
        inputs = self.input_axes
        if isinstance(inputs, Mapping):
            inputs = _paths.first_match(inputs, path, None)
        return _paths.read_layout(path, shape, stacked, inputs)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number; got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value}")


def check_bool(name: str, value: Any) -> None:
    """Raises a ``TypeError`` unless ``value`` is a bool (not a truthy string or number).

    Example:
        >>> from jaxlora._config import check_bool
        >>> check_bool("strict", True)
        >>> check_bool("strict", "False")
        Traceback (most recent call last):
        ...
        TypeError: strict must be True or False; got 'False' (str). A string such as ...
    """
    if isinstance(value, bool | np.bool_):
        return
    hint = ""
    if isinstance(value, str):
        hint = f" A string such as 'False' is truthy: pass {name}=False."
    raise TypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__}).{hint}")


def check_unit_interval_open_right(name: str, value: Any) -> None:
    """Raises unless ``value`` is a real number (not a bool) in ``[0, 1)``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float in [0, 1); got {value!r} ({type(value).__name__})")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1); got {value!r}")


def check_float_dtype(name: str, value: Any) -> None:
    """Raises a ``TypeError`` unless ``value`` names a floating-point dtype."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise TypeError(
            f"{name}={value!r} is not a dtype; pass a floating dtype such as jnp.float32 or "
            "jnp.bfloat16 (or the string 'float32')"
        ) from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype such as jnp.float32; got {value!r}")


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted(value.items()))
    return value
