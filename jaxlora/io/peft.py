"""Hugging Face PEFT adapter files: write a delta that PEFT loads, and read PEFT's files.

A PEFT LoRA adapter is a directory with two files:

* ``adapter_model.safetensors``: for each adapted module ``m`` of the PyTorch model,
  ``base_model.model.<m>.lora_A.weight`` of shape ``(r, in)`` and
  ``base_model.model.<m>.lora_B.weight`` of shape ``(out, r)`` (an ``nn.Embedding``
  stores ``lora_embedding_A`` ``(r, num_embeddings)`` and ``lora_embedding_B``
  ``(embedding_dim, r)``, without ``.weight``). jaxlora's ``a`` is ``(in, r)`` and ``b``
  is ``(r, out)``, so ``lora_A = aᵀ`` and ``lora_B = bᵀ`` for both kinds. Weights with
  several input or output axes (DenseGeneral kernels) flatten row-major, which is how
  a ``torch.nn.Linear`` over the flattened features lays them out.
* ``adapter_config.json``: ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``
  and ``use_rslora``, from which PEFT recomputes each module's scale (the tensors hold
  no scale), and ``target_modules``: PEFT creates adapters only for the modules listed
  there and silently ignores tensors of any other module.

Module names come from a key map (:class:`KeyMap`, :data:`BERT_KEY_MAP`,
:data:`LLAMA_KEY_MAP`, or any function ``path -> name``). A weight stacked over layers
(``nn.scan``) is written as one PEFT module per layer.

Example:
    >>> import json, pathlib, tempfile
    >>> import jax, jax.numpy as jnp, jaxlora
    >>> from jaxlora.io import peft
    >>> params = {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 4))}}}}
    >>> config = jaxlora.LoraConfig(rank=2, alpha=4, targets="q_proj")
    >>> _, delta = jaxlora.split(params, config, key=jax.random.key(0))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     peft.export(tmp, delta, config, key_map=peft.LLAMA_KEY_MAP)
    ...     written = json.loads(pathlib.Path(tmp, "adapter_config.json").read_text())
    >>> written["target_modules"], written["r"], written["lora_alpha"]
    (['model.layers.0.self_attn.q_proj'], 2, 4)
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jaxlora import _paths
from jaxlora._config import LoraConfig
from jaxlora._delta import LoraNode, is_delta_leaf, is_node
from jaxlora.io._keymaps import BERT_KEY_MAP as BERT_KEY_MAP
from jaxlora.io._keymaps import LLAMA_KEY_MAP as LLAMA_KEY_MAP
from jaxlora.io._keymaps import KeyMap as KeyMap
from jaxlora.io._keymaps import as_key_map, stacked_fields

__all__ = [
    "BERT_KEY_MAP",
    "CONFIG_NAME",
    "LLAMA_KEY_MAP",
    "WEIGHTS_NAME",
    "KeyMap",
    "export",
    "load",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# (suffix of a tensor name) -> (factor, whether the module is an nn.Embedding)
_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
    ".base_layer.weight": ("W", None),
}
# adapter_config.json fields of LoRA variants whose forward pass jaxlora does not compute.
_UNSUPPORTED = {
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
_MODULE_NAME = re.compile(r"[^.\s{}]+(\.[^.\s{}]+)*")


def export(
    directory: str | os.PathLike[str],
    delta: Any,
    config: LoraConfig,
    *,
    key_map: KeyMap | Callable[[str], str | None],
) -> None:
    """Writes ``delta`` as a PEFT LoRA adapter that ``peft.PeftModel.from_pretrained`` loads.

    Each adapter's ``a`` and ``b`` become ``lora_A = aᵀ`` and ``lora_B = bᵀ`` (or
    ``lora_embedding_A``/``lora_embedding_B`` for embedding tables) under
    ``base_model.model.<module>``, one module per layer for stacked adapters. The
    config lists every written module in ``target_modules`` and sets ``r``,
    ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` and ``use_rslora`` so that
    the scale PEFT computes for each module equals the adapter's ``scale`` in float32
    (``alpha_for(path)`` is written where it gives that scale; otherwise the alpha
    that does). ``init_lora_weights`` is ``true``, so a module that PEFT adapts but
    the file does not cover stays a no-op.

    Args:
        directory: the adapter directory; created if missing. ``adapter_config.json``
            and ``adapter_model.safetensors`` in it are overwritten.
        delta: the delta from :func:`jaxlora.split` (or a trained one).
        config: the config the delta was made with; its ``rslora`` and ``dropout``
            are written, and its alphas where they reproduce the adapters' scales.
        key_map: a :class:`KeyMap` or a function ``(path) -> PEFT module name | None``
            naming the PyTorch module of each adapted path; see :data:`LLAMA_KEY_MAP`.

    Raises:
        TypeError: if ``config`` is not a :class:`jaxlora.LoraConfig` or ``delta``
            holds something other than adapters and ``None``.
        ValueError: if ``delta`` has no adapter, ``key_map`` names no module for an
            adapted path, a stacked adapter's name has the wrong number of ``{}``
            fields, two adapters get the same module, or one module name ends with
            another (PEFT's name patterns could not tell them apart).

    Example:
        >>> import pathlib, tempfile
        >>> import jax, jax.numpy as jnp, jaxlora, safetensors.numpy
        >>> from jaxlora.io import peft
        >>> params = {"encoder": {"layer_0": {"attention": {"self": {"query": {
        ...     "kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)}}}}}}
        >>> config = jaxlora.LoraConfig(rank=2, targets="query")
        >>> _, delta = jaxlora.split(params, config, key=jax.random.key(0))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     peft.export(tmp, delta, config, key_map=peft.BERT_KEY_MAP)
        ...     tensors = safetensors.numpy.load_file(pathlib.Path(tmp, peft.WEIGHTS_NAME))
        >>> {name: value.shape for name, value in sorted(tensors.items())}
        {'base_model.model.encoder.layer.0.attention.self.query.lora_A.weight': (2, 8),
         'base_model.model.encoder.layer.0.attention.self.query.lora_B.weight': (6, 2)}
    """
    key_map = as_key_map(key_map)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a jaxlora.LoraConfig; got {type(config).__name__}")
    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, tuple[int, float, str]] = {}  # name -> (r, alpha, path)
    for key_path, node in jax.tree_util.tree_flatten_with_path(delta, is_leaf=is_delta_leaf)[0]:
        path = _paths.path_str(key_path)
        if node is None:
            continue
        if is_node(node) and type(node) is not LoraNode:
            raise TypeError(
                f"PEFT export supports plain LoRA adapters; {path!r} holds a "
                f"{type(node).__name__} (DoRA's magnitude vector, VeRA and AdaLoRA are not "
                "exported yet; for AdaLoRA export jaxlora.variants.to_lora(delta))"
            )
        if not is_node(node):
            raise TypeError(
                f"delta holds {type(node).__name__} at {path!r}; a delta holds jaxlora.LoraNode "
                "adapters and None. Pass the delta that jaxlora.split returned."
            )
        template = _module_template(key_map, path)
        n_stacked = len(node.layout.stacked)
        if stacked_fields(template, path) != n_stacked:
            raise ValueError(
                f"key_map({path!r}) returned {template!r} with {stacked_fields(template, path)} "
                f"'{{}}' fields, but the adapter at {path!r} has {n_stacked} stacked layer "
                f"axes {node.layout.stacked}; write one '{{}}' per stacked axis (e.g. "
                "'model.layers.{}.self_attn.q_proj'), filled with each layer's index"
            )
        rank, scale = node.rank, np.float32(node.scale)
        alpha = _alpha_for_scale(config, path, rank, scale)
        a, b = np.asarray(node.a), np.asarray(node.b)
        names = _SUFFIX_NAMES[key_map.is_embedding(path)]
        for index in np.ndindex(*node.layout.stacked):
            name = template.format(*index)
            _check_module_name(name, path)
            if name in modules:
                raise ValueError(
                    f"key_map maps both {modules[name][2]!r} and {path!r} to the PEFT module "
                    f"{name!r}; every adapted weight needs its own module"
                )
            modules[name] = (rank, alpha, path)
            tensors[f"{_PREFIX}{name}{names[0]}"] = np.ascontiguousarray(
                np.swapaxes(a[index], 0, 1)
            )
            tensors[f"{_PREFIX}{name}{names[1]}"] = np.ascontiguousarray(
                np.swapaxes(b[index], 0, 1)
            )
    if not modules:
        raise ValueError(
            "delta holds no adapter (every leaf is None); pass the delta that jaxlora.split "
            "returned"
        )
    _check_no_suffixes(modules)
    rank = _most_common(r for r, _, _ in modules.values())
    alpha = _most_common(a for _, a, _ in modules.values())
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": bool(config.rslora),
        "rank_pattern": {re.escape(m): r for m, (r, _, _) in modules.items() if r != rank},
        "alpha_pattern": {re.escape(m): a for m, (_, a, _) in modules.items() if a != alpha},
        "target_modules": sorted(modules),
        "exclude_modules": None,
        "lora_dropout": float(config.dropout),
        "fan_in_fan_out": False,
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n")
    safetensors.numpy.save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


_SUFFIX_NAMES = {
    False: (".lora_A.weight", ".lora_B.weight"),
    True: (".lora_embedding_A", ".lora_embedding_B"),
}


def _module_template(key_map: KeyMap, path: str) -> str:
    template = key_map(path)
    if template is None:
        raise ValueError(
            f"key_map({path!r}) returned None, but the delta adapts {path!r}; PEFT needs a "
            "module name for every adapter. Pass a key map that names it (e.g. "
            "jaxlora.io.peft.LLAMA_KEY_MAP for jaxlora.models.llama), or leave the path out "
            "of LoraConfig.targets"
        )
    if not isinstance(template, str):
        raise TypeError(f"key_map({path!r}) returned {template!r}; it must return a str or None")
    return template


def _check_module_name(name: str, path: str) -> None:
    if name.startswith(_PREFIX) or name.startswith("base_model."):
        raise ValueError(
            f"key_map({path!r}) gives {name!r}, which starts with PEFT's own prefix; return "
            f"the module's name in the PyTorch model ({name.removeprefix(_PREFIX)!r}): "
            f"export adds {_PREFIX!r}"
        )
    if not _MODULE_NAME.fullmatch(name):
        raise ValueError(
            f"key_map({path!r}) gives {name!r}, which is not a PyTorch module name (dotted, "
            "non-empty parts without spaces), e.g. 'model.layers.0.self_attn.q_proj'"
        )


def _check_no_suffixes(modules: Mapping[str, Any]) -> None:
    for name in modules:
        parts = name.split(".")
        for i in range(1, len(parts)):
            suffix = ".".join(parts[i:])
            if suffix in modules:
                raise ValueError(
                    f"the PEFT module names {suffix!r} and {name!r} end alike; PEFT matches "
                    "target_modules and rank/alpha patterns by name suffix and would adapt "
                    f"{name!r} with both. Give {suffix!r} its full name in the key map"
                )


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


def _most_common(values: Iterable[Any]) -> Any:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], -v))


# ---------------------------------------------------------------------------------------------
# Reading.


def load(
    directory: str | os.PathLike[str],
    base: Any,
    *,
    key_map: KeyMap | Callable[[str], str | None],
    config: LoraConfig | None = None,
) -> tuple[Any, LoraConfig]:
    """Reads a PEFT LoRA adapter into a delta for ``base``.

    The key map is inverted by mapping every weight of ``base``, so it only needs the
    jaxlora-to-PEFT direction. Each module's scale is computed as PEFT computes it,
    from ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` and
    ``use_rslora``. A stacked weight collects its layers' modules; layers the file
    does not cover get zero factors (no change, as in PEFT). Copies of base weights
    that PEFT saves with a targeted embedding or ``lm_head`` layer are checked against
    ``base`` (unless it is quantized) and otherwise ignored.

    Args:
        directory: a directory with ``adapter_config.json`` and
            ``adapter_model.safetensors`` (``save_pretrained``'s output).
        base: the parameters the adapter is for (the frozen tree from
            :func:`jaxlora.split`, or the full params): their shapes are checked and
            the delta mirrors their structure.
        key_map: a :class:`KeyMap` or a function ``(path) -> PEFT module name | None``;
            see :data:`LLAMA_KEY_MAP`.
        config: optional; its ``stacked_axes``/``input_axes`` say how to read the
            weights' axes (by default the input axes are read from ``lora_A``'s width)
            and its ``dtype``, ``dropout`` and ``init`` are kept. Ranks, alphas and
            rsLoRA always come from the file.

    Returns:
        ``(delta, config)``: a delta with a :class:`jaxlora.LoraNode` at every adapted
        leaf of ``base`` and ``None`` elsewhere, and a :class:`jaxlora.LoraConfig`
        that targets exactly those leaves and whose ``scale_for``/``rank_for``/
        ``layout_for`` give each adapter's values.

    Raises:
        FileNotFoundError: if a file is missing.
        ValueError: if the file is not a LoRA adapter; a tensor maps to no parameter
            of ``base`` (the message names it); a module lacks its ``lora_A`` or
            ``lora_B``; shapes do not fit the parameter; a module is not in
            ``target_modules`` (PEFT would drop it); the layers of a stacked weight
            have different ranks or scales; or a saved base weight differs from ``base``.
        NotImplementedError: for DoRA (``use_dora``, ``lora_magnitude_vector``) and
            the other LoRA variants jaxlora does not implement (``lora_bias``, aLoRA,
            ``modules_to_save``, convolution adapters, ...).

    Example:
        >>> import tempfile
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> from jaxlora.io import peft
        >>> params = {"layers_0": {"mlp": {"up_proj": {"kernel": jnp.ones((8, 16))}}}}
        >>> config = jaxlora.LoraConfig(rank=4, alpha=8, targets="up_proj")
        >>> base, delta = jaxlora.split(params, config, key=jax.random.key(0))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     peft.export(tmp, delta, config, key_map=peft.LLAMA_KEY_MAP)
        ...     loaded, loaded_config = peft.load(tmp, base, key_map=peft.LLAMA_KEY_MAP)
        >>> node = loaded["layers_0"]["mlp"]["up_proj"]["kernel"]
        >>> node.a.shape, node.b.shape, float(node.scale)
        ((8, 4), (4, 16), 2.0)
        >>> bool(jnp.array_equal(node.a, delta["layers_0"]["mlp"]["up_proj"]["kernel"].a))
        True
        >>> loaded_config.scale_for("layers_0/mlp/up_proj/kernel")
        2.0
    """
    key_map = as_key_map(key_map)
    if config is not None and not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a jaxlora.LoraConfig or None; got {type(config).__name__}")
    directory = pathlib.Path(directory)
    settings = _read_config(directory)
    modules = _read_modules(directory)
    flat, treedef = jax.tree_util.tree_flatten_with_path(base, is_leaf=_paths.is_box)
    targets = _invert(key_map, flat)
    found: dict[int, dict[tuple[int, ...], _Factors]] = collections.defaultdict(dict)
    for name, parts in modules.items():
        if name not in targets:
            raise ValueError(_unknown_module_message(name, parts, targets))
        leaf_index, path, index = targets[name]
        weight = _paths.unbox(flat[leaf_index][1])
        # A quantized base (QLoRA) cannot match the full-precision copy, so it is not checked.
        if "W" in parts and not hasattr(weight, "dequantize"):
            weight = np.asarray(weight)[index]
            _check_saved_weight(parts["W"], weight, key_map.is_embedding(path), path)
        if "A" not in parts and "B" not in parts:
            continue
        found[leaf_index][index] = _factors(name, parts, path, key_map, settings)
    leaves: list[Any] = [None] * len(flat)
    layouts: dict[str, _paths.Layout] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropout = float(settings["lora_dropout"]) if config is None else config.dropout
    for leaf_index, by_index in found.items():
        path = _paths.path_str(flat[leaf_index][0])
        weight = _paths.unbox(flat[leaf_index][1])
        node, alpha = _node(path, weight, by_index, config, dropout)
        leaves[leaf_index] = node
        layouts[path], ranks[path], alphas[path] = node.layout, node.rank, alpha
    if not layouts:
        raise ValueError(
            f"{directory / WEIGHTS_NAME} holds no lora_A/lora_B tensor; it is not a LoRA adapter"
        )
    out_config = _config(layouts, ranks, alphas, settings, config, dropout, leaves)
    return treedef.unflatten(leaves), out_config


class _Factors(NamedTuple):
    """One PEFT module's tensors in jaxlora's orientation, with PEFT's alpha and scale."""

    key: str
    a: np.ndarray
    b: np.ndarray
    alpha: float
    scale: float


