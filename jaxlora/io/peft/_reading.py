"""Reading PEFT files: settings and tensors, checked; weights of the base, by module name."""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jaxlora import _paths
from jaxlora.io.peft._format import CONFIG_NAME, WEIGHTS_NAME, Target
from jaxlora.io.peft._keymaps import KeyMap, stacked_fields


def read_json(directory: pathlib.Path) -> dict[str, Any]:
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist; pass the directory that peft's save_pretrained (or "
            "jaxlora.io.peft.save_peft) wrote"
        )
    try:
        settings = json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); the adapter file is damaged") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    settings["file"] = file
    return settings


def read_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    file = directory / WEIGHTS_NAME
    if not file.is_file():
        legacy = directory / "adapter_model.bin"
        hint = (
            f"; {legacy.name} (a pickle) is there: re-save it with safe_serialization=True"
            if legacy.is_file()
            else ""
        )
        raise FileNotFoundError(f"{file} does not exist{hint}")
    try:
        return safetensors.numpy.load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(
            f"{file} cannot be read as safetensors ({type(e).__name__}: {e}); the file is "
            "truncated or damaged"
        ) from None


def check_common_settings(settings: dict[str, Any], file: Any) -> None:
    """Type checks of the fields every PEFT config shares (a damaged or hand-edited file)."""
    for field in ("target_modules", "exclude_modules"):
        value = settings.get(field)
        ok = (
            value is None
            or isinstance(value, str)
            or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        )
        if not ok:
            raise ValueError(
                f"{file} has {field}={value!r}; PEFT expects a list of module names, a regex "
                "string or null"
            )
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"{file} has {field}={value!r}, not a valid regex ({e})") from None
    if settings.get("bias", "none") != "none":
        raise ValueError(
            f"{file} has bias={settings['bias']!r}: the adapter also trained biases, which a "
            "jaxlora delta does not carry; jaxlora reads adapters saved with bias='none'"
        )
    if not isinstance(settings.get("fan_in_fan_out", False), bool):
        raise ValueError(
            f"{file} has fan_in_fan_out={settings['fan_in_fan_out']!r}; PEFT writes true or false"
        )
    layers = settings.get("layers_to_transform")
    ok = layers is None or (isinstance(layers, int) and not isinstance(layers, bool))
    ok = ok or (isinstance(layers, list) and all(type(v) is int for v in layers))
    if not ok:
        raise ValueError(
            f"{file} has layers_to_transform={layers!r}; PEFT writes null, a layer index or a "
            "list of layer indices"
        )


def check_dropout(settings: dict[str, Any], field: str, file: Any) -> None:
    """``settings[field]`` (filled with 0.0) must be a number in ``[0, 1)``."""
    value = settings.setdefault(field, 0.0)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{file} has {field}={value!r}; it must be a number in [0, 1)")


def invert(key_map: KeyMap, flat: list[tuple[Any, Any]]) -> dict[str, Target]:
    """``{PEFT module: Target}`` for every float weight of base with 2+ axes that the map names."""
    targets: dict[str, Target] = {}
    for leaf_index, (key_path, leaf) in enumerate(flat):
        weight = _paths.unbox(leaf)
        if not _paths.is_float_array(weight) or weight.ndim < 2:
            continue
        path = _paths.path_str(key_path)
        template = key_map(path)
        if template is None:
            continue
        if not isinstance(template, str):
            raise TypeError(
                f"key_map({path!r}) returned {template!r}; it must return a str or None"
            )
        n_stacked = stacked_fields(template, path)
        if weight.ndim - n_stacked < 2:
            raise ValueError(
                f"key_map({path!r}) returned {template!r} with {n_stacked} stacked '{{}}' "
                f"fields, but the weight has shape {tuple(weight.shape)}: no input and output "
                "axes would be left"
            )
        for index in np.ndindex(*weight.shape[:n_stacked]):
            name = template.format(*index)
            if name in targets:
                raise ValueError(
                    f"key_map maps both {targets[name].path!r} and {path!r} to the PEFT module "
                    f"{name!r}; every weight needs its own module"
                )
            targets[name] = Target(leaf_index, path, index, weight, key_map.is_embedding(path))
    return targets


