"""The quantization formats: NF4, FP4 (E2M1), INT4, INT8, and ggml's Q4_1 and Q8_0.

A format maps each stored code to a value in ``[-1, 1]``; a block of weights is
stored as codes plus the block's absolute maximum (absmax), and code ``c``
decodes to ``table[c] * absmax``. Each table below is a read-only float32 numpy
array **indexed by the stored bit pattern**: the 4-bit nibble for the 4-bit
formats, the int8 byte read as unsigned for INT8.

- ``NF4``: NormalFloat4 (Dettmers et al. 2023), the 16 values ascending from
  -1.0 to 1.0 with an exact 0, so code order is value order (bitsandbytes'
  order). Built here from the paper's definition, see :func:`normal_float4`; it
  matches bitsandbytes' published table within 2e-7.
- ``FP4``: the OCP Microscaling E2M1 format (sign, 2 exponent bits with bias 1,
  1 mantissa bit; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6) divided by 6, so the
  packed nibbles are valid OCP FP4 bit patterns. Code 8 is ``-0.0``; quantization
  always writes ``+0`` (code 0). bitsandbytes' ``fp4`` is a different table (its
  own exponent bias and subnormal), so its packed data is not interchangeable.
- ``INT4``: symmetric absmax integers ``q / 7`` for the two's-complement nibble
  ``q`` in ``[-8, 7]``. Quantization writes only ``q`` in ``[-7, 7]``; code 8
  (``q = -8``) decodes to ``-8/7`` and is never produced.
- ``INT8``: symmetric absmax integers ``q / 127`` for the int8 code ``q``;
  ``q = -128`` (``INT8[128]``) decodes to ``-128/127`` and is never produced.

Rounding is to the table value nearest to the scaled weight
``y = x · (1/absmax)`` (float32, reciprocal rounded first), exactly: an exact tie
between two values goes to the smaller one (as a comparison tree that tests
``y > midpoint``, like bitsandbytes' kernels).

ggml's block formats (as in GGUF files; ``ggml-common.h``, ``ggml-quants.c``)
have their own arithmetic instead of a table in ``[-1, 1]``: blocks of 32, a
float16 scale ``d`` per block and integer codes ``q``.

- ``"q4_1"``: unsigned 4-bit ``q`` and a float16 minimum ``m`` per block;
  ``x = q · d + m``. Quantization takes ``d = (max − min) / 15`` and
  ``q = trunc((x − min) · (1/d) + 0.5)`` clipped to ``[0, 15]``. The 16 bytes of
  a block hold elements ``j`` (low nibble) and ``j + 16`` (high nibble).
- ``"q8_0"``: int8 ``q``; ``x = q · d``, with ``d = absmax / 127`` and
  ``q = round(x · (1/d))``, halves away from zero.

Both reproduce ggml's reference quantizers and dequantizers bit for bit (see
:func:`encode_ggml`, :func:`decode_ggml`).

Example:
    >>> from jaxlora.quant import NF4, FP4, INT4, INT8, FORMATS
    >>> NF4.shape, float(NF4[0]), float(NF4[7]), float(NF4[15])
    ((16,), -1.0, 0.0, 1.0)
    >>> [round(float(v) * 6, 3) for v in FP4[:8]]
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    >>> float(INT4[15] * 7), float(INT8[255] * 127)
    (-1.0, -1.0)
    >>> sorted(FORMATS)
    ['fp4', 'int4', 'int8', 'nf4']

References:
    Dettmers, Pagnoni, Holtzman, Zettlemoyer. QLoRA: Efficient Finetuning of
    Quantized LLMs. 2023. https://arxiv.org/abs/2305.14314
    ggml's block formats: https://github.com/ggml-org/ggml (``ggml-common.h``).
"""

from __future__ import annotations

import dataclasses
import numbers
import types
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._config import check_bool

GGML_BLOCK_SIZE = 32


