"""GGUF checkpoints (llama.cpp's format) of Llama models, for the reference :class:`Llama`.

:func:`load_gguf_llama` reads the metadata into a :class:`LlamaConfig` and the
tensors into the parameter tree of ``Llama(config).init``. ggml's Q4_1 and Q8_0
weights become :class:`jaxlora.quant.QuantizedArray` s in those formats, with
the file's own codes and scales (no requantization), so QLoRA trains on the
checkpoint as it was quantized. A GGUF file stores a linear layer as PyTorch
does, ``(out, in)``, with its blocks of 32 along ``in``; the Flax kernel is
``(in, out)``, so the arrays say ``axes=(1, 0)`` (the stored array transposed is
the kernel) and are dequantized, transposed, where they are used.

llama.cpp's converter permutes the rows of the query and key projections (per
head, from Hugging Face's "rotate half" rotary layout to adjacent pairs); the
loader undoes that on the stored rows, whole blocks at a time, so the weights
are Hugging Face's and :class:`Llama`'s rotary convention applies unchanged.

The tokenizer and chat template are in :mod:`jaxlora.models.gguf_tokenizer`;
:func:`jaxlora.models.gguf_writer.save_gguf_llama` writes such files.

References:
    GGUF: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jaxlora.models.llama_config import LlamaConfig
from jaxlora.quant import QuantizedArray

try:
    import gguf
except ImportError:  # pragma: no cover - the error is raised where a file is read
    gguf = None  # type: ignore[assignment]

__all__ = ["load_gguf_llama", "read_gguf_metadata", "rotary_rows"]

# GGUF tensor name in block i -> (path in the layer, is a linear layer's weight)
_LAYER_TENSORS: dict[str, tuple[tuple[str, ...], bool]] = {
    "attn_norm": (("input_layernorm", "scale"), False),
    "attn_q": (("self_attn", "q_proj", "kernel"), True),
    "attn_k": (("self_attn", "k_proj", "kernel"), True),
    "attn_v": (("self_attn", "v_proj", "kernel"), True),
    "attn_output": (("self_attn", "o_proj", "kernel"), True),
    "ffn_norm": (("post_attention_layernorm", "scale"), False),
    "ffn_gate": (("mlp", "gate_proj", "kernel"), True),
    "ffn_up": (("mlp", "up_proj", "kernel"), True),
    "ffn_down": (("mlp", "down_proj", "kernel"), True),
}
_GLOBAL_TENSORS: dict[str, tuple[tuple[str, ...], bool]] = {
    "token_embd": (("embed_tokens", "embedding"), False),
    "output_norm": (("norm", "scale"), False),
    "output": (("lm_head", "kernel"), True),
}
_BLOCK_FORMATS = {"Q4_1": "q4_1", "Q8_0": "q8_0"}  # ggml type name -> jaxlora.quant format
_BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}  # bytes per block of 32: d (f16), m (f16), codes
_FLOAT_TYPES = ("F32", "F16")


def require_gguf() -> Any:
    """The ``gguf`` package, or an ImportError that says how to install it."""
    if gguf is None:
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install 'gguf>=0.10'")
    return gguf


def _open(path: str | os.PathLike) -> Any:
    """A ``gguf.GGUFReader`` on ``path``, with clear errors for a missing or foreign file."""
    lib = require_gguf()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path!r}")
    try:
        reader = lib.GGUFReader(path)
    except ValueError as e:
        raise ValueError(f"{path!r} is not a GGUF file gguf can read: {e}") from None
    if reader.byte_order == "S":
        raise ValueError(f"{path!r} is a big-endian GGUF file; only little-endian is supported")
    return reader


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The key-value metadata of a GGUF file, as Python values.

    Args:
        path: a ``.gguf`` file.

    Returns:
        ``{key: value}``: strings, ints, floats, bools and lists of them, e.g.
        ``"general.architecture"``, ``"llama.block_count"``,
        ``"tokenizer.ggml.tokens"``, ``"tokenizer.chat_template"``.

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        ValueError: if it is not a GGUF file.
        ImportError: without the ``gguf`` package.

    Example:
        >>> import os, tempfile, gguf
        >>> from jaxlora.models.gguf import read_gguf_metadata
        >>> path = os.path.join(tempfile.mkdtemp(), "tiny.gguf")
        >>> w = gguf.GGUFWriter(path, arch="llama"); w.add_block_count(2)
        >>> w.write_header_to_file(); w.write_kv_data_to_file(); w.close()
        >>> meta = read_gguf_metadata(path)
        >>> meta["general.architecture"], meta["llama.block_count"]
        ('llama', 2)
    """
    return _metadata_of(_open(path))


