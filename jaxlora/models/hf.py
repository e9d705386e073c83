"""Hugging Face checkpoints of Llama-family models: ``config.json`` into :class:`LlamaConfig`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from jaxlora.models.llama import LlamaConfig

__all__ = ["llama_config_from_hf"]

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
    return LlamaConfig(**{**fields, **overrides})