def normal_float4() -> np.ndarray:
    """Builds the NF4 table from the definition in the QLoRA paper.

    NF4 places its values at quantiles of the standard normal, normalized to
    ``[-1, 1]``, with an exact zero and an asymmetric split: 8 positive values
    (the 8 quantiles at probabilities spaced evenly from ``δ`` down to, but
    excluding, 0.5), 7 negative ones (the 7 quantiles spaced evenly from ``δ``
    to 0.5, negated) and 0. ``δ = 1 − ½(1/30 + 1/32) ≈ 0.9677`` is the midpoint of
    ``1 − 1/(2·15)`` and ``1 − 1/(2·16)``, the outermost quantile of 15 and 16
    equal-probability bins, which keeps the ends of the code finite. Quantiles
    come from :meth:`statistics.NormalDist.inv_cdf` in float64, and the result
    is divided by its largest value and rounded to float32.

    Returns:
        a float32 array of 16 values, ascending, ``[-1.0, ..., 0.0, ..., 1.0]``.

    Example:
        >>> from jaxlora.quant._formats import normal_float4
        >>> table = normal_float4()
        >>> round(float(table[8]), 6), round(float(table[6]), 6)
        (0.07958, -0.09105)

    References:
        Dettmers et al. 2023, QLoRA, Section 3 ("4-bit NormalFloat
        Quantization"). https://arxiv.org/abs/2305.14314
    """
    delta = 1.0 - 0.5 * (1.0 / 30.0 + 1.0 / 32.0)
    quantile = NormalDist().inv_cdf
    positive = [quantile(float(p)) for p in np.linspace(delta, 0.5, 9)[:-1]]
    negative = [-quantile(float(p)) for p in np.linspace(delta, 0.5, 8)[:-1]]
    values = np.sort(np.array([*negative, 0.0, *positive])) / max(positive)
    return values.astype(np.float32)


def _e2m1() -> np.ndarray:
    values = []
    for code in range(16):
        sign = -1.0 if code & 0b1000 else 1.0
        exponent, mantissa = (code >> 1) & 0b11, code & 0b1
        # Bias 1; exponent 0 is subnormal: 0.m * 2^(1 - 1).
        magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
        values.append(sign * magnitude / 6.0)
    return np.array(values, np.float32)


def _twos_complement(bits: int, scale: int) -> np.ndarray:
    raw = np.arange(2**bits)
    return (np.where(raw < 2 ** (bits - 1), raw, raw - 2**bits) / scale).astype(np.float32)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


NF4 = _readonly(normal_float4())
FP4 = _readonly(_e2m1())
INT4 = _readonly(_twos_complement(4, 7))
INT8 = _readonly(_twos_complement(8, 127))

FORMATS: Mapping[str, np.ndarray] = types.MappingProxyType(
    {"nf4": NF4, "fp4": FP4, "int4": INT4, "int8": INT8}
)


@dataclasses.dataclass(frozen=True, eq=False)
class Format:
    """What the quantizer needs to know about one format (private).

    Attributes:
        name: ``"nf4"``, ``"fp4"``, ``"int4"`` or ``"int8"``.
        bits: 4 or 8.
        values: the table, indexed by stored bit pattern.
        thresholds: float32, ascending; ``y`` falls in interval
            ``i = #{t : y >= t}``. Each is the smallest float32 above the exact
            midpoint of two neighbouring values, so ``y >= t`` iff ``y`` is
            strictly above the midpoint (exact ties go down).
        interval_codes: the stored code of interval ``i`` (uint8 nibble or int8).
        grid: for INT8, 127: the distinct values are ``k / grid`` for ``k`` from
            ``-grid - 1``, so ``round(y · grid) + grid + 1`` is the interval of
            ``y`` give or take one. ``None`` for the 4-bit formats.
        ggml: a ggml block format (``"q4_1"``, ``"q8_0"``): blocks of
            :data:`GGML_BLOCK_SIZE`, float16 scales, its own arithmetic
            (:func:`encode_ggml`); ``values`` are then the integer codes and
            ``thresholds`` and ``interval_codes`` are empty.
        minimums: whether a block stores a minimum too (``"q4_1"``).
    """

    name: str
    bits: int
    values: np.ndarray
    thresholds: np.ndarray
    interval_codes: np.ndarray
    grid: int | None = None
    ggml: bool = False
    minimums: bool = False


def _make_format(name: str, values: np.ndarray, bits: int, grid: int | None = None) -> Format:
    # Distinct values ascending; of equal values (FP4's ±0) the lowest code wins.
    order = np.lexsort((np.arange(values.size), values))
    kept = [int(order[0])]
    for code in order[1:]:
        if values[code] != values[kept[-1]]:
            kept.append(int(code))
    distinct = values[kept].astype(np.float64)
    midpoints = (distinct[:-1] + distinct[1:]) / 2  # exact in float64
    thresholds = midpoints.astype(np.float32)
    below = thresholds.astype(np.float64) <= midpoints
    thresholds[below] = np.nextafter(thresholds[below], np.float32(np.inf))
    storage = np.uint8 if bits == 4 else np.int8
    codes = np.array(kept).astype(np.uint8).astype(storage)  # int8 wraps 128..255 to -128..-1
    return Format(name, bits, values, _readonly(thresholds), _readonly(codes), grid)


_EMPTY = _readonly(np.zeros(0, np.float32))
_Q4 = _readonly(np.arange(16, dtype=np.float32))  # unsigned nibbles
_Q8 = _readonly(_twos_complement(8, 1))  # int8 codes, indexed by the byte read as unsigned

