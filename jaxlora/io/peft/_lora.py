"""PEFT's LoRA format (``peft_type: "LORA"``), with DoRA's magnitude vectors (``use_dora``).

Per module ``m``: ``lora_A.weight`` of shape ``(r, in)`` and ``lora_B.weight``
of shape ``(out, r)`` (an ``nn.Embedding`` stores ``lora_embedding_A``
``(r, num_embeddings)`` and ``lora_embedding_B`` ``(embedding_dim, r)``, without
``.weight``); jaxlora's ``a`` is ``(in, r)`` and ``b`` is ``(r, out)``, so
``lora_A = aᵀ`` and ``lora_B = bᵀ``. Weights with several input or output axes
(DenseGeneral kernels) flatten row-major, as a ``torch.nn.Linear`` over the
flattened features lays them out. DoRA adds ``lora_magnitude_vector`` ``(out,)``
(no ``.weight``): jaxlora's ``m``. ``adapter_config.json`` holds ``r``,
``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` and ``use_rslora``, from
which PEFT recomputes each module's scale (the tensors hold none), and
``target_modules``: PEFT creates adapters only for the modules listed there and
silently ignores tensors of any other module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _paths
from jaxlora._config import LoraConfig
from jaxlora._node import AdapterNode, Constant, node_type
from jaxlora.io.peft._format import (
    Module,
    PeftCodec,
    host,
    most_common,
    pattern_value,
    register_codec,
)
from jaxlora.io.peft._reading import (
    check_dropout,
    config_options,
    weight_layout,
)

_LINEAR = {"A": ".lora_A.weight", "B": ".lora_B.weight"}
_EMBEDDING = {"A": ".lora_embedding_A", "B": ".lora_embedding_B"}
_MAGNITUDE = ".lora_magnitude_vector"


class LoraCodec(PeftCodec):
    """PEFT's LoRA files for :class:`jaxlora.LoraNode`, or for DoRA nodes with ``dora=True``."""

    peft_type = "LORA"
    name = "LoRA"

    def __init__(self, *, dora: bool = False) -> None:
        self.dora = dora
        self.name = "DoRA" if dora else "LoRA"
        self.kind = "dora" if dora else "lora"

    def reads(self, settings: Mapping[str, Any]) -> bool:
        return super().reads(settings) and bool(settings.get("use_dora")) == self.dora

    # -------------------------------------------------------------- writing

    def module_tensors(self, module: Module) -> dict[str, np.ndarray]:
        node = module.node
        names = _EMBEDDING if module.embedding else _LINEAR
        out = {names["A"]: host(node.a).T, names["B"]: host(node.b).T}
        if self.dora:
            out[_MAGNITUDE] = host(node.m)
        return {k: np.ascontiguousarray(v) for k, v in out.items()}

    def settings(self, modules: list[Module], config: Any) -> dict[str, Any]:
        if not isinstance(config, LoraConfig):
            raise TypeError(
                f"config must be a jaxlora.LoraConfig (the one the delta was made with); got "
                f"{type(config).__name__}"
            )
        per_module = {
            m.name: (
                m.node.rank,
                _alpha_for_scale(config, m.path, m.node.rank, np.float32(m.node.scale)),
            )
            for m in modules
        }
        rank = most_common(r for r, _ in per_module.values())
        alpha = most_common(a for _, a in per_module.values())
        return {
            "r": rank,
            "lora_alpha": alpha,
            "use_rslora": bool(config.rslora),
            "rank_pattern": {re.escape(m): r for m, (r, _) in per_module.items() if r != rank},
            "alpha_pattern": {re.escape(m): a for m, (_, a) in per_module.items() if a != alpha},
            "exclude_modules": None,
            "lora_dropout": float(config.dropout),
            "fan_in_fan_out": False,
            "bias": "none",
            "init_lora_weights": True,
            "use_dora": self.dora,
            "lora_bias": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    # -------------------------------------------------------------- reading

    def suffixes(self) -> Mapping[str, tuple[str, bool | None]]:
        out: dict[str, tuple[str, bool | None]] = {
            _LINEAR["A"]: ("A", False),
            _LINEAR["B"]: ("B", False),
            _EMBEDDING["A"]: ("A", True),
            _EMBEDDING["B"]: ("B", True),
        }
        if self.dora:
            out[_MAGNITUDE] = ("m", None)
        return out

    def check_settings(self, settings: dict[str, Any], file: Any) -> None:
        for field in ("r", "lora_alpha"):
            if field not in settings:
                raise ValueError(f"{file} has no {field!r}; it is not a PEFT LoRA config")
        settings["rank_pattern"] = settings.get("rank_pattern") or {}
        settings["alpha_pattern"] = settings.get("alpha_pattern") or {}
        settings.setdefault("use_rslora", False)
        check_dropout(settings, "lora_dropout", file)
        _check_types(settings, file)

    def read(
        self,
        path: str,
        weight: Any,
        layers: Mapping[tuple[int, ...], tuple[str, Mapping[str, tuple[str, np.ndarray]]]],
        settings: Mapping[str, Any],
        shared: Mapping[str, np.ndarray],
        config: Any,
    ) -> tuple[AdapterNode, dict[str, Any]]:
        factors = {index: self._factors(name, parts, settings) for index, (name, parts) in
                   layers.items()}  # fmt: skip
        first = next(iter(factors.values()))
        n_stacked = len(next(iter(factors)))
        n_in, rank = first["a"].shape
        n_out = first["b"].shape[1]
        for f in factors.values():
            if f["a"].shape != first["a"].shape or f["b"].shape != first["b"].shape:
                raise ValueError(
                    f"the layers of {path!r} have adapters of different shapes ({first['key']!r}: "
                    f"{first['a'].shape[::-1]}, {f['key']!r}: {f['a'].shape[::-1]}); a stacked "
                    "weight needs one rank for all layers. Load into unstacked (unscanned) params"
                )
            if np.float32(f["scale"]) != np.float32(first["scale"]):
                raise ValueError(
                    f"the layers of {path!r} have different scales ({first['key']!r}: "
                    f"{first['scale']}, {f['key']!r}: {f['scale']}); a stacked weight has one "
                    "scale. Load into unstacked (unscanned) params"
                )
        layout = weight_layout(
            path, tuple(weight.shape), n_stacked, n_in, n_out, first["key"], config
        )
        dtype = first["a"].dtype if config is None else jnp.dtype(config.dtype)
        # Cast on the host and device_put: an eager jnp cast compiles one program per shape.
        a = np.zeros((*layout.stacked, n_in, rank), dtype)
        b = np.zeros((*layout.stacked, rank, n_out), dtype)
        for index, f in factors.items():
            a[index], b[index] = f["a"], f["b"]
        dropout = float(settings["lora_dropout"]) if config is None else config.dropout
        fields: dict[str, Any] = {"a": jax.device_put(a), "b": jax.device_put(b)}
        if self.dora:
            w = _dense_matrix(weight, layout)
            base_norm = np.sqrt(np.sum(w * w, axis=-2))
            m = base_norm.copy()  # layers the file does not cover: m = ||W||, no change
            for index, f in factors.items():
                m[index] = f["m"]
            fields["m"] = jax.device_put(m.astype(np.float32))
            fields["base_norm"] = Constant(base_norm)
        node = node_type(self.kind)(
            **fields, scale=float(first["scale"]), layout=layout, dropout=dropout
        )
        return node, {"alpha": first["alpha"]}

    def _factors(
        self, name: str, parts: Mapping[str, tuple[str, np.ndarray]], settings: Mapping[str, Any]
    ) -> dict[str, Any]:
        for part, other in (("A", "B"), ("B", "A")):
            if part not in parts:
                raise ValueError(
                    f"{parts[other][0]!r} has no matching lora_{part} for module {name!r}; the "
                    "file is incomplete"
                )
        if self.dora and "m" not in parts:
            raise ValueError(
                f"{parts['A'][0]!r} has no lora_magnitude_vector for module {name!r}, but the "
                "file is a DoRA adapter (use_dora=true); the file is incomplete"
            )
        (key_a, a), (key_b, b) = parts["A"], parts["B"]
        if a.ndim != 2 or b.ndim != 2:
            if a.ndim == 4:
                raise NotImplementedError(
                    f"{key_a!r} has shape {a.shape}: a convolution adapter, which "
                    "jaxlora.io.peft does not read yet"
                )
            raise ValueError(f"{key_a!r} {a.shape} and {key_b!r} {b.shape} must both be 2-D")
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise ValueError(
                f"{key_a!r} has rank {rank} (shape {a.shape}) but {key_b!r} has rank "
                f"{b.shape[1]} (shape {b.shape}); lora_A is (r, in) and lora_B (out, r)"
            )
        file = settings["file"]
        expected_rank = int(pattern_value(settings["rank_pattern"], name, settings["r"]))
        if expected_rank != rank:
            raise ValueError(
                f"{key_a!r} has rank {rank}, but {file.name} gives {name!r} rank {expected_rank} "
                "(r and rank_pattern); PEFT could not load this file either"
            )
        alpha = pattern_value(settings["alpha_pattern"], name, settings["lora_alpha"])
        out = {"key": key_a, "a": a.T, "b": b.T, "alpha": alpha,
               "scale": _peft_scale(alpha, rank, bool(settings["use_rslora"]))}  # fmt: skip
        if self.dora:
            key_m, m = parts["m"]
            if m.shape != (b.shape[0],):
                raise ValueError(
                    f"{key_m!r} has shape {m.shape}, but {key_b!r} gives the module "
                    f"{b.shape[0]} outputs; a magnitude vector is (out,)"
                )
            out["m"] = m
        return out

    def config(
        self, adapted: Mapping[str, tuple[AdapterNode, dict[str, Any]]], settings: Any, config: Any
    ) -> LoraConfig:
        exact, options = config_options(
            adapted, config, dtype_field="a", dropout=float(settings["lora_dropout"])
        )
        ranks = {p: n.rank for p, (n, _) in adapted.items()}
        alphas = {p: info["alpha"] for p, (_, info) in adapted.items()}
        rank = most_common(ranks.values())
        alpha = most_common(alphas.values())
        return LoraConfig(
            rank=int(rank),
            alpha=alpha,
            targets=tuple(exact.values()),
            init="gaussian" if config is None else config.init,
            rslora=bool(settings["use_rslora"]),
            use_dora=self.dora,
            rank_pattern={exact[p]: r for p, r in ranks.items() if r != rank},
            alpha_pattern={exact[p]: a for p, a in alphas.items() if a != alpha},
            **options,
        )


def _check_types(settings: Mapping[str, Any], file: Any) -> None:
    """PEFT's numeric fields must be numbers, its patterns mappings of valid regexes."""
    for field in ("r",):
        value = settings[field]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{file} has {field}={value!r}; it must be a positive int")
    value = settings["lora_alpha"]
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{file} has lora_alpha={value!r}; it must be a finite number")
    if not isinstance(settings["use_rslora"], bool):
        raise ValueError(f"{file} has use_rslora={settings['use_rslora']!r}; it must be a bool")
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = settings[field]
        if not isinstance(pattern, Mapping):
            raise ValueError(f"{file} has {field}={pattern!r}; it must be a JSON object")
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(
                    f"{file} has the {field} key {key!r}, which is not a valid regular "
                    f"expression ({e})"
                ) from None
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"{file} has {field}[{key!r}]={value!r}; it must be a number")


def _dense_matrix(weight: Any, layout: _paths.Layout) -> np.ndarray:
    if hasattr(weight, "dequantize"):
        weight = weight.dequantize(jnp.float32)
    return np.asarray(weight, np.float32).reshape(layout.matrix_shape)


def _peft_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def _alpha_for_scale(config: LoraConfig, path: str, rank: int, scale: np.float32) -> float:
    """An alpha from which PEFT computes exactly ``scale`` (in float32) for ``rank``."""
    candidates = []
    if config.rank_for(path) == rank:
        candidates.append(config.alpha_for(path))
    candidates.append(float(scale) * (math.sqrt(rank) if config.rslora else rank))
    for alpha in candidates:
        if np.float32(_peft_scale(alpha, rank, config.rslora)) == scale:
            return int(alpha) if float(alpha).is_integer() else alpha
    raise ValueError(
        f"cannot write the scale {float(scale)!r} of {path!r} (rank {rank}, "
        f"rslora={config.rslora}) as a PEFT lora_alpha; check that the adapter's scale is "
        "finite and positive"
    )


__all__ = ["LoraCodec"]


register_codec("lora", LoraCodec())
