"""``QuantizedArray`` and blockwise absmax quantization, with QLoRA's double quantization.

A weight is flattened (row-major) and cut into blocks of ``block_size``
consecutive elements; each block stores its absmax ``a`` and one code per
element, the table value nearest to ``y = x · (1/a)`` (float32, the reciprocal
rounded first, as bitsandbytes computes it; see :mod:`jaxlora.quant._formats`).
Because blocks run along the flattened weight, stacked (``nn.scan``) and
multi-axis kernels need nothing special.

Double quantization (QLoRA, Section 3) stores the per-block float32 absmax
values themselves in 8 bits: subtract their mean ``μ`` (kept in float32), cut
them into blocks of 256, and store each block as symmetric absmax int8
(``round(127 · (a − μ) / s2)``, nearest with ties down) plus its float32 absmax
``s2``. (The paper and bitsandbytes use an 8-bit float / dynamic code for this
second level; symmetric int8 is simpler and its error bound ``s2 / 254`` is
easy to state.) The scale overhead drops from 32/64 = 0.5 to
8/64 + 32/(64·256) ≈ 0.127 bits per parameter at block size 64.

ggml's ``"q4_1"`` and ``"q8_0"`` (GGUF files) have fixed blocks of 32, float16
scales and their own rounding (:mod:`jaxlora.quant._formats`); they have no
double quantization.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jaxlora import _paths
from jaxlora._checks import describe
from jaxlora._node import is_node
from jaxlora.quant import _formats
from jaxlora.quant._array import QuantizedArray, is_quantized, result_dtype

DOUBLE_QUANT_BLOCK_SIZE = 256
_MAX_LISTED_PATHS = 12


def quantize_array(
    x: ArrayLike,
    *,
    format: str = "nf4",
    block_size: int = _formats.DEFAULT,
    double_quant: bool = _formats.DEFAULT,
    double_quant_block_size: int = DOUBLE_QUANT_BLOCK_SIZE,
    nonfinite: str = "raise",
) -> QuantizedArray:
    """Quantizes one floating-point array blockwise (absmax per block).

    The array is flattened row-major and cut into blocks of ``block_size``;
    each element becomes the code of the table value nearest to
    ``x · (1/block_absmax)`` (ties go to the smaller value). Works eagerly and under
    ``jit`` (it is jitted inside, keyed on shape, dtype and the static options).

    Args:
        x: a floating-point array of any shape whose size ``block_size`` divides.
        format: ``"nf4"`` (NormalFloat4), ``"fp4"`` (OCP E2M1), ``"int4"`` or
            ``"int8"`` (symmetric absmax), or ggml's ``"q4_1"`` or ``"q8_0"``.
        block_size: elements per block; a positive int dividing ``x.size``, and
            even for the 4-bit formats. By default 64; ``"q4_1"`` and ``"q8_0"``
            have blocks of 32 only.
        double_quant: quantize the block absmax values too (QLoRA's double
            quantization: mean-centered, int8, groups of
            ``double_quant_block_size``). By default on, except for ``"q4_1"``
            and ``"q8_0"``, which do not have it.
        double_quant_block_size: block scales per second-level group (256 in the
            paper); the last group may be shorter.
        nonfinite: what to do with NaN and infinite entries, which no block scale
            can represent (a NaN would come back finite, an infinity would turn its
            block, or with double quantization the whole array, into NaN):
            ``"raise"`` (the default) refuses them with their count; ``"zero"``
            quantizes them as zeros. The check reads the values; under ``jit``
            (traced inputs), ``"raise"`` instead marks every block that holds one
            with a NaN scale, so the damage shows (as NaN) in the dequantized
            weight rather than hiding in finite codes (with double quantization,
            in every block of that block's group of scales).

    Returns:
        a :class:`QuantizedArray`.

    Raises:
        ValueError: for an unknown format or a block size that is not a positive
            int, does not divide ``x.size`` or is odd for a 4-bit format (or is not
            32 for ``"q4_1"``/``"q8_0"``, or double quantization for those); for
            non-finite entries of a concrete array with ``nonfinite="raise"``.
        TypeError: if ``x`` is not floating point.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxlora.quant import quantize_array
        >>> w = jax.random.normal(jax.random.key(0), (256, 128))
        >>> q = quantize_array(w, format="nf4", block_size=64, double_quant=True)
        >>> q.codes.dtype, q.codes.shape, q.scales.shape, q.scale_scales.shape
        (dtype('uint8'), (16384,), (512,), (2,))
        >>> round(8 * q.nbytes / q.size, 3)  # bits per parameter
        4.128
        >>> q8 = jax.jit(quantize_array, static_argnames=("format",))(w, format="int8")
        >>> q8.codes.dtype
        dtype('int8')
        >>> g = quantize_array(w, format="q4_1")  # ggml's: blocks of 32, q·d + m
        >>> g.scales.dtype, g.minimums.shape, 8 * g.nbytes / g.size
        (dtype('float16'), (1024,), 5.0)

    References:
        Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs,
        Section 3. https://arxiv.org/abs/2305.14314
    """
    return _quantize_leaf(
        x,
        "the array",
        format=format,
        block_size=block_size,
        double_quant=double_quant,
        double_quant_block_size=double_quant_block_size,
        nonfinite=nonfinite,
    )


def quantize(
    tree: Any,
    *,
    format: str = "nf4",
    block_size: int = _formats.DEFAULT,
    double_quant: bool = _formats.DEFAULT,
    targets: _paths.Targets | None = None,
    nonfinite: str = "raise",
) -> Any:
    """Replaces the targeted weights of a pytree with :class:`QuantizedArray` s.

    Flax boxes (``nnx.Variable`` in an ``nnx.State``, linen's ``nn.Partitioned``)
    keep their box and metadata; only the array inside is replaced. Leaves that
    are already quantized are kept as they are.

    Args:
        tree: any pytree of arrays: Flax linen ``params``, an ``nnx.State``, a
            dict, or the frozen ``base`` from :func:`jaxlora.split`.
        format: ``"nf4"``, ``"fp4"``, ``"int4"``, ``"int8"``, ``"q4_1"`` or ``"q8_0"``.
        block_size: elements per block of each flattened weight; must divide
            the size of every targeted weight (and be even for 4-bit formats).
            By default 64 (32, the only size, for ``"q4_1"`` and ``"q8_0"``).
        double_quant: also quantize the block scales (QLoRA's double
            quantization), ~0.127 instead of 0.5 bits per parameter at block 64.
            By default on (off, the only choice, for ``"q4_1"`` and ``"q8_0"``).
        targets: ``None`` quantizes every floating-point leaf with at least two
            axes (kernels and embeddings, not biases or norm scales; but a bias
            stacked by ``nn.scan`` has two axes and is included). Otherwise a
            regex searched in ``/``-joined paths, a list of them, a preset
            (``"attention"``, ``"mlp"``, ``"all-linear"``) or a predicate
            ``(path, leaf) -> bool``, as in :class:`jaxlora.LoraConfig`.
        nonfinite: ``"raise"`` (the default) or ``"zero"``: what to do with NaN and
            infinite weights (see :func:`quantize_array`).

    Returns:
        ``tree`` with each targeted leaf's array replaced by a
        :class:`QuantizedArray`.

    Raises:
        ValueError: for an unknown format, a bad block size (the message names
            the path, its size and block sizes that would work), targets that
            match no leaf (the message lists paths that could be targeted), or a
            weight with NaN or infinite entries (the message names its path and
            the count) unless ``nonfinite="zero"``.
        TypeError: if ``targets`` match a leaf that is not a floating-point
            array, or ``targets`` has the wrong type.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxlora.quant import quantize, dequantize
        >>> params = {"dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.ones(32)}}
        >>> q = quantize(params, format="nf4", block_size=64)
        >>> q["dense"]["kernel"]
        QuantizedArray(shape=(64, 32), dtype=float32, format='nf4', block_size=64,
                       double_quant=True, nbytes=1064)
        >>> q["dense"]["bias"].shape  # 1-D leaves are left alone by default
        (32,)
        >>> jax.tree.map(jnp.shape, dequantize(q))
        {'dense': {'bias': (32,), 'kernel': (64, 32)}}

    References:
        Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs.
        https://arxiv.org/abs/2305.14314
    """
    block_size, double_quant = _formats.resolve_options(format, block_size, double_quant)
    _check_nonfinite_option(nonfinite)
    matches = None if targets is None else _paths.target_predicate(targets, None)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: _is_leaf(x) or is_node(x)
    )
    out, candidates, matched = [], [], 0
    for key_path, leaf in flat:
        if is_node(leaf):
            raise TypeError(
                f"quantize: tree holds an adapter node ({type(leaf).__name__}) at "
                f"{_paths.path_str(key_path)!r}: it is (or contains) a delta, whose factors stay "
                "in float. Quantize the base alone: base, delta = jaxlora.split(params, config, "
                "key=key); base = jaxlora.quantize(base)"
            )
    for key_path, leaf in flat:
        path = _paths.path_str(key_path)
        value = _paths.unbox(leaf)
        if is_quantized(value):
            matched += matches is not None and bool(matches(path, value))
            out.append(leaf)
            continue
        default = _paths.is_float_array(value) and value.ndim >= 2
        if _paths.is_float_array(value):
            candidates.append(path)
        if not (default if matches is None else matches(path, value)):
            out.append(leaf)
            continue
        if not _paths.is_float_array(value):
            raise TypeError(
                f"targets={targets!r} matched {path!r}, which is {describe(value)}; only "
                "floating-point arrays can be quantized. Narrow `targets` so that it "
                "leaves this path out."
            )
        matched += 1
        q = _quantize_leaf(
            value,
            repr(path),
            format=format,
            block_size=block_size,
            double_quant=double_quant,
            double_quant_block_size=DOUBLE_QUANT_BLOCK_SIZE,
            nonfinite=nonfinite,
        )
        out.append(_paths.rebox(leaf, q))
    if not matched:
        shown = ", ".join(repr(p) for p in candidates[:_MAX_LISTED_PATHS])
        more = len(candidates) - _MAX_LISTED_PATHS
        more_text = f" and {more} more" if more > 0 else ""
        what = (
            "no floating-point leaf with at least two axes"
            if targets is None
            else f"targets={targets!r} matched no leaf"
        )
        raise ValueError(
            f"quantize found nothing to quantize: {what}. Floating-point paths look like: "
            f"{shown or '(none)'}{more_text}. Pass targets= a regex that matches some of them."
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def dequantize(tree: Any, dtype: DTypeLike | None = None) -> Any:
    """Replaces every :class:`QuantizedArray` in a pytree with its dequantized array.

    Flax boxes keep their box; other leaves pass through unchanged. Works under
    ``jit``.

    Args:
        tree: a pytree, e.g. the output of :func:`quantize`; a bare
            :class:`QuantizedArray` is dequantized too.
        dtype: the dtype of the dequantized arrays; ``None`` means each one's
            original dtype.

    Returns:
        ``tree`` with plain arrays where it held quantized ones.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxlora.quant import quantize, dequantize
        >>> q = quantize({"w": jnp.full((4, 32), 0.5, jnp.bfloat16)}, block_size=32)
        >>> w = dequantize(q)["w"]
        >>> w.dtype, float(w[0, 0])
        (dtype(bfloat16), 0.5)
        >>> dequantize(q, jnp.float32)["w"].dtype
        dtype('float32')

    References:
        Dettmers et al. 2023, QLoRA. https://arxiv.org/abs/2305.14314
    """

    if dtype is not None:
        result_dtype(dtype)  # a clear error before touching the tree

    def restore(leaf: Any) -> Any:
        value = _paths.unbox(leaf)
        if is_quantized(value):
            return _paths.rebox(leaf, value.dequantize(dtype))
        return leaf

    return jax.tree.map(restore, tree, is_leaf=_is_leaf)


def _is_leaf(x: Any) -> bool:
    return _paths.is_box(x) or is_quantized(x)


def _check_nonfinite_option(nonfinite: Any) -> None:
    if nonfinite not in ("raise", "zero"):
        raise ValueError(f"nonfinite must be 'raise' or 'zero'; got {nonfinite!r}")


def _check_finite(x: Any, where: str) -> None:
    if isinstance(x, jax.core.Tracer):
        return  # no values to check: the quantizer makes non-finite blocks NaN instead
    bad = int(jnp.size(x) - jnp.count_nonzero(jnp.isfinite(x)))
    if bad:
        n_nan = int(jnp.count_nonzero(jnp.isnan(x)))
        raise ValueError(
            f"cannot quantize {where}: {bad} of its {jnp.size(x)} entries are not finite "
            f"({n_nan} NaN, {bad - n_nan} infinite); no block scale represents them (a NaN "
            "would come back finite, an infinity would make its block NaN). Fix the weight, "
            "or pass nonfinite='zero' to quantize them as zeros."
        )


def _divisors_near(size: int, target: int, even: bool) -> list[int]:
    limit = min(size, 4096)
    found = [d for d in range(1, limit + 1) if size % d == 0 and (d % 2 == 0 or not even)]
    return sorted(found, key=lambda d: (abs(d - target), -d))[:3]


def _quantize_leaf(
    x: ArrayLike,
    where: str,
    *,
    format: str,
    block_size: int,
    double_quant: bool,
    double_quant_block_size: int,
    nonfinite: str,
) -> QuantizedArray:
    spec = _formats.get_format(format)
    _check_nonfinite_option(nonfinite)
    block_size, double_quant = _formats.resolve_options(format, block_size, double_quant)
    if double_quant:
        _formats.check_block_size(double_quant_block_size, format, "double_quant_block_size")
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"cannot quantize {where}: it has dtype {x.dtype}, not a floating-point dtype"
        )
    size = math.prod(x.shape)
    if size % block_size:
        fits = _divisors_near(size, block_size, even=spec.bits == 4)
        hint = (
            f"pass a block_size that divides {size}, such as {' or '.join(map(str, fits))}, "
            "or leave this weight out of targets"
            if fits
            else f"no even block size divides {size}: use format='int8' or leave this "
            "weight out of targets"
        )
        raise ValueError(
            f"cannot quantize {where} with shape {tuple(x.shape)} (size {size}) in blocks of "
            f"block_size={block_size}: {size} % {block_size} = {size % block_size}. Blocks run "
            f"along the flattened weight, so {hint}."
        )
    if nonfinite == "raise":
        _check_finite(x, where)
    else:
        x = jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))
    return _quantize_jit(
        x,
        format=format,
        block_size=int(block_size),
        scale_block_size=int(double_quant_block_size) if double_quant else None,
    )


@functools.partial(jax.jit, static_argnames=("format", "block_size", "scale_block_size"))
def _quantize_jit(
    x: jax.Array, *, format: str, block_size: int, scale_block_size: int | None
) -> QuantizedArray:
    spec = _formats.get_format(format)
    blocks = jnp.asarray(x, jnp.float32).reshape(-1, block_size)
    finite = jnp.all(jnp.isfinite(blocks), axis=1)  # all True unless traced (see nonfinite)
    blocks = jnp.where(finite[:, None], blocks, 0.0)
    if spec.ggml:
        codes, scales, minimums = _formats.encode_ggml(blocks, spec)
        return QuantizedArray(
            codes=codes,
            scales=jnp.where(finite, scales, jnp.nan),
            scale_scales=None,
            scale_mean=None,
            shape=tuple(x.shape),
            dtype=np.dtype(x.dtype),
            format=format,
            block_size=block_size,
            minimums=minimums,
        )
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    # Multiply by the rounded reciprocal (bitsandbytes' arithmetic, and what XLA
    # would turn a division by a broadcast scale into anyway).
    codes = _formats.encode(blocks * _formats.reciprocal(absmax)[:, None], spec).reshape(-1)
    if spec.bits == 4:
        pairs = codes.reshape(-1, 2)
        codes = (pairs[:, 0] << 4) | pairs[:, 1]
    scales, scale_scales, scale_mean = jnp.where(finite, absmax, jnp.nan), None, None
    if scale_block_size is not None:
        n_blocks = absmax.shape[0]
        # The mean is a reduction's output, not ``sum * (1/n)``: XLA would duplicate
        # that multiply into the subtraction's fusion and contract it into an FMA,
        # so the stored mean would not be exactly the one subtracted.
        scale_mean = jnp.sum(absmax * np.float32(1 / n_blocks))
        n_groups = -(-n_blocks // scale_block_size)
        centered = jnp.pad(absmax - scale_mean, (0, n_groups * scale_block_size - n_blocks))
        centered = centered.reshape(n_groups, scale_block_size)
        scale_scales = jnp.max(jnp.abs(centered), axis=1)
        level2 = _formats.get_format("int8")
        normalized = centered * _formats.reciprocal(scale_scales)[:, None]
        scales = _formats.encode(normalized, level2).reshape(-1)[:n_blocks]
        pad = n_groups * scale_block_size - n_blocks
        grouped = jnp.pad(finite, (0, pad), constant_values=True).reshape(n_groups, -1)
        scale_scales = jnp.where(jnp.all(grouped, axis=1), scale_scales, jnp.nan)
    return QuantizedArray(
        codes=codes,
        scales=scales,
        scale_scales=scale_scales,
        scale_mean=scale_mean,
        shape=tuple(x.shape),
        dtype=np.dtype(x.dtype),
        format=format,
        block_size=block_size,
        scale_block_size=scale_block_size,
    )