def _read_config(directory: pathlib.Path) -> dict[str, Any]:
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist; pass the directory that peft's save_pretrained (or "
            "jaxlora.io.peft.export) wrote"
        )
    settings = json.loads(file.read_text())
    if not isinstance(settings, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    peft_type = settings.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"{file} describes a {peft_type!r} adapter; jaxlora reads LoRA adapters "
            "(peft_type 'LORA') only"
        )
    if settings.get("use_dora"):
        raise NotImplementedError(
            f"{file} is a DoRA adapter (use_dora=true; Liu et al. 2024, arXiv:2402.09353), "
            "which jaxlora does not implement yet; train a plain LoRA adapter (use_dora=False)"
        )
    for field, what in _UNSUPPORTED.items():
        if settings.get(field):
            raise NotImplementedError(
                f"{file} uses {what}, which jaxlora does not implement; only plain LoRA "
                "adapters can be read"
            )
    for field in ("r", "lora_alpha"):
        if field not in settings:
            raise ValueError(f"{file} has no {field!r}; it is not a PEFT LoRA config")
    settings.setdefault("rank_pattern", {})
    settings.setdefault("alpha_pattern", {})
    settings.setdefault("use_rslora", False)
    settings.setdefault("lora_dropout", 0.0)
    settings["rank_pattern"] = settings["rank_pattern"] or {}
    settings["alpha_pattern"] = settings["alpha_pattern"] or {}
    settings["file"] = file
    return settings


