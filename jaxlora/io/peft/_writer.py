"""``save_peft``: a delta as a PEFT adapter directory that ``peft.PeftModel`` loads."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import safetensors.numpy

from jaxlora._checks import delta_items
from jaxlora._hosts import is_primary, sync
from jaxlora.io.peft._format import (
    CONFIG_NAME,
    PREFIX,
    SHARED_PREFIX,
    WEIGHTS_NAME,
    Module,
    PeftCodec,
    check_module_name,
    check_no_suffixes,
    codec_of,
    host,
    module_name,
)
from jaxlora.io.peft._keymaps import KeyMap, as_key_map


def save_peft(
    directory: str | os.PathLike[str],
    delta: Any,
    *,
    config: Any,
    key_map: KeyMap | Callable[[str], str | None],
) -> pathlib.Path:
    """Writes ``delta`` as a PEFT adapter that ``peft.PeftModel.from_pretrained`` loads.

    LoRA and rsLoRA deltas become PEFT LoRA files, DoRA deltas LoRA files with
    ``use_dora`` and ``lora_magnitude_vector`` s, VeRA deltas VeRA files (with the
    shared projections, ``save_projection=true``) and AdaLoRA deltas AdaLoRA files.
    Each adapter's tensors go under ``base_model.model.<module>``, one module per
    layer for stacked adapters, in PEFT's orientation (``lora_A = aᵀ``,
    ``lora_B = bᵀ``), and ``target_modules`` lists every written module. For
    LoRA, ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` and
    ``use_rslora`` are set so that the scale PEFT computes for each module equals
    the adapter's ``scale`` in float32.

    Under ``jax.distributed`` every process calls it: arrays that span several
    processes are gathered, process 0 writes the files, and every process
    returns after they are written.

    Args:
        directory: the adapter directory; created if missing.
            ``adapter_config.json`` and ``adapter_model.safetensors`` in it are
            overwritten.
        delta: the delta from :func:`jaxlora.split` (or a trained one), of one
            method (PEFT files hold one).
        config: the config the delta was made with; its settings (rsLoRA,
            dropout, VeRA's ``d_initial``, AdaLoRA's schedule) are written.
        key_map: a :class:`KeyMap` or a function ``(path) -> PEFT module name | None``
            naming the PyTorch module of each adapted path; see :data:`LLAMA_KEY_MAP`.

    Returns:
        The adapter directory.

    Raises:
        TypeError: if ``config`` is not the delta's kind of config, ``delta`` holds
            something other than adapters and ``None``, or a node type has no PEFT
            format (or is a stack of adapters).
        ValueError: if ``delta`` has no adapter or mixes methods, ``key_map`` names
            no module for an adapted path, a stacked adapter's name has the wrong
            number of ``{}`` fields, two adapters get the same module, or one module
            name ends with another (PEFT's name patterns could not tell them apart).

    Example:
        >>> import pathlib, tempfile
        >>> import jax, jax.numpy as jnp, jaxlora, safetensors.numpy
        >>> from jaxlora.io import peft
        >>> params = {"encoder": {"layer_0": {"attention": {"self": {"query": {
        ...     "kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)}}}}}}
        >>> config = jaxlora.LoraConfig(rank=2, targets="query")
        >>> _, delta = jaxlora.split(params, config, key=jax.random.key(0))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = peft.save_peft(tmp, delta, config=config, key_map=peft.BERT_KEY_MAP)
        ...     tensors = safetensors.numpy.load_file(path / peft.WEIGHTS_NAME)
        >>> {name: value.shape for name, value in sorted(tensors.items())}
        {'base_model.model.encoder.layer.0.attention.self.query.lora_A.weight': (2, 8),
         'base_model.model.encoder.layer.0.attention.self.query.lora_B.weight': (6, 2)}
    """
    key_map = as_key_map(key_map)
    codec, modules = _modules(delta, key_map)
    tensors: dict[str, np.ndarray] = {}
    for module in modules:
        for suffix, tensor in codec.module_tensors(module).items():
            tensors[f"{PREFIX}{module.name}{suffix}"] = host(tensor)
    for name, tensor in codec.shared_tensors(modules).items():
        tensors[f"{SHARED_PREFIX}{name}"] = host(tensor)
    settings = {
        "peft_type": codec.peft_type,
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        **codec.settings(modules, config),
        "target_modules": sorted(m.name for m in modules),
    }
    directory = pathlib.Path(directory)
    if is_primary():  # under jax.distributed every process gathered the tensors; one writes
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")
        weights = str(directory / WEIGHTS_NAME)
        safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
    sync(f"jaxlora.save_peft {directory.absolute()}: written")
    return directory


def _modules(delta: Any, key_map: KeyMap) -> tuple[PeftCodec, list[Module]]:
    codec: PeftCodec | None = None
    first_path = ""
    modules: list[Module] = []
    owner: dict[str, str] = {}
    for path, node in delta_items(delta, "save_peft"):
        if node is None:
            continue
        node_codec = codec_of(node.kind)
        if node_codec is None:
            raise TypeError(
                f"{path!r} holds a {type(node).__name__}, which has no PEFT file format"
                + (
                    " (save each adapter of a stack: jaxlora.multi.select)"
                    if node.n_adapters
                    else ""
                )
            )
        if codec is None:
            codec, first_path = node_codec, path
        elif type(node_codec) is not type(codec) or vars(node_codec) != vars(codec):
            raise ValueError(
                f"{first_path!r} and {path!r} hold adapters of different methods; a PEFT file "
                "holds one method. Export them to separate directories."
            )
        node.check_shapes(path)
        template = module_name(key_map, path, node.layout)
        for index in np.ndindex(*node.layout.stacked):
            name = template.format(*index)
            check_module_name(name, path)
            if name in owner:
                raise ValueError(
                    f"key_map maps both {owner[name]!r} and {path!r} to the PEFT module "
                    f"{name!r}; every adapted weight needs its own module"
                )
            owner[name] = path
            modules.append(Module(name, path, index, node.layer(index), key_map.is_embedding(path)))
    if codec is None:
        raise ValueError(
            "delta holds no adapter (every leaf is None); pass the delta that jaxlora.split "
            "returned"
        )
    check_no_suffixes(owner)
    return codec, modules
