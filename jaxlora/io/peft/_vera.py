"""PEFT's VeRA format (``peft_type: "VERA"``).

Per module ``m``: ``vera_lambda_d`` ``(r,)`` and ``vera_lambda_b`` ``(out,)``
(jaxlora's ``d`` and ``b``). Shared by all modules: ``base_model.vera_A``
``(r, max_in)`` and ``base_model.vera_B`` ``(max_out, r)``, the frozen random
projections, transposed from jaxlora's ``A: (max_in, r)`` and ``B: (r, max_out)``;
PEFT slices ``vera_A[:, :in]`` and ``vera_B[:out]`` per module, as jaxlora does.
PEFT draws the projections with PyTorch's generator, which JAX cannot
reproduce, so files are written with ``save_projection: true`` and read only
with the projections in them (jaxlora then keeps them as constants).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._config import config_type
from jaxlora._node import AdapterNode, Constant, node_type
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

_SUFFIXES = {".vera_lambda_b": "b", ".vera_lambda_d": "d"}


class VeraCodec(PeftCodec):
    """PEFT's VeRA files for :class:`jaxlora.variants.VeraNode`."""

    peft_type = "VERA"
    name = "VeRA"

    def module_tensors(self, module: Module) -> dict[str, np.ndarray]:
        if module.embedding:
            raise TypeError(
                f"PEFT's VeRA adapts linear layers only, and {module.path!r} is an embedding"
            )
        return {".vera_lambda_b": host(module.node.b), ".vera_lambda_d": host(module.node.d)}

    def shared_tensors(self, modules: list[Module]) -> dict[str, np.ndarray]:
        a, b = modules[0].node.projection.matrices(jnp.float32)
        # PEFT sizes them to the largest target it adapts: the exported modules
        max_in = max(m.node.layout.n_in for m in modules)
        max_out = max(m.node.layout.n_out for m in modules)
        return {"vera_A": host(a[:max_in]).T, "vera_B": host(b[:, :max_out]).T}

    def settings(self, modules: list[Module], config: Any) -> dict[str, Any]:
        if getattr(config, "kind", None) != "vera":
            raise TypeError(
                f"config must be the jaxlora.variants.VeraConfig the delta was made with; got "
                f"{type(config).__name__}"
            )
        projection = modules[0].node.projection
        return {
            "r": int(projection.rank),
            "projection_prng_key": int(projection.seed),
            "save_projection": True,
            "vera_dropout": float(config.dropout),
            "d_initial": float(config.d_initial),
            "fan_in_fan_out": False,
            "bias": "none",
            "modules_to_save": None,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    def suffixes(self) -> Mapping[str, tuple[str, bool | None]]:
        return {suffix: (part, False) for suffix, part in _SUFFIXES.items()}

    def check_settings(self, settings: dict[str, Any], file: Any) -> None:
        for field in ("r", "projection_prng_key"):
            value = settings.get(field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{file} has {field}={value!r}; it must be an int")
        if settings.get("save_projection") is False:
            raise NotImplementedError(
                f"{file} has save_projection=false: PEFT regenerates the projections with "
                "PyTorch's random generator, which JAX cannot reproduce. Save the adapter with "
                "save_projection=True"
            )
        d_initial = settings.setdefault("d_initial", 0.1)
        if not isinstance(d_initial, int | float) or isinstance(d_initial, bool):
            raise ValueError(f"{file} has d_initial={d_initial!r}; it must be a number")
        check_dropout(settings, "vera_dropout", file)

    def read(
        self,
        path: str,
        weight: Any,
        layers: Mapping[tuple[int, ...], tuple[str, Mapping[str, tuple[str, np.ndarray]]]],
        settings: Mapping[str, Any],
        shared: Mapping[str, np.ndarray],
        config: Any,
    ) -> tuple[AdapterNode, dict[str, Any]]:
        file, r = settings["file"], settings["r"]
        for name in ("vera_A", "vera_B"):
            if name not in shared:
                raise ValueError(f"{file} lacks base_model.{name}, VeRA's shared projection")
        a, b = shared["vera_A"], shared["vera_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ValueError(
                f"{file} holds vera_A {a.shape} and vera_B {b.shape}; with r={r} they must be "
                f"(r, max_in) and (max_out, r)"
            )
        first_key = ""
        values = {}
        for index, (name, parts) in layers.items():
            missing = [p for p in ("b", "d") if p not in parts]
            if missing:
                key = next(iter(parts.values()))[0]
                raise ValueError(f"{key!r} has no vera_lambda_{missing[0]} for module {name!r}")
            (key_b, lam_b), (key_d, lam_d) = parts["b"], parts["d"]
            first_key = first_key or key_b
            if lam_d.shape != (r,) or lam_b.ndim != 1:
                raise ValueError(
                    f"{key_d!r} {lam_d.shape} and {key_b!r} {lam_b.shape} must be (r={r},) and "
                    "(out,)"
                )
            values[index] = (lam_d, lam_b)
        n_out = next(iter(values.values()))[1].shape[0]
        n_stacked = len(next(iter(values)))
        shape = tuple(weight.shape)
        n_in = int(np.prod(shape[n_stacked:])) // n_out
        layout = weight_layout(path, shape, n_stacked, n_in, n_out, first_key, config)
        if layout.n_in > a.shape[1] or layout.n_out > b.shape[0]:
            raise ValueError(
                f"{path!r} reads as (in={layout.n_in}, out={layout.n_out}), larger than the "
                f"shared projections vera_A {a.shape} and vera_B {b.shape} of {file}"
            )
        dtype = lam_d.dtype if config is None else jnp.dtype(config.dtype)
        d = np.full((*layout.stacked, r), settings["d_initial"], dtype)
        lam = np.zeros((*layout.stacked, n_out), dtype)  # layers not in the file: b = 0
        for index, (lam_d, lam_b) in values.items():
            if lam_b.shape != (n_out,):
                raise ValueError(f"the layers of {path!r} have vera_lambda_b of different sizes")
            d[index], lam[index] = lam_d, lam_b
        given = [Constant(a.T.astype(np.float32)), Constant(b.T.astype(np.float32))]
        static = {
            "layout": {
                "stacked": list(layout.stacked),
                "inputs": list(layout.inputs),
                "outputs": list(layout.outputs),
            },
            "projection": {
                "seed": settings["projection_prng_key"],
                "rank": r,
                "max_in": a.shape[1],
                "max_out": b.shape[0],
                "given": given,
            },
            "dropout": float(settings["vera_dropout"]) if config is None else config.dropout,
        }
        arrays = {"d": jax.device_put(d), "b": jax.device_put(lam)}
        return node_type("vera").from_saved(arrays, static), {}

    def config(
        self, adapted: Mapping[str, tuple[AdapterNode, dict[str, Any]]], settings: Any, config: Any
    ) -> Any:
        exact, options = config_options(
            adapted, config, dtype_field="d", dropout=float(settings["vera_dropout"])
        )
        return config_type("vera")(
            rank=int(settings["r"]),
            d_initial=float(settings["d_initial"]),
            projection_key=int(settings["projection_prng_key"]),
            targets=tuple(exact.values()),
            **options,
        )