def _read_modules(directory: pathlib.Path) -> dict[str, dict[str, Any]]:
    """``{module: {"A": (key, tensor, is_embedding), "B": ..., "W": (key, tensor)}}``."""
    file = directory / WEIGHTS_NAME
    if not file.is_file():
        legacy = directory / "adapter_model.bin"
        hint = (
            f"; {legacy.name} (a pickle) is there: re-save it with safe_serialization=True"
            if legacy.is_file()
            else ""
        )
        raise FileNotFoundError(f"{file} does not exist{hint}")
    modules: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    for key, tensor in safetensors.numpy.load_file(str(file)).items():
        if "lora_magnitude_vector" in key:
            raise NotImplementedError(
                f"{file} holds the DoRA magnitude {key!r}; DoRA (Liu et al. 2024, "
                "arXiv:2402.09353) is not implemented in jaxlora yet"
            )
        if key.endswith(".lora_B.bias"):
            raise NotImplementedError(
                f"{file} holds {key!r}, a bias on lora_B (PEFT's lora_bias=True), which jaxlora "
                "does not implement"
            )
        if not key.startswith(_PREFIX):
            raise ValueError(
                f"{file} holds {key!r}, which lacks PEFT's {_PREFIX!r} prefix: PEFT would ignore "
                "it and load a no-op adapter. Rename the tensors to "
                f"'{_PREFIX}<module>.lora_A.weight'"
            )
        rest = key.removeprefix(_PREFIX)
        for suffix, (part, embedding) in _SUFFIXES.items():
            if rest.endswith(suffix):
                name = rest.removesuffix(suffix)
                if part == "W":
                    modules[name][part] = (key, tensor)
                else:
                    modules[name][part] = (key, tensor, embedding)
                break
        else:
            raise ValueError(
                f"{file} holds {key!r}, which is no LoRA tensor jaxlora knows (it reads "
                f"'<module>{{{', '.join(_SUFFIXES)}}}'); refusing to drop it"
            )
    return modules


