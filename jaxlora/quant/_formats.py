"""Code tables of the quantization formats: NF4, FP4 (E2M1), INT4 and INT8.

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
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from statistics import NormalDist

import numpy as np


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
    """

    name: str
    bits: int
    values: np.ndarray
    thresholds: np.ndarray
    interval_codes: np.ndarray
    grid: int | None = None


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


FORMAT_SPECS: Mapping[str, Format] = types.MappingProxyType(
    {
        "nf4": _make_format("nf4", NF4, 4),
        "fp4": _make_format("fp4", FP4, 4),
        "int4": _make_format("int4", INT4, 4),
        "int8": _make_format("int8", INT8, 8, grid=127),
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
