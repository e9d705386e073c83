"""``load_peft``: a PEFT adapter directory as a delta for a base."""

from __future__ import annotations

import collections
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _paths
from jaxlora._node import is_node
from jaxlora.io.peft._format import (
    PREFIX,
    SHARED_PREFIX,
    UNSUPPORTED,
    WEIGHTS_NAME,
    PeftCodec,
    Target,
    codecs,
    targeted,
)
from jaxlora.io.peft._keymaps import KeyMap, as_key_map
from jaxlora.io.peft._reading import (
    check_common_settings,
    float_tensor,
    invert,
    read_json,
    read_tensors,
    unknown_module_message,
)

_BASE_COPY = ".base_layer.weight"  # a base weight PEFT saves with targeted embeddings


def load_peft(
    directory: str | os.PathLike[str],
    *,
    base: Any,
    key_map: KeyMap | Callable[[str], str | None],
    config: Any = None,
) -> tuple[Any, Any]:
    """Reads a PEFT adapter (LoRA, rsLoRA, DoRA, VeRA or AdaLoRA) into a delta for ``base``.

    The key map is inverted by mapping every weight of ``base``, so it only needs
    the jaxlora-to-PEFT direction. Scales are computed as PEFT computes them (for
    LoRA from ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` and
    ``use_rslora``). A stacked weight collects its layers' modules; layers the file
    does not cover get adapters that change nothing (as in PEFT). Copies of base
    weights that PEFT saves with a targeted embedding or ``lm_head`` layer are
    checked against ``base`` (unless it is quantized) and otherwise ignored.

    Args:
        directory: a directory with ``adapter_config.json`` and
            ``adapter_model.safetensors`` (``save_pretrained``'s output).
        base: the parameters the adapter is for (the frozen tree from
            :func:`jaxlora.split`, or the full params): their shapes are checked and
            the delta mirrors their structure. DoRA reads its base column norms here.
        key_map: a :class:`KeyMap` or a function ``(path) -> PEFT module name | None``;
            see :data:`LLAMA_KEY_MAP`.
        config: optional; its ``stacked_axes``/``input_axes`` say how to read the
            weights' axes (by default the input axes are read from the tensors'
            widths) and its ``dtype`` and ``dropout`` are kept. Ranks, alphas and
            the method's settings always come from the file.

    Returns:
        ``(delta, config)``: a delta with an adapter node at every adapted leaf of
        ``base`` and ``None`` elsewhere, and the config (a
        :class:`jaxlora.LoraConfig`, :class:`jaxlora.variants.VeraConfig` or
        :class:`jaxlora.variants.AdaLoraConfig`) that targets exactly those leaves
        and makes exactly those adapters.

    Raises:
        FileNotFoundError: if a file is missing.
        ValueError: if a file is damaged (invalid JSON, fields of the wrong type,
            bad regexes, non-float or truncated tensors) or not an adapter jaxlora
            reads; a tensor maps to no parameter of ``base`` (the message names
            it); a module lacks one of its tensors; shapes do not fit the
            parameter; a module is not in ``target_modules`` (PEFT would drop it);
            the layers of a stacked weight have different ranks or scales; or a
            saved base weight differs from ``base``.
        NotImplementedError: for methods and options jaxlora does not implement
            (``lora_bias``, aLoRA, ``modules_to_save``, convolution adapters, ...).

    Example:
        >>> import tempfile
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> from jaxlora.io import peft
        >>> params = {"layers_0": {"mlp": {"up_proj": {"kernel": jnp.ones((8, 16))}}}}
        >>> config = jaxlora.LoraConfig(rank=4, alpha=8, targets="up_proj")
        >>> base, delta = jaxlora.split(params, config, key=jax.random.key(0))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = peft.save_peft(tmp, delta, config=config, key_map=peft.LLAMA_KEY_MAP)
        ...     loaded, loaded_config = peft.load_peft(tmp, base=base, key_map=peft.LLAMA_KEY_MAP)
        >>> node = loaded["layers_0"]["mlp"]["up_proj"]["kernel"]
        >>> node.a.shape, node.b.shape, node.scale
        ((8, 4), (4, 16), 2.0)
        >>> bool(jnp.array_equal(node.a, delta["layers_0"]["mlp"]["up_proj"]["kernel"].a))
        True
        >>> loaded_config.scale_for("layers_0/mlp/up_proj/kernel")
        2.0
    """
    if base is None or any(is_node(x) for x in jax.tree.leaves(base, is_leaf=is_node)):
        what = "None" if base is None else "a tree that holds adapter nodes (a delta?)"
        raise TypeError(
            f"load_peft: base is {what}; pass the frozen parameters the adapter is for, the "
            "first output of jaxlora.split (base, delta = jaxlora.split(params, config, key=key))"
        )
    key_map = as_key_map(key_map)
    directory = pathlib.Path(directory)
    settings = read_json(directory)
    codec = _codec_for(settings)
    check_common_settings(settings, settings["file"])
    codec.check_settings(settings, settings["file"])
    tensors = read_tensors(directory)
    file = directory / WEIGHTS_NAME
    flat, treedef = jax.tree_util.tree_flatten_with_path(base, is_leaf=_paths.is_box)
    targets = invert(key_map, flat)
    modules, shared = _split_keys(tensors, codec, file)
    found: dict[int, dict[tuple[int, ...], tuple[str, dict]]] = collections.defaultdict(dict)
    for name, parts in modules.items():
        if name not in targets:
            raise ValueError(unknown_module_message(name, next(iter(parts.values()))[0], targets))
        target = targets[name]
        if "W" in parts:
            if not hasattr(target.weight, "dequantize"):  # a quantized base cannot match
                _check_saved_weight(parts.pop("W"), target, key_map.is_embedding(target.path))
            else:
                parts.pop("W")
        if not parts:
            continue
        _check_module(name, parts, target, settings, file)
        found[target.leaf][target.index] = (name, {p: (k, t) for p, (k, t, _) in parts.items()})
    leaves: list[Any] = [None] * len(flat)
    adapted = {}
    for leaf_index, layers in found.items():
        path = _paths.path_str(flat[leaf_index][0])
        weight = _paths.unbox(flat[leaf_index][1])
        node, info = codec.read(path, weight, layers, settings, shared, config)
        leaves[leaf_index] = node
        adapted[path] = (node, info)
    if not adapted:
        raise ValueError(f"{file} holds no adapter tensor; it is not an adapter file")
    try:
        out_config = codec.config(adapted, settings, config)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{settings['file']} holds settings jaxlora cannot turn into a config "
            f"({type(e).__name__}: {e}); the file is damaged or was edited"
        ) from None
    return treedef.unflatten(leaves), out_config