def _invert(key_map: KeyMap, flat: list[tuple[Any, Any]]) -> dict[str, tuple[int, str, tuple]]:
    """``{PEFT module: (leaf index, path, stacked index)}`` for every weight of base."""
    targets: dict[str, tuple[int, str, tuple]] = {}
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
                    f"key_map maps both {targets[name][1]!r} and {path!r} to the PEFT module "
                    f"{name!r}; every weight needs its own module"
                )
            targets[name] = (leaf_index, path, index)
    return targets


def _unknown_module_message(name: str, parts: Mapping[str, Any], targets: Mapping) -> str:
    key = next(iter(parts.values()))[0]
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


def _check_saved_weight(
    part: tuple[str, np.ndarray], weight: Any, embedding: bool, path: str
) -> None:
    key, tensor = part
    weight = np.asarray(weight)
    if tensor.ndim != 2 or tensor.size != weight.size:
        raise ValueError(
            f"{key!r} is a full weight of shape {tensor.shape}, but {path!r} holds "
            f"{weight.shape}; pass the base this adapter was trained for"
        )
    # torch: an Embedding's weight is (num, dim) like Flax's table; a Linear's is (out, in).
    expected = weight.reshape(tensor.shape) if embedding else weight.reshape(tensor.shape[::-1]).T
    got = tensor.astype(np.float32)
    want = expected.astype(np.float32)
    eps = max(float(jnp.finfo(tensor.dtype).eps), float(jnp.finfo(weight.dtype).eps))
    if not np.allclose(got, want, rtol=eps, atol=eps * float(np.max(np.abs(want), initial=0.0))):
        raise ValueError(
            f"{key!r} is a copy of a base weight (PEFT saves targeted embedding layers with "
            f"save_embedding_layers), and it differs from base's {path!r} by up to "
            f"{float(np.max(np.abs(got - want))):.3g}. A jaxlora delta cannot carry base "
            "weights: load base from the checkpoint the adapter was trained on (with its "
            "resized vocabulary, if any)"
        )