FORMAT_SPECS: Mapping[str, Format] = types.MappingProxyType(
    {
        "nf4": _make_format("nf4", NF4, 4),
        "fp4": _make_format("fp4", FP4, 4),
        "int4": _make_format("int4", INT4, 4),
        "int8": _make_format("int8", INT8, 8, grid=127),
        "q4_1": Format("q4_1", 4, _Q4, _EMPTY, _EMPTY, ggml=True, minimums=True),
        "q8_0": Format("q8_0", 8, _Q8, _EMPTY, _EMPTY, ggml=True),
    }
)


def get_format(name: object) -> Format:
    """The :class:`Format` called ``name``, or a ValueError listing the formats."""
    if not isinstance(name, str) or name not in FORMAT_SPECS:
        raise ValueError(
            f"unknown quantization format {name!r}; choose one of "
            f"{', '.join(map(repr, FORMAT_SPECS))} (e.g. format='nf4')"
        )
    return FORMAT_SPECS[name]


class _FormatDefault:
    def __repr__(self) -> str:
        return "<the format's default>"


# The default of block_size (64; 32 for q4_1/q8_0) and double_quant (True; False for those).
DEFAULT: Any = _FormatDefault()


def resolve_options(format: str, block_size: Any, double_quant: Any) -> tuple[int, bool]:
    """``(block_size, double_quant)`` with the format's defaults filled in, checked."""
    ggml = get_format(format).ggml
    if block_size is DEFAULT:
        block_size = GGML_BLOCK_SIZE if ggml else 64
    if double_quant is DEFAULT:
        double_quant = not ggml
    check_bool("double_quant", double_quant)
    check_block_size(block_size, format)
    if ggml and block_size != GGML_BLOCK_SIZE:
        raise ValueError(
            f"format={format!r} has blocks of {GGML_BLOCK_SIZE} only; got "
            f"block_size={block_size}. Leave block_size out (or pass 32)."
        )
    if ggml and double_quant:
        raise ValueError(
            f"format={format!r} stores float16 block scales, which are not quantized again: "
            "double quantization does not apply. Leave double_quant out (or pass False)."
        )
    return int(block_size), bool(double_quant)


def check_block_size(block_size: Any, format: str, what: str = "block_size") -> None:
    """Raises a ValueError unless ``block_size`` is a positive int (even for 4 bits)."""
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, numbers.Integral)
        or block_size < 1
    ):
        raise ValueError(f"{what} must be a positive int; got {block_size!r}")
    if format != "int8" and what == "block_size" and block_size % 2:
        raise ValueError(
            f"block_size={block_size} is odd; format={format!r} packs two 4-bit codes per "
            f"byte, so the block size must be even (64 is the usual choice)"
        )


def reciprocal(scale: jax.Array) -> jax.Array:
    """``1 / scale``, and 1 where ``scale`` is 0 (an all-zero block encodes to zeros either way)."""
    return 1.0 / jnp.where(scale > 0, scale, jnp.ones_like(scale))


def encode(y: jax.Array, spec: Format) -> jax.Array:
    """The code of the table value nearest to each ``y`` in ``[-1, 1]``; ties go down."""
    thresholds = spec.thresholds
    if spec.grid is None:
        # One fused elementwise pass: count the thresholds at or below y.
        index = sum(
            ((y >= np.float32(t)).astype(jnp.int32) for t in thresholds),
            start=jnp.zeros(y.shape, jnp.int32),
        )
    else:
        # A uniform grid: rounding finds the interval give or take one, and the two
        # neighbouring thresholds settle it exactly (also at ties).
        n = thresholds.size
        guess = jnp.round(y * np.float32(spec.grid)).astype(jnp.int32) + spec.grid + 1
        guess = jnp.clip(guess, 1, n)
        table = jnp.asarray(thresholds)
        up = (guess < n) & (y >= table[jnp.minimum(guess, n - 1)])
        down = y < table[guess - 1]
        index = guess + up.astype(jnp.int32) - down.astype(jnp.int32)
    codes = spec.interval_codes
    if np.array_equal(codes.astype(np.int64), np.arange(codes.size)):
        return index.astype(codes.dtype)
    return jnp.asarray(codes)[index]


# The float32 just below 0.5: fl(t + 0.5) rounds up to 1 there (a tie, to even).
_BELOW_HALF = np.nextafter(np.float32(0.5), np.float32(0))


