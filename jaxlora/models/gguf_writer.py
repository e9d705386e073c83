"""Writing :class:`Llama` parameters as a GGUF file that llama.cpp and :func:`load_gguf_llama` read.

The inverse of :func:`jaxlora.models.gguf.load_gguf_llama`: kernels go back to
``(out, in)``, the query and key rows back to llama.cpp's order, and Q4_1/Q8_0
weights that are already in GGUF's layout keep their codes byte for byte.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlora.models import gguf as _gguf
from jaxlora.models.llama_config import LlamaConfig
from jaxlora.quant import QuantizedArray, quantize_array

__all__ = ["save_gguf_llama"]

_WRITE_FORMATS = (None, "q4_1", "q8_0")


def save_gguf_llama(
    path: str | os.PathLike,
    config: LlamaConfig,
    params: Mapping[str, Any],
    *,
    format: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Writes a :class:`Llama` parameter tree as a Llama GGUF file.

    Q4_1 and Q8_0 :class:`~jaxlora.quant.QuantizedArray` s stored the way GGUF
    stores them (as :func:`~jaxlora.models.gguf.load_gguf_llama` loads them)
    are written as they are. Other matrices (float, or quantized in another
    format or layout, which are dequantized first) are written as F32, or
    quantized with ggml's reference quantizer when ``format`` is given; norms
    are F32.

    Args:
        path: the file to write.
        config: the model's config (``scan_layers`` says whether ``params`` is
            stacked).
        params: ``Llama(config).init(...)["params"]``-shaped parameters.
        format: ``None`` (F32), ``"q4_1"`` or ``"q8_0"``: how to store the matrices
            that are not already Q4_1/Q8_0 in GGUF's layout.
        metadata: extra key-value metadata (e.g. ``"tokenizer.ggml.tokens"``):
            ``str``, ``bool``, ``int`` (written as uint32, or int32 if
            negative), ``float`` (float32) or a list of one of these.

    Raises:
        ValueError: for another ``format``, or ``params`` without a tensor the
            config needs.
        ImportError: without the ``gguf`` package.

    Example:
        >>> import os, tempfile, jax, jax.numpy as jnp, numpy as np
        >>> from jaxlora.models.llama import Llama, LlamaConfig
        >>> from jaxlora.models.gguf import load_gguf_llama
        >>> from jaxlora.models.gguf_writer import save_gguf_llama
        >>> cfg = LlamaConfig.tiny(n_layers=1)
        >>> params = jax.jit(Llama(cfg).init)(jax.random.key(0), jnp.zeros((1, 2), int))["params"]
        >>> path = os.path.join(tempfile.mkdtemp(), "tiny.gguf")
        >>> save_gguf_llama(path, cfg, params)  # F32: a lossless round trip
        >>> _, back = load_gguf_llama(path)
        >>> w = back["layers_0"]["self_attn"]["k_proj"]["kernel"]
        >>> bool(np.array_equal(w, params["layers_0"]["self_attn"]["k_proj"]["kernel"]))
        True
    """
    lib = _gguf.require_gguf()
    if format not in _WRITE_FORMATS:
        raise ValueError(f"format must be None, 'q4_1' or 'q8_0'; got {format!r}")
    writer = lib.GGUFWriter(os.fspath(path), arch="llama")
    for key, value in _llama_metadata(config).items():
        _add(writer, key, value)
    for key, value in (metadata or {}).items():
        _add(writer, key, value)
    shapes = _gguf._expected_shapes(config)
    for name, shape in shapes.items():
        keys, kernel, layer = _param_keys(name, config)
        leaf: Any = params
        for key in keys:
            if not isinstance(leaf, Mapping) or key not in leaf:
                raise ValueError(
                    f"params has no {'/'.join(keys)!r}, which GGUF tensor {name!r} needs"
                )
            leaf = leaf[key]
        data, ggml_type = _tensor(leaf, layer, kernel=kernel, format=format)
        short = name.split(".")[-2]
        if short in ("attn_q", "attn_k"):
            heads = config.n_heads if short == "attn_q" else config.n_kv_heads
            data = data[np.argsort(_gguf.rotary_rows(shape[0], heads))]
        raw_type = None if ggml_type is None else lib.GGMLQuantizationType[ggml_type]
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_metadata(config: LlamaConfig) -> dict[str, Any]:
    return {
        "llama.block_count": config.n_layers,
        "llama.context_length": config.max_len,
        "llama.embedding_length": config.d_model,
        "llama.feed_forward_length": config.d_ff,
        "llama.attention.head_count": config.n_heads,
        "llama.attention.head_count_kv": config.n_kv_heads,
        "llama.rope.freq_base": float(config.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": float(config.norm_eps),
        "llama.rope.dimension_count": config.head_dim,
        "llama.vocab_size": config.vocab_size,
    }


def _add(writer: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        (writer.add_uint32 if value >= 0 else writer.add_int32)(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list | tuple):
        writer.add_array(key, list(value))
    else:
        raise ValueError(
            f"metadata {key!r} is a {type(value).__name__}; pass str, bool, int, float or a list"
        )


def _param_keys(name: str, config: LlamaConfig) -> tuple[tuple[str, ...], bool, int | None]:
    """The parameter path of GGUF tensor ``name``, whether it is a kernel, and its layer."""
    parts = name.split(".")
    if parts[0] != "blk":
        keys, kernel = _gguf._GLOBAL_TENSORS[parts[0]]
        return keys, kernel, None
    keys, kernel = _gguf._LAYER_TENSORS[parts[2]]
    if config.scan_layers:
        return ("layers", *keys), kernel, int(parts[1])
    return (f"layers_{parts[1]}", *keys), kernel, None


def _tensor(value: Any, layer: int | None, *, kernel: bool, format: str | None) -> tuple:
    """``(data, ggml type name or None)`` for one tensor in GGUF's (HF's row) order."""
    if isinstance(value, QuantizedArray) and _in_gguf_layout(value, kernel, layer is not None):
        return _blocks(value, layer), value.format.upper()
    w = value.dequantize(jnp.float32) if isinstance(value, QuantizedArray) else value
    w = np.asarray(w, np.float32)
    if layer is not None:
        w = w[layer]
    if kernel:
        w = w.T
    if format is None or w.ndim != 2:
        return w, None
    return _blocks(quantize_array(w, format=format), None), format.upper()


def _in_gguf_layout(q: QuantizedArray, kernel: bool, stacked: bool) -> bool:
    if q.format not in _gguf._BLOCK_BYTES:
        return False
    if not kernel:
        return q.axes is None and not stacked
    return q.axes == ((0, 2, 1) if stacked else (1, 0))


def _blocks(q: QuantizedArray, layer: int | None) -> np.ndarray:
    """The ggml blocks of ``q`` (of one layer), ``uint8 (rows, bytes)``."""
    n = q.scales.shape[0]
    parts = [np.asarray(q.scales, "<f2").view(np.uint8).reshape(n, 2)]
    if q.minimums is not None:
        parts.append(np.asarray(q.minimums, "<f2").view(np.uint8).reshape(n, 2))
    parts.append(np.asarray(q.codes).view(np.uint8).reshape(n, -1))
    blocks = np.concatenate(parts, axis=1)
    stored = q.stored_shape
    rows = blocks.reshape(*stored[:-1], -1)
    return rows if layer is None else rows[layer]