def _factors(
    name: str, parts: Mapping[str, Any], path: str, key_map: KeyMap, settings: Mapping[str, Any]
) -> _Factors:
    for part, other in (("A", "B"), ("B", "A")):
        if part not in parts:
            key = parts[other][0]
            raise ValueError(
                f"{key!r} has no matching lora_{part} for module {name!r}; the file is incomplete"
            )
    (key_a, a, emb_a), (key_b, b, emb_b) = parts["A"], parts["B"]
    if a.ndim != 2 or b.ndim != 2:
        if a.ndim == 4:
            raise NotImplementedError(
                f"{key_a!r} has shape {a.shape}: a convolution adapter, which jaxlora.io.peft "
                "does not read yet"
            )
        raise ValueError(f"{key_a!r} {a.shape} and {key_b!r} {b.shape} must both be 2-D")
    if emb_a != emb_b or emb_a != key_map.is_embedding(path):
        kind = "an embedding" if key_map.is_embedding(path) else "a linear layer"
        raise ValueError(
            f"{key_a!r} is stored as {'an embedding' if emb_a else 'a linear'} adapter, but the "
            f"key map says {path!r} is {kind}; pass a KeyMap whose is_embedding matches the "
            "PyTorch model"
        )
    rank = a.shape[0]
    if b.shape[1] != rank:
        raise ValueError(
            f"{key_a!r} has rank {rank} (shape {a.shape}) but {key_b!r} has rank {b.shape[1]} "
            f"(shape {b.shape}); lora_A is (r, in) and lora_B (out, r)"
        )
    file = settings["file"]
    if not _targeted(settings, name):
        raise ValueError(
            f"{file} holds {key_a!r}, but target_modules={settings.get('target_modules')!r} "
            f"does not select {name!r}: PEFT would create no adapter there and drop the "
            "tensors. Add the module to target_modules"
        )
    expected_rank = int(_pattern_value(settings["rank_pattern"], name, settings["r"]))
    if expected_rank != rank:
        raise ValueError(
            f"{key_a!r} has rank {rank}, but {file.name} gives {name!r} rank {expected_rank} "
            "(r and rank_pattern); PEFT could not load this file either"
        )
    alpha = _pattern_value(settings["alpha_pattern"], name, settings["lora_alpha"])
    scale = _peft_scale(alpha, rank, bool(settings["use_rslora"]))
    return _Factors(key_a, a.T, b.T, alpha, scale)


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first regex matching a name suffix."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _targeted(settings: Mapping[str, Any], name: str) -> bool:
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


