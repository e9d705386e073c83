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
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from jaxlora import _paths
from jaxlora._hosts import to_host
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
    """An array on the host, C-contiguous (gathered if it spans several processes)."""
    return np.ascontiguousarray(to_host(x))


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