def _metadata_of(reader: Any) -> dict[str, Any]:
    """The metadata of an open ``GGUFReader`` (without its ``GGUF.*`` header fields)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def load_gguf_llama(
    path: str | os.PathLike,
    *,
    scan_layers: bool = False,
    quantized: bool = True,
    dtype: DTypeLike = jnp.float32,
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Reads a Llama GGUF file into a :class:`LlamaConfig` and :class:`Llama` parameters.

    The config comes from the ``llama.*`` metadata (``block_count``,
    ``embedding_length``, ``feed_forward_length``, ``attention.head_count``,
    ``attention.head_count_kv``, ``rope.freq_base``,
    ``attention.layer_norm_rms_epsilon``, ``context_length`` as ``max_len``,
    ``vocab_size``); embeddings are tied when the file has no ``output.weight``.
    Its ``param_dtype`` is ``dtype`` (set the compute ``dtype`` with
    ``dataclasses.replace``).

    Args:
        path: a ``.gguf`` file with ``general.architecture = "llama"``.
        scan_layers: stack the layers on a leading axis under ``layers``, for
            ``LlamaConfig(scan_layers=True)``; quantized weights are stacked too.
        quantized: keep Q4_1 and Q8_0 tensors as :class:`QuantizedArray` s in
            their own format (dequantizing to ``dtype``); ``False`` dequantizes
            them (bit for bit as ggml does, then cast to ``dtype``).
        dtype: the dtype of the float parameters (F32 and F16 tensors, such as
            the norms) and of the dequantized weights.

    Returns:
        ``(config, params)``, where ``params`` has the structure and shapes of
        ``Llama(config).init(key, tokens)["params"]``. Quantized, it is the
        frozen base of :func:`jaxlora.split` and :func:`jaxlora.lora_apply`
        (which dequantize each weight where it is used), or
        ``jaxlora.dequantize(params)`` gives a plain tree; unquantized, use it
        as ``Llama(config).apply({"params": params}, tokens)``.

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        ValueError: if it is not a GGUF file, not a Llama model, uses a feature the
            reference model lacks (partial rotary, rope scaling, biases), lacks a
            tensor or key, has a tensor of the wrong shape or of a ggml type other
            than F32, F16, Q4_1 and Q8_0 (the message names the tensor), or, with
            ``scan_layers``, a weight whose type differs between layers.
        ImportError: without the ``gguf`` package.

    Example:
        >>> import os, tempfile, jax, jax.numpy as jnp
        >>> from jaxlora.models.llama import Llama, LlamaConfig
        >>> from jaxlora.models.gguf import load_gguf_llama
        >>> from jaxlora.models.gguf_writer import save_gguf_llama
        >>> cfg = LlamaConfig.tiny(n_layers=1, tie_embeddings=True)
        >>> tokens = jnp.array([[1, 2, 3]])
        >>> params = jax.jit(Llama(cfg).init)(jax.random.key(0), tokens)["params"]
        >>> path = os.path.join(tempfile.mkdtemp(), "tiny.gguf")
        >>> save_gguf_llama(path, cfg, params, format="q4_1")
        >>> config, loaded = load_gguf_llama(path)
        >>> config.n_kv_heads, config.tie_embeddings
        (2, True)
        >>> loaded["layers_0"]["self_attn"]["q_proj"]["kernel"]
        QuantizedArray(shape=(64, 64), dtype=float32, format='q4_1', block_size=32,
                       double_quant=False, axes=(1, 0), nbytes=2560)
        >>> import jaxlora
        >>> base, delta = jaxlora.split(loaded, jaxlora.LoraConfig(rank=2, targets="q_proj"),
        ...                             key=jax.random.key(1))
        >>> apply = lambda p, t: Llama(config).apply({"params": p}, t)
        >>> forward = jax.jit(jaxlora.lora_apply(apply))
        >>> forward(base, delta, tokens).shape  # QLoRA on the file's own 4-bit codes
        (1, 3, 256)
    """
    reader = _open(path)
    where = os.fspath(path)
    tensors = {t.name: t for t in reader.tensors}
    config = _config(
        _metadata_of(reader),
        where,
        tie_embeddings="output.weight" not in tensors,
        scan_layers=scan_layers,
        dtype=dtype,
    )
    expected = _expected_shapes(config)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ValueError(
            f"{where} has tensors the reference Llama has no parameter for: "
            f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''} (biases, rope "
            "frequency factors and experts are not supported)"
        )

    def param(names: Sequence[str], kernel: bool, stacked: bool) -> Any:
        raws = [_raw_tensor(tensors, name, expected[name], where, config) for name in names]
        if len({fmt for fmt, _ in raws}) > 1:
            raise ValueError(
                f"{where}: {names[0]} ... {names[-1]} have different ggml types in different "
                "layers, so they cannot be stacked; load with scan_layers=False or quantized=False"
            )
        fmt = raws[0][0]
        data = np.stack([raw for _, raw in raws]) if stacked else raws[0][1]
        if fmt is None:
            return jnp.asarray(data.swapaxes(-1, -2) if kernel else data, dtype)
        q = _quantized(fmt, data, kernel=kernel, dtype=dtype)
        return q if quantized else q.dequantize(dtype)

    params: dict[str, Any] = {}
    for short, (keys, kernel) in _GLOBAL_TENSORS.items():
        if f"{short}.weight" in expected:
            _put(params, keys, param([f"{short}.weight"], kernel, stacked=False))
    for short, (keys, kernel) in _LAYER_TENSORS.items():
        names = [f"blk.{i}.{short}.weight" for i in range(config.n_layers)]
        if scan_layers:
            _put(params, ("layers", *keys), param(names, kernel, stacked=True))
        else:
            for i, name in enumerate(names):
                _put(params, (f"layers_{i}", *keys), param([name], kernel, stacked=False))
    return config, params