def _node(
    path: str,
    weight: Any,
    by_index: Mapping[tuple[int, ...], _Factors],
    config: LoraConfig | None,
    dropout: float,
) -> tuple[LoraNode, float]:
    first = next(iter(by_index.values()))
    n_stacked = len(next(iter(by_index)))
    shape = tuple(weight.shape)
    n_in, rank = first.a.shape
    n_out = first.b.shape[1]
    for factors in by_index.values():
        if factors.a.shape != first.a.shape or factors.b.shape != first.b.shape:
            raise ValueError(
                f"the layers of {path!r} have adapters of different shapes ({first.key!r}: "
                f"{first.a.shape[::-1]}, {factors.key!r}: {factors.a.shape[::-1]}); a stacked "
                "weight needs one rank for all layers. Load into unstacked (unscanned) params"
            )
        if np.float32(factors.scale) != np.float32(first.scale):
            raise ValueError(
                f"the layers of {path!r} have different scales ({first.key!r}: {first.scale}, "
                f"{factors.key!r}: {factors.scale}); a stacked weight has one scale. Load into "
                "unstacked (unscanned) params"
            )
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
            f"{first.key!r} and its lora_B hold a ({n_in} -> {n_out}) adapter of rank {rank}, but "
            f"{path!r} has shape {shape}{reads}; pass the base this adapter was trained for"
            + ("" if config is None else " and check input_axes")
        )
    # Cast on the host and device_put: an eager jnp cast, or jnp.asarray of a numpy array,
    # compiles one XLA program per shape.
    dtype = first.a.dtype if config is None else jnp.dtype(config.dtype)
    a = np.zeros((*layout.stacked, n_in, rank), dtype)
    b = np.zeros((*layout.stacked, rank, n_out), dtype)
    for index, factors in by_index.items():
        a[index], b[index] = factors.a, factors.b
    node = LoraNode(
        jax.device_put(a),
        jax.device_put(b),
        jax.device_put(np.float32(first.scale)),
        layout=layout,
        dropout=dropout,
    )
    return node, first.alpha