def encode_ggml(blocks: jax.Array, spec: Format) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """ggml's reference quantizer of ``blocks``, bit for bit: codes, scales and minimums.

    The arithmetic is float32 as in ``quantize_row_q4_1_ref`` and
    ``quantize_row_q8_0_ref``, written so that XLA's rewrites cannot change a
    bit: XLA turns a division by a constant into a multiplication by its
    reciprocal (so the divisor 15 or 127 is made opaque with ``+ 0 · span``,
    which IEEE arithmetic does not let it fold), and contracts a multiplication
    followed by an addition into one fused multiply-add (so ``t + 0.5`` after
    ``t = (x − min) · (1/d)`` is never formed: for ``t >= 0``,
    ``trunc(fl(t + 0.5))`` is ``floor(t) + [t >= floor(t) + 0.5]``, except at the
    float32 just below 0.5, which rounds up; ggml's ``roundf`` is
    ``floor(|t|) + [|t| >= floor(|t|) + 0.5]`` with the sign of ``t``).

    Args:
        blocks: float32 ``(n_blocks, 32)``, finite.
        spec: the ``"q4_1"`` or ``"q8_0"`` format.

    Returns:
        ``(codes, scales, minimums)``: ``"q4_1"``: uint8 ``(n_blocks * 16,)``
        (element ``j`` of a block in the low nibble of its byte ``j``, element
        ``j + 16`` in the high nibble), float16 ``d`` and float16 ``min`` per
        block; ``"q8_0"``: int8 ``(n_blocks * 32,)``, float16 ``d``, ``None``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxlora.quant._formats import FORMAT_SPECS, encode_ggml
        >>> x = jnp.arange(32.0).reshape(1, 32)
        >>> codes, d, m = encode_ggml(x, FORMAT_SPECS["q4_1"])
        >>> [hex(c) for c in codes[:3].tolist()]  # q = round(x·15/31): 0, 0, 1 | 8, 8, 9
        ['0x80', '0x80', '0x91']
        >>> d, m
        (Array([2.066], dtype=float16), Array([0.], dtype=float16))

    References:
        ggml's reference quantizers, ``ggml-quants.c``: https://github.com/ggml-org/ggml
    """
    if spec.minimums:
        low, high = jnp.min(blocks, axis=1), jnp.max(blocks, axis=1)
        span = high - low
        d = span / (np.float32(15) + 0 * span)
        t = (blocks - low[:, None]) * jnp.where(d > 0, reciprocal(d), 0.0)[:, None]
        n = jnp.floor(t)
        q = n + (t >= n + 0.5) + (t == _BELOW_HALF)
        q = jnp.clip(q, 0, 15).astype(jnp.uint8)
        codes = q[:, :16] | (q[:, 16:] << 4)
        return codes.reshape(-1), d.astype(jnp.float16), low.astype(jnp.float16)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    d = absmax / (np.float32(127) + 0 * absmax)
    t = blocks * jnp.where(d > 0, reciprocal(d), 0.0)[:, None]
    a = jnp.abs(t)
    n = jnp.floor(a)
    q = jnp.sign(t) * (n + (a >= n + 0.5))
    return q.astype(jnp.int8).reshape(-1), d.astype(jnp.float16), None


def decode_ggml(
    codes: jax.Array, scales: jax.Array, minimums: jax.Array | None, spec: Format
) -> jax.Array:
    """ggml's dequantization, ``q · d (+ m)`` in float32, as ``(n_blocks, 32)``.

    Bit for bit ggml's (and ``gguf.quants.dequantize``'s) separate multiply and
    add even where XLA fuses them into one multiply-add: a float16 ``d`` has 11
    significant bits and ``q`` at most 8, so ``q · d`` is exact in float32 and
    the fused and the separate forms round the same single sum.

    Args:
        codes: as :func:`encode_ggml` returns them.
        scales: float16 ``d``, one per block.
        minimums: float16 ``m`` per block for ``"q4_1"``, else ``None``.
        spec: the format.

    Returns:
        float32 ``(n_blocks, 32)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxlora.quant._formats import FORMAT_SPECS, decode_ggml
        >>> codes = jnp.full((16,), 0x21, jnp.uint8)  # 1 in the low nibble, 2 in the high
        >>> d, m = jnp.array([0.5], jnp.float16), jnp.array([-1.0], jnp.float16)
        >>> decode_ggml(codes, d, m, FORMAT_SPECS["q4_1"])[0, [0, 15, 16, 31]]
        Array([-0.5, -0.5,  0. ,  0. ], dtype=float32)
    """
    n_blocks = scales.shape[0]
    if spec.bits == 4:
        packed = codes.reshape(n_blocks, GGML_BLOCK_SIZE // 2)
        q = jnp.concatenate([packed & 0xF, packed >> 4], axis=1)
    else:
        q = codes.reshape(n_blocks, GGML_BLOCK_SIZE)
    values = q.astype(jnp.float32) * scales.astype(jnp.float32)[:, None]
    if minimums is not None:
        values = values + minimums.astype(jnp.float32)[:, None]
    return values