def _codec_for(settings: dict[str, Any]) -> PeftCodec:
    file = settings["file"]
    for field, what in UNSUPPORTED.items():
        if settings.get(field):
            raise NotImplementedError(
                f"{file} uses {what}, which jaxlora does not implement; it reads plain LoRA, "
                "rsLoRA, DoRA, VeRA and AdaLoRA adapters"
            )
    for codec in codecs():
        if codec.reads(settings):
            return codec
    known = sorted({c.peft_type for c in codecs()})
    raise ValueError(
        f"{file} describes a {settings.get('peft_type')!r} adapter; jaxlora reads peft_type "
        f"{known} (LORA with or without use_dora)"
    )


def _split_keys(
    tensors: dict[str, np.ndarray], codec: PeftCodec, file: pathlib.Path
) -> tuple[dict[str, dict[str, tuple[str, np.ndarray, bool | None]]], dict[str, np.ndarray]]:
    """``({module: {part: (key, tensor, embedding)}}, {shared name: tensor})``."""
    suffixes = {**codec.suffixes(), _BASE_COPY: ("W", None)}
    ordered = sorted(suffixes, key=len, reverse=True)  # the longest suffix that fits wins
    modules: dict[str, dict[str, tuple[str, np.ndarray, bool | None]]] = collections.defaultdict(
        dict
    )
    shared: dict[str, np.ndarray] = {}
    for key, tensor in tensors.items():
        if key.endswith(".lora_B.bias"):
            raise NotImplementedError(
                f"{file} holds {key!r}, a bias on lora_B (PEFT's lora_bias=True), which jaxlora "
                "does not implement"
            )
        if key.startswith(PREFIX):
            rest = key.removeprefix(PREFIX)
            suffix = next((s for s in ordered if rest.endswith(s)), None)
            if suffix is None:
                raise ValueError(
                    f"{file} holds {key!r}, which is no {codec.name} tensor jaxlora knows "
                    f"(it reads '<module>{{{', '.join(codec.suffixes())}}}'); refusing to drop it"
                )
            part, embedding = suffixes[suffix]
            tensor = float_tensor(key, tensor, file)
            modules[rest.removesuffix(suffix)][part] = (key, tensor, embedding)
        elif key.startswith(SHARED_PREFIX) and "." not in key.removeprefix(SHARED_PREFIX):
            shared[key.removeprefix(SHARED_PREFIX)] = float_tensor(key, tensor, file)
        else:
            raise ValueError(
                f"{file} holds {key!r}, which lacks PEFT's {PREFIX!r} prefix: PEFT would ignore "
                "it and load a no-op adapter. Rename the tensors to "
                f"'{PREFIX}<module>.<tensor>'"
            )
    return modules, shared


def _check_module(
    name: str, parts: dict[str, tuple[str, np.ndarray, bool | None]], target: Target,
    settings: dict[str, Any], file: pathlib.Path,
) -> None:  # fmt: skip
    for key, _, embedding in parts.values():
        if embedding is not None and embedding != target.embedding:
            kind = "an embedding" if target.embedding else "a linear layer"
            raise ValueError(
                f"{key!r} is stored as {'an embedding' if embedding else 'a linear'} adapter, but "
                f"the key map says {target.path!r} is {kind}; pass a KeyMap whose is_embedding "
                "matches the PyTorch model"
            )
    if not targeted(settings, name):
        key = next(iter(parts.values()))[0]
        raise ValueError(
            f"{file} holds {key!r}, but target_modules={settings.get('target_modules')!r} "
            f"does not select {name!r}: PEFT would create no adapter there and drop the "
            "tensors. Add the module to target_modules"
        )


def _check_saved_weight(part: tuple[str, np.ndarray, Any], target: Target, embedding: bool) -> None:
    key, tensor, _ = part
    weight = np.asarray(target.weight)
    if target.index:
        weight = weight[target.index]
    if tensor.ndim != 2 or tensor.size != weight.size:
        raise ValueError(
            f"{key!r} is a full weight of shape {tensor.shape}, but {target.path!r} holds "
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
            f"save_embedding_layers), and it differs from base's {target.path!r} by up to "
            f"{float(np.max(np.abs(got - want))):.3g}. A jaxlora delta cannot carry base "
            "weights: load base from the checkpoint the adapter was trained on (with its "
            "resized vocabulary, if any)"
        )
