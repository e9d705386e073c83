"""Hugging Face checkpoints of Llama models: ``config.json`` and safetensors weights."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from jax.typing import DTypeLike

from jaxlora.models.llama import Llama, LlamaConfig

__all__ = ["llama_config_from_hf", "load_hf_llama"]

_HF_KEYS = {  # LlamaConfig field: (Llama-style key, GPT-style key)
    "d_model": ("hidden_size", "n_embd"),
    "n_layers": ("num_hidden_layers", "n_layer"),
    "n_heads": ("num_attention_heads", "n_head"),
    "vocab_size": ("vocab_size", "vocab_size"),
}


def llama_config_from_hf(
    source: str | os.PathLike | Mapping[str, Any], **overrides: Any
) -> LlamaConfig:
    """Reads a Hugging Face ``config.json`` into a :class:`jaxlora.models.llama.LlamaConfig`.

    Llama-style keys (``LlamaForCausalLM``, Mistral, Qwen2, ...): ``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
    ``intermediate_size``, ``vocab_size``, ``max_position_embeddings``,
    ``rope_theta``, ``rms_norm_eps``, ``tie_word_embeddings``. GPT-style keys
    (``n_embd``, ``n_layer``, ``n_head``, ``n_inner``, ``n_positions``) are read
    into the same Llama-style decoder: attention shapes, and so adapter counts
    on attention, are exact; the MLP is SwiGLU of width ``n_inner`` (default
    ``4 · n_embd``), three matrices where GPT has two; embeddings are tied
    unless ``tie_word_embeddings`` is false.

    Args:
        source: the path of a ``config.json``, or its parsed contents.
        **overrides: ``LlamaConfig`` fields to set after reading.

    Returns:
        The config.

    Raises:
        ValueError: if the file is not JSON, lacks a size, or the sizes are invalid.
        FileNotFoundError: if the path does not exist.

    Example:
        >>> from jaxlora.models.hf import llama_config_from_hf
        >>> cfg = llama_config_from_hf({"hidden_size": 2048, "num_hidden_layers": 22,
        ...     "num_attention_heads": 32, "num_key_value_heads": 4,
        ...     "intermediate_size": 5632, "vocab_size": 32000})
        >>> cfg.num_params()  # TinyLlama-1.1B
        1100048384
        >>> llama_config_from_hf({"n_embd": 768, "n_layer": 12, "n_head": 12,
        ...                       "vocab_size": 50257}).d_ff
        3072
    """
    if isinstance(source, Mapping):
        data, where = dict(source), "the config"
    else:
        where = os.fspath(source)
        with open(where, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where} holds a JSON {type(data).__name__}, not an object")
    gpt = "n_embd" in data and "hidden_size" not in data
    fields: dict[str, Any] = {}
    for field, keys in _HF_KEYS.items():
        key = keys[1] if gpt else keys[0]
        if key not in data:
            raise ValueError(
                f"{where} has no {key!r}; a Llama-style config.json needs hidden_size, "
                "num_hidden_layers, num_attention_heads, intermediate_size and vocab_size "
                "(a GPT-style one n_embd, n_layer, n_head and vocab_size)"
            )
        fields[field] = data[key]
    if gpt:
        fields["d_ff"] = data.get("n_inner") or 4 * fields["d_model"]
        fields["max_len"] = data.get("n_positions", 2048)
        fields["tie_embeddings"] = bool(data.get("tie_word_embeddings", True))
    else:
        if "intermediate_size" not in data:
            raise ValueError(f"{where} has no 'intermediate_size' (the MLP width)")
        fields["d_ff"] = data["intermediate_size"]
        fields["n_kv_heads"] = data.get("num_key_value_heads") or fields["n_heads"]
        fields["max_len"] = data.get("max_position_embeddings", 2048)
        fields["tie_embeddings"] = bool(data.get("tie_word_embeddings", False))
        for field, key in (("rope_theta", "rope_theta"), ("norm_eps", "rms_norm_eps")):
            if data.get(key) is not None:
                fields[field] = data[key]
        rope = data.get("rope_parameters") or {}  # transformers 5 keeps rope_theta here
        if isinstance(rope, Mapping) and rope.get("rope_theta") is not None:
            fields["rope_theta"] = rope["rope_theta"]
    return LlamaConfig(**{**fields, **overrides})


def load_hf_llama(
    directory: str | os.PathLike,
    *,
    scan_layers: bool = False,
    dtype: DTypeLike = jnp.float32,
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Loads a Hugging Face Llama checkpoint (``config.json`` + safetensors) for :class:`Llama`.

    Reads ``model.safetensors``, or the shards that ``model.safetensors.index.json``
    lists, into the parameter tree of ``Llama(config).init``: linear weights
    ``(out, in)`` become kernels ``(in, out)``, ``weight`` of the embedding and
    the norms become ``embedding`` and ``scale``; ``lm_head`` is absent when the
    embeddings are tied. Every tensor of the checkpoint must be used and every
    parameter found.

    Args:
        directory: what ``LlamaForCausalLM.save_pretrained`` wrote.
        scan_layers: stack the layers on a leading axis (``LlamaConfig.scan_layers``).
        dtype: the dtype of the parameters (and of ``config.param_dtype``).

    Returns:
        ``(config, params)``.

    Raises:
        FileNotFoundError: if the directory lacks ``config.json`` or the weights.
        ValueError: for a model the reference Llama does not compute (another
            ``model_type``, rope scaling, a head dimension that is not
            ``hidden_size / num_attention_heads``), a missing or unused tensor, or a
            tensor of another shape.

    Example:
        >>> import json, os, tempfile, numpy as np, safetensors.numpy
        >>> from jaxlora.models.hf import load_hf_llama
        >>> d = tempfile.mkdtemp()
        >>> sizes = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...              num_key_value_heads=1, intermediate_size=16, vocab_size=10,
        ...              tie_word_embeddings=True, model_type="llama")
        >>> with open(os.path.join(d, "config.json"), "w") as f:
        ...     _ = f.write(json.dumps(sizes))
        >>> shapes = {"model.embed_tokens.weight": (10, 8), "model.norm.weight": (8,),
        ...     "model.layers.0.input_layernorm.weight": (8,),
        ...     "model.layers.0.post_attention_layernorm.weight": (8,),
        ...     "model.layers.0.self_attn.q_proj.weight": (8, 8),
        ...     "model.layers.0.self_attn.k_proj.weight": (4, 8),
        ...     "model.layers.0.self_attn.v_proj.weight": (4, 8),
        ...     "model.layers.0.self_attn.o_proj.weight": (8, 8),
        ...     "model.layers.0.mlp.gate_proj.weight": (16, 8),
        ...     "model.layers.0.mlp.up_proj.weight": (16, 8),
        ...     "model.layers.0.mlp.down_proj.weight": (8, 16)}
        >>> safetensors.numpy.save_file({k: np.ones(v, np.float32) for k, v in shapes.items()},
        ...                             os.path.join(d, "model.safetensors"))
        >>> config, params = load_hf_llama(d)
        >>> config.tie_embeddings, params["layers_0"]["mlp"]["down_proj"]["kernel"].shape
        (True, (16, 8))
    """
    directory = pathlib.Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist; pass a save_pretrained directory")
    data = json.loads(config_file.read_text())
    _check_loadable(data, config_file)
    config = llama_config_from_hf(
        data, scan_layers=scan_layers, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype)
    )
    tensors = _read_safetensors(directory)
    abstract = jax.eval_shape(
        lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    )
    used: set[str] = set()

    def load(path: Any, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        keys = [str(getattr(k, "key", k)) for k in path]
        names = [_hf_name(keys, layer) for layer in (range(config.n_layers) if scan_layers
                 and keys[0] == "layers" else [None])]  # fmt: skip
        arrays = []
        for name in names:
            if name not in tensors:
                raise ValueError(
                    f"{directory} has no tensor {name!r} (for the parameter {'/'.join(keys)!r} of "
                    f"shape {leaf.shape}); pass the checkpoint of a LlamaForCausalLM"
                )
            used.add(name)
            tensor = np.asarray(tensors[name])
            arrays.append(tensor.T if keys[-1] == "kernel" else tensor)
        array = np.stack(arrays) if len(arrays) > 1 or keys[0] == "layers" else arrays[0]
        if array.shape != leaf.shape:
            raise ValueError(
                f"{names[0]!r} gives the parameter {'/'.join(keys)!r} the shape {array.shape}, "
                f"but {config_file} makes it {leaf.shape}; the checkpoint and its config disagree"
            )
        return jax.device_put(array.astype(jnp.dtype(dtype)))

    params = jax.tree_util.tree_map_with_path(load, abstract)
    tied_copy = {"lm_head.weight"} if config.tie_embeddings else set()  # the embedding again
    unused = sorted(set(tensors) - used - tied_copy)
    if unused:
        raise ValueError(
            f"{directory} holds {len(unused)} tensors the reference Llama has no place for, "
            f"e.g. {unused[:3]}; it computes plain Llama decoders (no biases, no extra "
            "modules). Load this model with its own code instead."
        )
    return config, params


def _check_loadable(data: Mapping[str, Any], where: Any) -> None:
    model_type = data.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(
            f"{where} describes a {model_type!r} model; load_hf_llama reads Llama checkpoints "
            "(model_type 'llama')"
        )
    rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
    rope_type = (
        rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else rope
    )
    if rope_type not in ("default", None):
        raise ValueError(
            f"{where} uses rope scaling {rope_type!r}; the reference Llama computes plain "
            "rotary embeddings only"
        )
    head_dim = data.get("head_dim")
    if head_dim is not None and head_dim * data["num_attention_heads"] != data["hidden_size"]:
        raise ValueError(
            f"{where} has head_dim={head_dim}, not hidden_size / num_attention_heads; the "
            "reference Llama cannot compute it"
        )


def _hf_name(keys: list[str], layer: int | None) -> str:
    """The Hugging Face tensor name of a parameter path (``layer``: the scanned layer)."""
    modules = keys[:-1]
    if modules == ["lm_head"]:
        return "lm_head.weight"
    parts = [
        f"layers.{layer}" if m == "layers" else m.replace("layers_", "layers.") for m in modules
    ]
    return "model." + ".".join(parts) + ".weight"


def _read_safetensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{directory} holds neither model.safetensors nor model.safetensors.index.json; "
            "save the model with safe_serialization=True"
        )
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(safetensors.numpy.load_file(str(directory / shard)))
    return tensors
