"""What every PEFT adapter file shares, and the codec protocol of node types.

A PEFT adapter is a directory with ``adapter_config.json`` (``peft_type`` and
the method's settings) and ``adapter_model.safetensors``, whose tensors are
named ``base_model.model.<module>.<suffix>`` for each adapted module of the
PyTorch model (and ``base_model.<name>`` for tensors shared by all modules,
such as VeRA's projections). Module names come from a key map
(:mod:`._keymaps`); a weight stacked over layers (``nn.scan``) is one PEFT
module per layer.

Each node type says how it is written and read through a :class:`PeftCodec`,
its ``peft`` class attribute: the writer and reader here do the naming,
stacking and file handling, the codec the method's tensors and settings.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jaxlora import _paths
from jaxlora._node import AdapterNode
from jaxlora.io.peft._keymaps import KeyMap, stacked_fields

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."
_MODULE_NAME = re.compile(r"[^.\s{}]+(\.[^.\s{}]+)*")

# adapter_config.json fields of methods whose forward pass jaxlora does not compute.
UNSUPPORTED = {
    "lora_bias": "a trainable bias on lora_B (lora_bias=True)",
    "use_qalora": "QALoRA (use_qalora=True)",
    "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
}


@dataclasses.dataclass(frozen=True)
class Module:
    """One PEFT module: one layer of one adapted weight.

    Attributes:
        name: its dotted name in the PyTorch model (no ``base_model.model.``).
        path: the jaxlora parameter path of the weight.
        index: the stacked-layer index within that weight (``()`` if not stacked).
        node: the adapter of this one layer (no stacked axes).
        embedding: whether the PyTorch module is an ``nn.Embedding``.
    """

    name: str
    path: str
    index: tuple[int, ...]
    node: AdapterNode
    embedding: bool


@dataclasses.dataclass(frozen=True)
class Target:
    """A PEFT module that a weight of ``base`` maps to (for reading)."""

    leaf: int
    path: str
    index: tuple[int, ...]
    weight: Any  # the whole weight (all stacked layers), possibly quantized
    embedding: bool


class PeftCodec:
    """How a node type's adapters are written to and read from PEFT files.

    A codec answers for one ``peft_type``. The writer calls :meth:`module_tensors`
    per module, :meth:`shared_tensors` and :meth:`settings` once; the reader
    calls :meth:`reads` on every registered node type's codec to find the one
    for a file, then :meth:`suffixes`, :meth:`read` per weight and
    :meth:`config`.
    """

    peft_type: str = ""
    name: str = ""  # the method's name in messages

    def reads(self, settings: Mapping[str, Any]) -> bool:
        """Whether this codec reads a file with these ``adapter_config.json`` settings."""
        return settings.get("peft_type") == self.peft_type

    # -------------------------------------------------------------- writing

    def module_tensors(self, module: Module) -> dict[str, np.ndarray]:
        """``suffix -> tensor`` of one module (``".lora_A.weight" -> (r, in)``)."""
        raise NotImplementedError

    def shared_tensors(self, modules: list[Module]) -> dict[str, np.ndarray]:
        """``name -> tensor`` of the tensors shared by all modules (``base_model.<name>``)."""
        return {}

    def settings(self, modules: list[Module], config: Any) -> dict[str, Any]:
        """The method's ``adapter_config.json`` fields (``peft_type`` and names are added)."""
        raise NotImplementedError

    # -------------------------------------------------------------- reading

    def suffixes(self) -> Mapping[str, tuple[str, bool | None]]:
        """``tensor suffix -> (part, embedding)`` this codec reads; ``embedding`` ``None``: any."""
        raise NotImplementedError

    def check_settings(self, settings: dict[str, Any], file: pathlib.Path) -> None:
        """Validates (and completes with PEFT's defaults) the settings of a file."""

    def read(
        self,
        path: str,
        weight: Any,
        layers: Mapping[tuple[int, ...], tuple[str, Mapping[str, np.ndarray]]],
        settings: Mapping[str, Any],
        shared: Mapping[str, np.ndarray],
        config: Any,
    ) -> tuple[AdapterNode, dict[str, Any]]:
        """The node of one weight from its modules' parts, and what :meth:`config` needs of it.

        ``layers`` maps each stacked index to ``(module name, {part: tensor})``.
        """
        raise NotImplementedError

    def config(
        self, adapted: Mapping[str, tuple[AdapterNode, dict[str, Any]]], settings: Any, config: Any
    ) -> Any:
        """The jaxlora config that makes exactly the read adapters."""
        raise NotImplementedError


