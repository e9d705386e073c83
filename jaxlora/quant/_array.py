"""``QuantizedArray``: a weight stored blockwise in 4 or 8 bits, and its dequantization.

The storage is described in :mod:`jaxlora.quant._quantize`, which makes these.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jaxlora.quant import _formats

__all__ = ["QuantizedArray", "bits_per_parameter", "is_quantized"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False)
class QuantizedArray:
    """A weight stored blockwise in 4 or 8 bits; shape-inspecting code can treat it as an array.

    Build one with :func:`quantize_array` (or :func:`quantize` on a tree) and get
    the weight back with :meth:`dequantize`. It is a pytree: ``codes`` and the
    scale arrays are its leaves, everything else is static, so it passes through
    ``jax.jit``, ``jax.tree.map`` and checkpointing like any other node.

    Blocks run along the flattened *stored* array: the weight itself, or with
    ``axes`` the weight stored in another axis order (a GGUF file stores a
    linear layer as ``(out, in)`` with its blocks along ``in``, where a Flax
    kernel is ``(in, out)``).

    Attributes:
        codes: the packed codes, flat. 4-bit formats: ``uint8 (size // 2,)``, two
            codes per byte, the first element in the high nibble (bitsandbytes'
            order), except ``"q4_1"``, in ggml's order (byte ``j`` of a block of
            32 holds element ``j`` in its low nibble and ``j + 16`` in its high
            one). ``"int8"`` and ``"q8_0"``: ``int8 (size,)``.
        scales: one per block, ``(size // block_size,)``: the float32 absmax, or
            with double quantization its int8 code (see ``scale_scales``); for
            ``"q4_1"`` and ``"q8_0"`` ggml's float16 scale ``d``.
        scale_scales: with double quantization, the float32 absmax of each group
            of ``scale_block_size`` centered block scales,
            ``(ceil(n_blocks / scale_block_size),)``; else ``None``.
        scale_mean: with double quantization, the float32 mean ``μ`` of the block
            absmax values (a scalar); else ``None``.
        shape: the original shape (static).
        dtype: the original dtype, which :meth:`dequantize` returns by default
            (static).
        format: ``"nf4"``, ``"fp4"``, ``"int4"``, ``"int8"``, ``"q4_1"`` or
            ``"q8_0"`` (static; see :mod:`jaxlora.quant._formats`).
        block_size: elements per block of the flattened stored array (static).
        scale_block_size: block scales per second-level group with double
            quantization, ``None`` without it (static).
        minimums: for ``"q4_1"``, ggml's float16 block minimum ``m``,
            ``(size // 32,)`` (a value is ``q · d + m``); else ``None``.
        axes: ``None`` when the codes are stored in the order of ``shape``; else
            the permutation that takes the stored array to the weight,
            ``weight = stored.transpose(axes)``, e.g. ``(1, 0)`` for a kernel
            stored transposed (static).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxlora.quant import quantize_array
        >>> w = jax.random.normal(jax.random.key(0), (4, 64, 32), jnp.bfloat16)
        >>> q = quantize_array(w, format="nf4", block_size=64)
        >>> q
        QuantizedArray(shape=(4, 64, 32), dtype=bfloat16, format='nf4', block_size=64,
                       double_quant=True, nbytes=4232)
        >>> q.shape, q.ndim, q.size, q.codes.shape, q.scales.dtype
        ((4, 64, 32), 3, 8192, (4096,), dtype('int8'))
        >>> q.dequantize().dtype, q.dequantize(jnp.float32).dtype
        (dtype(bfloat16), dtype('float32'))

    References:
        Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs.
        https://arxiv.org/abs/2305.14314
    """

    jaxlora_weight: ClassVar[bool] = True  # one parameter leaf (jaxlora._paths.is_box)

    codes: jax.Array
    scales: jax.Array
    scale_scales: jax.Array | None
    scale_mean: jax.Array | None
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
    format: str = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    scale_block_size: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    minimums: jax.Array | None = None
    axes: tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

    def __post_init__(self) -> None:
        if self.axes is not None and sorted(self.axes) != list(range(len(self.shape))):
            raise ValueError(
                f"QuantizedArray axes={self.axes} is not a permutation of the {len(self.shape)} "
                f"axes of shape {self.shape}; pass the order that takes the stored array to "
                "the weight, e.g. axes=(1, 0) for a kernel stored transposed, or axes=None"
            )

    @property
    def ndim(self) -> int:
        """The original number of axes."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """The original number of elements."""
        return math.prod(self.shape)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape the codes are stored in: ``shape`` permuted back by ``axes``."""
        if self.axes is None:
            return tuple(self.shape)
        stored = [0] * len(self.shape)
        for i, axis in enumerate(self.axes):
            stored[axis] = self.shape[i]
        return tuple(stored)

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves quantized."""
        return self.scale_block_size is not None

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes, scales, second-level scales and minimums."""
        arrays = (self.codes, self.scales, self.scale_scales, self.scale_mean, self.minimums)
        return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays if a is not None)

    def __repr__(self) -> str:
        axes = "" if self.axes is None else f"axes={self.axes}, "
        return (
            f"QuantizedArray(shape={self.shape}, dtype={self.dtype}, format={self.format!r}, "
            f"block_size={self.block_size}, double_quant={self.double_quant}, "
            f"{axes}nbytes={self.nbytes})"
        )

    def block_scales(self) -> jax.Array:
        """The absmax of each block as float32, ``(size // block_size,)``.

        Without double quantization these are the stored values; with it, the
        reconstruction ``INT8[code] · s2 + μ``. For ``"q4_1"`` and ``"q8_0"``, ggml's
        scale ``d``.

        Returns:
            a float32 array with one scale per block.

        Example:
            >>> import jax.numpy as jnp
            >>> from jaxlora.quant import quantize_array
            >>> w = jnp.arange(128.0).reshape(2, 64)
            >>> quantize_array(w, block_size=64, double_quant=False).block_scales()
            Array([ 63., 127.], dtype=float32)

        References:
            Dettmers et al. 2023, QLoRA, Section 3 ("Double Quantization").
            https://arxiv.org/abs/2305.14314
        """
        if self.scale_block_size is None:
            return self.scales.astype(jnp.float32)
        if self.scale_scales is None or self.scale_mean is None:
            raise ValueError(
                f"{self!r} has scale_block_size={self.scale_block_size} but no "
                "scale_scales/scale_mean; build it with quantize_array"
            )
        level2 = jnp.asarray(_formats.INT8)[jax.lax.bitcast_convert_type(self.scales, jnp.uint8)]
        group = jnp.repeat(self.scale_scales, self.scale_block_size)[: self.scales.shape[0]]
        return level2 * group + self.scale_mean

    def dequantize(self, dtype: DTypeLike | None = None) -> jax.Array:
        """The weight back in full precision: ``table[code] · block_absmax``.

        For ``"q4_1"`` ``q · d + m`` and for ``"q8_0"`` ``q · d``, bit for bit as
        ggml computes them. Then the stored array is transposed by ``axes``, if
        any. Pure ``jax.numpy``, so it works under ``jit``; it computes in float32
        and casts at the end.

        Args:
            dtype: the result's dtype; ``None`` means the original dtype.

        Returns:
            an array of the original shape.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> from jaxlora.quant import quantize_array
            >>> w = jax.random.normal(jax.random.key(1), (64, 64))
            >>> w_hat = jax.jit(lambda q: q.dequantize())(quantize_array(w))
            >>> w_hat.shape, bool(jnp.mean((w - w_hat) ** 2) < 0.01)
            ((64, 64), True)

        References:
            Dettmers et al. 2023, QLoRA. https://arxiv.org/abs/2305.14314
        """
        return _dequantize_jit(self, result_dtype(self.dtype if dtype is None else dtype))


def result_dtype(dtype: Any) -> np.dtype:
    """``dtype`` as a floating numpy dtype, or a ``TypeError`` that says what it got."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise TypeError(
            f"dequantize needs a floating dtype (jnp.float32, jnp.bfloat16, 'float16', ...) or "
            f"None for each weight's original dtype; got {dtype!r}"
        )
    return np.dtype(resolved)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize_jit(q: QuantizedArray, dtype: np.dtype) -> jax.Array:
    spec = _formats.get_format(q.format)
    if spec.ggml:
        values = _formats.decode_ggml(q.codes, q.scales, q.minimums, spec)
    else:
        if spec.bits == 4:
            index = jnp.stack([q.codes >> 4, q.codes & 0xF], axis=-1).reshape(-1)
        else:
            index = jax.lax.bitcast_convert_type(q.codes, jnp.uint8)
        values = jnp.asarray(spec.values)[index].reshape(-1, q.block_size)
        values = values * q.block_scales()[:, None]
    values = values.reshape(q.stored_shape)
    if q.axes is not None:
        values = values.transpose(q.axes)
    return values.astype(dtype)


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a :class:`QuantizedArray` (use as ``is_leaf=`` in tree functions).

    Args:
        x: anything.

    Returns:
        ``True`` for a :class:`QuantizedArray`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxlora.quant import is_quantized, quantize
        >>> tree = quantize({"w": jnp.ones((8, 8))}, block_size=64)
        >>> jax.tree.map(is_quantized, tree, is_leaf=is_quantized)
        {'w': True}

    References:
        Dettmers et al. 2023, QLoRA. https://arxiv.org/abs/2305.14314
    """
    return isinstance(x, QuantizedArray)


def bits_per_parameter(q: Any) -> float:
    """Stored bits per original parameter of a :class:`QuantizedArray` or of all those in a tree.

    Counts every stored byte (codes, block scales, second-level scales and the
    mean, ggml's block minimums) against the number of original elements;
    leaves that are not quantized are not counted.

    Args:
        q: a :class:`QuantizedArray`, or a pytree holding some.

    Returns:
        ``8 · nbytes / size`` as a Python float.

    Raises:
        ValueError: if ``q`` holds no :class:`QuantizedArray`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxlora.quant import bits_per_parameter, quantize_array
        >>> w = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)  # no memory needed
        >>> round(bits_per_parameter(jax.eval_shape(quantize_array, w)), 4)
        4.127
        >>> nodq = jax.eval_shape(lambda w: quantize_array(w, double_quant=False), w)
        >>> bits_per_parameter(nodq)
        4.5
        >>> bits_per_parameter(jax.eval_shape(lambda w: quantize_array(w, format="q4_1"), w))
        5.0

    References:
        Dettmers et al. 2023, QLoRA, Section 3 ("Double Quantization").
        https://arxiv.org/abs/2305.14314
    """
    found = [x for x in jax.tree.leaves(q, is_leaf=is_quantized) if is_quantized(x)]
    if not found:
        raise ValueError(
            f"bits_per_parameter needs a QuantizedArray or a tree holding some; got "
            f"{type(q).__name__} with none. Quantize it first with jaxlora.quant.quantize."
        )
    return 8.0 * sum(x.nbytes for x in found) / sum(x.size for x in found)