def _infer_layout(shape: tuple[int, ...], n_stacked: int, n_in: int) -> _paths.Layout | None:
    """Reads ``shape`` as stacked + inputs + outputs with ``prod(inputs) == n_in``."""
    for n_inputs in range(1, len(shape) - n_stacked):
        if math.prod(shape[n_stacked : n_stacked + n_inputs]) == n_in:
            return _paths.read_layout("", shape, n_stacked, n_inputs)
    return None


def _config(
    layouts: Mapping[str, _paths.Layout],
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    settings: Mapping[str, Any],
    config: LoraConfig | None,
    dropout: float,
    leaves: list[Any],
) -> LoraConfig:
    exact = {path: f"^{re.escape(path)}$" for path in layouts}
    rank = _most_common(ranks.values())
    alpha = _most_common(alphas.values())
    if config is None:
        stacked = {exact[p]: len(lay.stacked) for p, lay in layouts.items() if lay.stacked}
        inputs = {exact[p]: len(lay.inputs) for p, lay in layouts.items() if len(lay.inputs) != 1}
        layout_options: dict[str, Any] = {
            "stacked_axes": stacked or None,
            "input_axes": inputs or None,
        }
        dtype = jnp.result_type(*(n.a.dtype for n in leaves if n is not None))
        init = "gaussian"
    else:
        layout_options = {"stacked_axes": config.stacked_axes, "input_axes": config.input_axes}
        dtype, init = config.dtype, config.init
    return LoraConfig(
        rank=int(rank),
        alpha=alpha,
        targets=tuple(exact.values()),
        dropout=dropout,
        init=init,
        rslora=bool(settings["use_rslora"]),
        rank_pattern={exact[p]: r for p, r in ranks.items() if r != rank},
        alpha_pattern={exact[p]: a for p, a in alphas.items() if a != alpha},
        dtype=dtype,
        **layout_options,
    )