def _config(
    meta: dict[str, Any],
    where: str,
    *,
    tie_embeddings: bool,
    scan_layers: bool = False,
    dtype: DTypeLike = jnp.float32,
) -> LlamaConfig:
    """The :class:`LlamaConfig` of a Llama GGUF file's metadata (see :func:`load_gguf_llama`)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{where} holds a {arch!r} model (general.architecture); load_gguf_llama reads "
            "'llama' models only"
        )

    def get(key: str, default: Any = ...) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is ...:
            raise ValueError(f"{where} has no metadata key 'llama.{key}', which a Llama GGUF needs")
        if isinstance(value, list):
            raise ValueError(
                f"{where} has per-layer values for 'llama.{key}'; the reference Llama has the "
                "same shapes in every layer"
            )
        return value

    n_heads, d_model = int(get("attention.head_count")), int(get("embedding_length"))
    head_dim = d_model // n_heads if n_heads else 0
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if get(key, head_dim) != head_dim:
            raise ValueError(
                f"{where} has llama.{key} = {get(key)}, not the head dimension {head_dim}; the "
                "reference Llama rotates and attends over whole heads"
            )
    scaling = get("rope.scaling.type", "none")
    if scaling != "none" or get("rope.scaling.factor", 1.0) != 1.0:
        raise ValueError(
            f"{where} uses rope scaling ({scaling!r}), which the reference Llama lacks"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    return LlamaConfig(
        vocab_size=int(get("vocab_size", len(tokens) if tokens else ...)),
        d_model=d_model,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        d_ff=int(get("feed_forward_length")),
        max_len=int(get("context_length", 2048)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings=tie_embeddings,
        scan_layers=scan_layers,
        param_dtype=dtype,
    )


def _expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> its shape in numpy order (``(out, in)`` for a linear layer)."""
    d, q, kv = config.d_model, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    per_layer = {
        "attn_norm": (d,),
        "attn_q": (q, d),
        "attn_k": (kv, d),
        "attn_v": (kv, d),
        "attn_output": (d, q),
        "ffn_norm": (d,),
        "ffn_gate": (config.d_ff, d),
        "ffn_up": (config.d_ff, d),
        "ffn_down": (d, config.d_ff),
    }
    shapes = {"token_embd.weight": (config.vocab_size, d), "output_norm.weight": (d,)}
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, d)
    for i in range(config.n_layers):
        shapes.update({f"blk.{i}.{k}.weight": v for k, v in per_layer.items()})
    return shapes


