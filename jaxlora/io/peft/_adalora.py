"""PEFT's AdaLoRA format (``peft_type: "ADALORA"``).

Per module ``m``: ``lora_A`` ``(r, in)``, ``lora_E`` ``(r, 1)`` and ``lora_B``
``(out, r)`` (no ``.weight``): jaxlora's ``Pᵀ``, ``E`` and ``Qᵀ``. PEFT scales the
adapter by ``lora_alpha / (init_r + 1e-5)``; jaxlora by ``alpha / init_rank``
(a relative difference of ``1e-5 / init_r``, below float32 rounding of the
outputs). A file written after PEFT pruned holds, in ``rank_pattern``, one list of
``init_r`` booleans per module (``"<module>.lora_E"``) and only the kept
triplets' tensors; reading puts them back at their positions with the pruned
ones zero, the state jaxlora trains in. Files are written with every triplet
(pruned ones have ``E = 0``) and no ``rank_pattern``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._config import config_type
from jaxlora._node import AdapterNode, node_type
from jaxlora.io.peft._format import (
    Module,
    PeftCodec,
    host,
)
from jaxlora.io.peft._reading import (
    check_dropout,
    config_options,
    weight_layout,
)

_SCHEDULE = {  # jaxlora's AdaLoraConfig field -> PEFT's
    "init_rank": "init_r",
    "target_rank": "target_r",
    "tinit": "tinit",
    "tfinal": "tfinal",
    "delta_t": "deltaT",
    "beta1": "beta1",
    "beta2": "beta2",
    "orth_reg_weight": "orth_reg_weight",
    "total_step": "total_step",
}


class AdaLoraCodec(PeftCodec):
    """PEFT's AdaLoRA files for :class:`jaxlora.variants.AdaLoraNode`."""

    peft_type = "ADALORA"
    name = "AdaLoRA"

    def module_tensors(self, module: Module) -> dict[str, np.ndarray]:
        if module.embedding:
            raise TypeError(f"PEFT's AdaLoRA adapts linear layers; {module.path!r} is an embedding")
        node = module.node
        return {
            ".lora_A": host(node.p).T,
            ".lora_E": host(node.e)[:, None],
            ".lora_B": host(node.q).T,
        }

    def settings(self, modules: list[Module], config: Any) -> dict[str, Any]:
        if getattr(config, "kind", None) != "adalora":
            raise TypeError(
                f"config must be the jaxlora.variants.AdaLoraConfig the delta was made with; got "
                f"{type(config).__name__}"
            )
        alpha = float(modules[0].node.scale) * config.init_rank
        return {
            **{peft: getattr(config, ours) for ours, peft in _SCHEDULE.items()},
            "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
            "rank_pattern": None,
            "lora_dropout": float(config.dropout),
            "fan_in_fan_out": False,
            "bias": "none",
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    def suffixes(self) -> Mapping[str, tuple[str, bool | None]]:
        return {".lora_A": ("p", False), ".lora_E": ("e", False), ".lora_B": ("q", False)}

    def check_settings(self, settings: dict[str, Any], file: Any) -> None:
        for field in ("init_r", "total_step"):
            value = settings.get(field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{file} has {field}={value!r}; it must be a positive int")
        settings.setdefault("lora_alpha", 8)
        alpha = settings["lora_alpha"]
        if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha < 0:
            raise ValueError(f"{file} has lora_alpha={alpha!r}; it must be a number >= 0")
        pattern = settings.get("rank_pattern") or {}
        if not isinstance(pattern, Mapping) or not all(
            isinstance(v, list)
            and len(v) == settings["init_r"]
            and all(isinstance(b, bool) for b in v)
            for v in pattern.values()
        ):
            raise ValueError(
                f"{file} has rank_pattern={pattern!r}; AdaLoRA's is a mapping "
                f"'<module>.lora_E' -> a list of init_r={settings['init_r']} booleans"
            )
        settings["rank_pattern"] = dict(pattern)
        check_dropout(settings, "lora_dropout", file)

    def read(
        self,
        path: str,
        weight: Any,
        layers: Mapping[tuple[int, ...], tuple[str, Mapping[str, tuple[str, np.ndarray]]]],
        settings: Mapping[str, Any],
        shared: Mapping[str, np.ndarray],
        config: Any,
    ) -> tuple[AdapterNode, dict[str, Any]]:
        r = settings["init_r"]
        values = {}
        for index, (name, parts) in layers.items():
            missing = [p for p in ("p", "e", "q") if p not in parts]
            if missing:
                key = next(iter(parts.values()))[0]
                names = {"p": "lora_A", "e": "lora_E", "q": "lora_B"}
                raise ValueError(f"{key!r} has no {names[missing[0]]} for module {name!r}")
            (key_a, a), (key_e, e), (key_b, b) = parts["p"], parts["e"], parts["q"]
            kept = settings["rank_pattern"].get(f"{name}.lora_E", [True] * r)
            k = sum(kept)
            if (
                a.ndim != 2
                or b.ndim != 2
                or a.shape[0] != k
                or b.shape[1] != k
                or e.shape != (k, 1)
            ):
                raise ValueError(
                    f"{key_a!r} {a.shape}, {key_e!r} {e.shape} and {key_b!r} {b.shape} do not "
                    f"hold the {k} triplets that init_r={r} and rank_pattern give {name!r}: "
                    "lora_A is (r, in), lora_E (r, 1) and lora_B (out, r)"
                )
            values[index] = (key_a, np.asarray(kept), a.T, e[:, 0], b.T)
        key_a, _, p0, _, q0 = next(iter(values.values()))
        n_in, n_out = p0.shape[0], q0.shape[1]
        layout = weight_layout(
            path, tuple(weight.shape), len(next(iter(values))), n_in, n_out, key_a, config
        )
        dtype = p0.dtype if config is None else jnp.dtype(config.dtype)
        p = np.zeros((*layout.stacked, n_in, r), dtype)
        e = np.zeros((*layout.stacked, r), dtype)  # layers not in the file: E = 0, no change
        q = np.zeros((*layout.stacked, r, n_out), dtype)
        for index, (_, kept, p_i, e_i, q_i) in values.items():
            if p_i.shape[0] != n_in or q_i.shape[1] != n_out:
                raise ValueError(f"the layers of {path!r} have adapters of different shapes")
            p[index][..., kept], e[index][kept], q[index][kept] = p_i, e_i, q_i
        alpha = settings["lora_alpha"] or r  # PEFT: lora_alpha 0 means scaling r
        dropout = float(settings["lora_dropout"]) if config is None else config.dropout
        node = node_type("adalora")(
            jax.device_put(p),
            jax.device_put(e),
            jax.device_put(q),
            scale=float(alpha) / r,
            layout=layout,
            dropout=dropout,
        )
        return node, {"alpha": float(alpha)}

    def config(
        self, adapted: Mapping[str, tuple[AdapterNode, dict[str, Any]]], settings: Any, config: Any
    ) -> Any:
        exact, options = config_options(
            adapted, config, dtype_field="p", dropout=float(settings["lora_dropout"])
        )
        alpha = next(iter(adapted.values()))[1]["alpha"]
        defaults = {"target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85,
                    "beta2": 0.85, "orth_reg_weight": 0.5}  # PEFT's  # fmt: skip
        schedule = {
            ours: settings.get(peft, defaults.get(peft)) for ours, peft in _SCHEDULE.items()
        }
        return config_type("adalora")(
            **schedule, alpha=alpha, targets=tuple(exact.values()), **options
        )