_CODECS: dict[str, PeftCodec] = {}


def register_codec(kind: str, codec: PeftCodec) -> None:
    """Declares ``codec`` the PEFT format of the node type of ``kind``.

    The module that defines a node type calls it (``jaxlora.io.peft`` for LoRA,
    :mod:`jaxlora.variants` for DoRA, VeRA and AdaLoRA).
    """
    _CODECS[kind] = codec


def codec_of(kind: str) -> PeftCodec | None:
    """The PEFT codec of a node kind, or ``None`` if the node type has no PEFT format."""
    return _CODECS.get(kind)


def codecs() -> tuple[PeftCodec, ...]:
    """Every registered codec."""
    return tuple(_CODECS.values())


# ------------------------------------------------------------------ shared helpers


def module_name(key_map: KeyMap, path: str, node_layout: _paths.Layout) -> str:
    """The module-name template of ``path``, checked against its stacked axes."""
    template = key_map(path)
    if template is None:
        raise ValueError(
            f"key_map({path!r}) returned None, but the delta adapts {path!r}; PEFT needs a "
            "module name for every adapter. Pass a key map that names it (e.g. "
            "jaxlora.io.peft.LLAMA_KEY_MAP for jaxlora.models.llama), or leave the path out "
            "of the config's targets"
        )
    if not isinstance(template, str):
        raise TypeError(f"key_map({path!r}) returned {template!r}; it must return a str or None")
    n_stacked = len(node_layout.stacked)
    if stacked_fields(template, path) != n_stacked:
        raise ValueError(
            f"key_map({path!r}) returned {template!r} with {stacked_fields(template, path)} "
            f"'{{}}' fields, but the adapter at {path!r} has {n_stacked} stacked layer "
            f"axes {node_layout.stacked}; write one '{{}}' per stacked axis (e.g. "
            "'model.layers.{}.self_attn.q_proj'), filled with each layer's index"
        )
    return template


def check_module_name(name: str, path: str) -> None:
    if name.startswith(PREFIX) or name.startswith("base_model."):
        raise ValueError(
            f"key_map({path!r}) gives {name!r}, which starts with PEFT's own prefix; return "
            f"the module's name in the PyTorch model ({name.removeprefix(PREFIX)!r}): "
            f"the writer adds {PREFIX!r}"
        )
    if not _MODULE_NAME.fullmatch(name):
        raise ValueError(
            f"key_map({path!r}) gives {name!r}, which is not a PyTorch module name (dotted, "
            "non-empty parts without spaces), e.g. 'model.layers.0.self_attn.q_proj'"
        )


def check_no_suffixes(names: Iterable[str]) -> None:
    """PEFT matches names by suffix: refuse two modules where one name ends the other."""
    names = set(names)
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            suffix = ".".join(parts[i:])
            if suffix in names:
                raise ValueError(
                    f"the PEFT module names {suffix!r} and {name!r} end alike; PEFT matches "
                    "target_modules and rank/alpha patterns by name suffix and would adapt "
                    f"{name!r} with both. Give {suffix!r} its full name in the key map"
                )


def host(x: Any) -> np.ndarray:
    """An array on the host, C-contiguous."""
    return np.ascontiguousarray(np.asarray(x))


def most_common(values: Iterable[Any]) -> Any:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], -v if isinstance(v, int | float) else 0))


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first regex matching a name suffix."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def targeted(settings: Mapping[str, Any], name: str) -> bool:
    """Whether PEFT's ``target_modules``/``exclude_modules`` select the module ``name``."""
    exclude = settings.get("exclude_modules")
    if isinstance(exclude, str):
        if re.fullmatch(exclude, name):
            return False
    elif exclude and (name in exclude or any(name.endswith("." + e) for e in exclude)):
        return False
    targets = settings.get("target_modules")
    if isinstance(targets, str):
        # "all-linear" depends on the PyTorch model's layer types, which a file does not show.
        return targets == "all-linear" or re.fullmatch(targets, name) is not None
    if not targets:
        return False
    return name in targets or any(name.endswith("." + t) for t in targets)


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


def layer_of(x: Any, index: tuple[int, ...]) -> Any:
    return x[index] if index else x


def device_put_host(arrays: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host arrays to the default device, without compiling a cast per shape."""
    return {k: jax.device_put(v) for k, v in arrays.items()}