def rotary_rows(rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation: ``hf_rows = gguf_rows[index]``.

    llama.cpp stores Hugging Face's row ``h·hd + j·hd/2 + i`` (head ``h``, half
    ``j``, frequency ``i``) at row ``h·hd + 2i + j``; this is the inverse.
    Applying it to the stored rows moves whole blocks (they run along a row).

    Args:
        rows: output rows of the projection, ``n_heads · head_dim``.
        n_heads: query heads for ``attn_q``, key/value heads for ``attn_k``.

    Returns:
        an int array of ``rows`` indices.

    Example:
        >>> from jaxlora.models.gguf import rotary_rows
        >>> rotary_rows(8, 1).tolist()  # head_dim 8: pairs (0, 1), (2, 3), ... to halves
        [0, 2, 4, 6, 1, 3, 5, 7]
    """
    return np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).swapaxes(1, 2).reshape(-1)


def _raw_tensor(
    tensors: dict[str, Any], name: str, shape: tuple[int, ...], where: str, config: LlamaConfig
) -> tuple[str | None, np.ndarray]:
    """``(format, data)``: ggml blocks ``uint8 (rows, bytes)`` in HF's row order, or floats."""
    if name not in tensors:
        raise ValueError(f"{where} has no tensor {name!r}, which a Llama GGUF needs")
    t = tensors[name]
    ggml_type = require_gguf().GGMLQuantizationType(int(t.tensor_type)).name
    found = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ggml's ne, fastest first
    if found != shape:
        raise ValueError(f"{where}: tensor {name!r} has shape {found}, expected {shape}")
    if ggml_type in _BLOCK_FORMATS:
        if len(shape) != 2:
            raise ValueError(f"{where}: tensor {name!r} is {ggml_type} but not a matrix")
        fmt, data = _BLOCK_FORMATS[ggml_type], np.asarray(t.data, np.uint8).reshape(shape[0], -1)
    elif ggml_type in _FLOAT_TYPES:
        fmt, data = None, np.asarray(t.data).reshape(shape)
    else:
        raise ValueError(
            f"{where}: tensor {name!r} has ggml type {ggml_type}; load_gguf_llama reads "
            f"{', '.join([*_FLOAT_TYPES, *_BLOCK_FORMATS])} (requantize the file with llama.cpp's "
            "llama-quantize, e.g. to Q4_1 or Q8_0)"
        )
    short = name.split(".")[-2]
    if short in ("attn_q", "attn_k"):
        heads = config.n_heads if short == "attn_q" else config.n_kv_heads
        data = data[rotary_rows(shape[0], heads)]
    return fmt, data


def _quantized(fmt: str, data: np.ndarray, *, kernel: bool, dtype: DTypeLike) -> QuantizedArray:
    """A :class:`QuantizedArray` over ggml blocks ``uint8 (..., rows, bytes)``, as they are.

    A kernel's logical shape is ``(..., in, out)`` over the stored
    ``(..., out, in)``: the last two axes swap, any leading (layer) axis stays.
    """
    type_size = _BLOCK_BYTES[fmt]
    blocks = data.reshape(-1, type_size)
    lead, rows = data.shape[:-2], data.shape[-2]
    stored = (*lead, rows, data.shape[-1] // type_size * 32)
    axes = (*range(len(lead)), len(lead) + 1, len(lead)) if kernel else None
    half = lambda a: jnp.asarray(np.ascontiguousarray(a).view("<f2").reshape(-1))
    if fmt == "q4_1":
        codes, minimums = jnp.asarray(blocks[:, 4:].reshape(-1)), half(blocks[:, 2:4])
    else:
        codes, minimums = jnp.asarray(blocks[:, 2:].reshape(-1).view(np.int8)), None
    return QuantizedArray(
        codes=codes,
        scales=half(blocks[:, 0:2]),
        scale_scales=None,
        scale_mean=None,
        shape=stored if axes is None else tuple(stored[a] for a in axes),
        dtype=np.dtype(dtype),
        format=fmt,
        block_size=32,
        minimums=minimums,
        axes=axes,
    )


def _put(tree: dict[str, Any], keys: Sequence[str], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value