def unknown_module_message(name: str, key: str, targets: Mapping[str, Target]) -> str:
    hint = ""
    longer = [t for t in targets if t.endswith("." + name)]
    shorter = [t for t in targets if name.endswith("." + t)]
    if longer:
        extra = longer[0].removesuffix(name)
        hint = (
            f" base's module {longer[0]!r} ends with it: the key map adds {extra!r}, which "
            "the file lacks; use a key map without that prefix."
        )
    elif shorter:
        extra = name.removesuffix(shorter[0])
        hint = (
            f" It ends with base's module {shorter[0]!r}: the file's model wraps base's; use "
            f"key_map.prefixed({extra!r})."
        )
    sample = ", ".join(repr(t) for t in list(targets)[:3]) or "(none)"
    return (
        f"{key!r} adapts the module {name!r}, but no parameter of base maps to it;{hint} "
        f"The key map names base's weights like {sample}. Pass the base this adapter was "
        "trained for and its key map; jaxlora does not drop tensors it cannot place."
    )


def float_tensor(key: str, tensor: np.ndarray, file: Any) -> np.ndarray:
    if not np.issubdtype(tensor.dtype, np.floating) and tensor.dtype.name != "bfloat16":
        raise ValueError(
            f"{file} holds {key!r} of dtype {tensor.dtype}; adapter tensors are floating point. "
            "The file is damaged or was not written by PEFT"
        )
    finite = np.isfinite(tensor.astype(np.float64))
    if not finite.all():
        raise ValueError(
            f"{file} holds {key!r} with {int(finite.size - finite.sum())} non-finite values "
            f"(NaN or infinite) of {finite.size}; the adapter diverged in training or the file "
            "is damaged"
        )
    return tensor


def weight_layout(
    path: str,
    shape: tuple[int, ...],
    n_stacked: int,
    n_in: int,
    n_out: int,
    key: str,
    config: Any,
) -> _paths.Layout:
    """The layout of the weight at ``path`` for an adapter ``(n_in -> n_out)`` read from ``key``.

    From ``config`` if given, else inferred from the shape (the first input axes
    whose sizes multiply to ``n_in``).
    """
    layout: _paths.Layout | None
    if config is not None:
        layout = config.layout_for(path, shape)
        if len(layout.stacked) != n_stacked:
            raise ValueError(
                f"config reads {path!r} {shape} with {len(layout.stacked)} stacked axes, but the "
                f"key map gives it {n_stacked} '{{}}' fields; make stacked_axes and the key map "
                "agree"
            )
    else:
        layout = _infer_layout(shape, n_stacked, n_in)
    if layout is None or (layout.n_in, layout.n_out) != (n_in, n_out):
        reads = "" if layout is None else f", which reads as (in={layout.n_in}, out={layout.n_out})"
        raise ValueError(
            f"{key!r} and its module's other tensors hold a ({n_in} -> {n_out}) adapter, but "
            f"{path!r} has shape {shape}{reads}; pass the base this adapter was trained for"
            + ("" if config is None else " and check input_axes")
        )
    return layout


def _infer_layout(shape: tuple[int, ...], n_stacked: int, n_in: int) -> _paths.Layout | None:
    """Reads ``shape`` as stacked + inputs + outputs with ``prod(inputs) == n_in``."""
    for n_inputs in range(1, len(shape) - n_stacked):
        if math.prod(shape[n_stacked : n_stacked + n_inputs]) == n_in:
            return _paths.read_layout("", shape, n_stacked, n_inputs)
    return None


def config_options(
    adapted: Mapping[str, Any], config: Any, *, dtype_field: str, dropout: float
) -> tuple[dict[str, str], dict[str, Any]]:
    """``(exact targets, shared config fields)`` for the config of a read adapter.

    The targets are the adapted paths as anchored regexes. The fields are the
    layout options (``stacked_axes``/``input_axes`` as the nodes read them, or
    ``config``'s), ``dtype`` (of each node's ``dtype_field`` array, or
    ``config``'s) and ``dropout`` (the file's, or ``config``'s).
    """
    exact = {path: f"^{re.escape(path)}$" for path in adapted}
    nodes = {p: n for p, (n, _) in adapted.items()}
    if config is not None:
        return exact, {
            "stacked_axes": config.stacked_axes,
            "input_axes": config.input_axes,
            "dtype": config.dtype,
            "dropout": config.dropout,
        }
    stacked = {exact[p]: len(n.layout.stacked) for p, n in nodes.items() if n.layout.stacked}
    inputs = {exact[p]: len(n.layout.inputs) for p, n in nodes.items() if len(n.layout.inputs) != 1}
    dtypes = [getattr(n, dtype_field).dtype for n in nodes.values()]
    return exact, {
        "stacked_axes": stacked or None,
        "input_axes": inputs or None,
        "dtype": jnp.result_type(*dtypes),
        "dropout": dropout,
    }
