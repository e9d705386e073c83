"""Tests for ``jaxlora.quant``: code tables, blockwise quantization, double quantization, trees.

The reference below is written independently of the module: nearest code by
brute-force distance (ties to the smaller value, then the lower code), packing
by explicit nibble arithmetic, scales by numpy.
"""

from __future__ import annotations

import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxlora import quant
from jaxlora.quant import QuantizedArray
from tests.helpers import normal

# bitsandbytes' published NF4 table (``get_4bit_type("nf4")``, QLoRA Appendix E),
# code 0 first.
PUBLISHED_NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# OCP E2M1 magnitudes by the 3 low bits; bit 3 is the sign. Normalized by 6.
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)
REF_FP4 = (np.concatenate([E2M1, -E2M1]) / 6).astype(np.float32)
REF_INT4 = (np.array([*range(8), *range(-8, 0)]) / 7).astype(np.float32)
REF_INT8 = (np.array([*range(128), *range(-128, 0)]) / 127).astype(np.float32)
REF_TABLES = {"nf4": PUBLISHED_NF4, "fp4": REF_FP4, "int4": REF_INT4, "int8": REF_INT8}
FORMATS = ["nf4", "fp4", "int4", "int8"]


# --- the independent numpy reference -------------------------------------------------------


def ref_encode(y: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Code of the nearest table value to each ``y``; ties to the smaller value, then lower code."""
    order = sorted(range(table.size), key=lambda c: (float(table[c]), c))
    ordered = table[order].astype(np.float64)
    flat = y.astype(np.float64).reshape(-1)
    out = np.empty(flat.size, np.int64)
    for start in range(0, flat.size, 4096):
        chunk = flat[start : start + 4096]
        out[start : start + 4096] = np.argmin(np.abs(chunk[:, None] - ordered[None, :]), axis=1)
    return np.array(order)[out].reshape(y.shape)


def ref_pack(codes: np.ndarray, fmt: str) -> np.ndarray:
    flat = codes.reshape(-1)
    if fmt == "int8":
        return flat.astype(np.uint8).view(np.int8)
    return (flat[0::2] * 16 + flat[1::2]).astype(np.uint8)


def ref_quantize(x, fmt, block_size, mean=None, group=256):
    """Packed codes, block scales (and double-quant parts), and the dequantized weight.

    With double quantization, ``mean`` is the module's stored float32 mean (the
    order of a float32 sum is the platform's business); everything after it is
    recomputed here.
    """
    table = (nf4_table() if fmt == "nf4" else REF_TABLES[fmt]).astype(np.float32)
    blocks = np.asarray(x, np.float32).reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1)
    y = blocks * (np.float32(1) / np.where(absmax > 0, absmax, np.float32(1)))[:, None]
    codes = ref_encode(y, table)
    out = {"codes": ref_pack(codes, fmt), "absmax": absmax}
    scales = absmax
    if mean is not None:
        centered = absmax - np.float32(mean)
        n_groups = -(-centered.size // group)
        padded = np.zeros(n_groups * group, np.float32)
        padded[: centered.size] = centered
        padded = padded.reshape(n_groups, group)
        s2 = np.abs(padded).max(axis=1)
        y2 = padded * (np.float32(1) / np.where(s2 > 0, s2, np.float32(1)))[:, None]
        codes2 = ref_encode(y2, REF_INT8).reshape(-1)[: absmax.size]
        scales = REF_INT8[codes2] * np.repeat(s2, group)[: absmax.size] + np.float32(mean)
        out.update(codes2=codes2.astype(np.uint8).view(np.int8), s2=s2)
    out["scales"] = scales.astype(np.float32)
    out["dequantized"] = (table[codes] * out["scales"][:, None]).reshape(np.shape(x))
    return out


def nf4_table():
    # The module's float32 NF4 (checked against the published table below, to 2e-7):
    # code-for-code comparison needs the same float32 values near rounding ties.
    return np.asarray(quant.NF4)


# Most tests share this shape so that the jitted quantizer compiles once per option set.
SHAPE = (96, 128)  # 192 blocks of 64: one short second-level group of 256


def max_half_gap(fmt):
    values = np.unique(np.asarray(quant.FORMATS[fmt], np.float64))
    values = values[(values >= -1) & (values <= 1)]
    return float(np.diff(values).max() / 2)


# --- tables ---------------------------------------------------------------------------------


def test_nf4_matches_published_table():
    table = np.asarray(quant.NF4)
    assert table.dtype == np.float32 and table.shape == (16,)
    np.testing.assert_allclose(table, PUBLISHED_NF4, rtol=0, atol=1e-6)
    assert np.abs(table - PUBLISHED_NF4).max() <= 2e-7
    assert table[0] == -1.0 and table[7] == 0.0 and table[15] == 1.0
    assert np.all(np.diff(table) > 0)
    assert (table > 0).sum() == 8 and (table < 0).sum() == 7


def test_other_tables_match_their_definitions():
    np.testing.assert_array_equal(quant.FP4, REF_FP4)
    np.testing.assert_array_equal(quant.INT4, REF_INT4)
    np.testing.assert_array_equal(quant.INT8, REF_INT8)
    assert np.signbit(quant.FP4[8]) and quant.FP4[8] == 0  # E2M1's -0
    assert sorted(quant.FORMATS) == sorted(FORMATS)
    with pytest.raises(ValueError):
        quant.NF4[0] = 0.5  # read-only


# --- quantize_array against the reference ---------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_array_matches_reference(fmt, double_quant):
    x = normal(SHAPE, seed=1)
    q = quant.quantize_array(x, format=fmt, block_size=64, double_quant=double_quant)
    mean = None if not double_quant else float(q.scale_mean)
    ref = ref_quantize(x, fmt, 64, mean=mean)
    assert q.codes.dtype == (jnp.int8 if fmt == "int8" else jnp.uint8)
    np.testing.assert_array_equal(np.asarray(q.codes), ref["codes"])
    if double_quant:
        np.testing.assert_allclose(mean, np.mean(ref["absmax"], dtype=np.float64), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(q.scales), ref["codes2"])
        np.testing.assert_array_equal(np.asarray(q.scale_scales), ref["s2"])
    else:
        np.testing.assert_array_equal(np.asarray(q.scales), ref["absmax"])
        assert q.scale_scales is None and q.scale_mean is None
    np.testing.assert_allclose(np.asarray(q.block_scales()), ref["scales"], rtol=1e-6)
    out = jax.jit(lambda q: q.dequantize())(q)
    chex.assert_shape(out, x.shape)
    np.testing.assert_allclose(np.asarray(out), ref["dequantized"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_worst_case_error_per_block(fmt, double_quant):
    x = normal(SHAPE, seed=2)
    q = quant.quantize_array(x, format=fmt, block_size=64, double_quant=double_quant)
    blocks = np.asarray(x, np.float64).reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    scale_error = np.abs(np.asarray(q.block_scales(), np.float64)[:, None] - absmax)
    error = np.abs(np.asarray(q.dequantize(), np.float64).reshape(-1, 64) - blocks)
    bound = max_half_gap(fmt) * absmax + scale_error + 1e-6 * absmax
    assert np.all(error <= bound)
    # The bound is nearly attained: rounding is to the nearest code, not cruder.
    assert (error / absmax).max() > 0.8 * max_half_gap(fmt)


def test_double_quant_scales_within_8bit_bound():
    x = normal((512, 256), seed=3)  # 2048 blocks: 8 second-level groups
    q = quant.quantize_array(x, format="nf4", block_size=64)
    absmax = np.abs(np.asarray(x).reshape(-1, 64)).max(axis=1).astype(np.float64)
    error = np.abs(np.asarray(q.block_scales(), np.float64) - absmax)
    s2 = np.repeat(np.asarray(q.scale_scales, np.float64), 256)
    assert q.scales.dtype == jnp.int8 and q.scales.shape == (2048,)
    assert q.scale_scales.shape == (8,) and q.scale_mean.shape == ()
    assert np.all(error <= s2 / 254 * (1 + 1e-5) + 1e-6)
    assert error.max() / absmax.mean() < 5e-3  # ~0.35% of a typical scale


def test_bytes_per_parameter_with_double_quant():
    shape = (4096, 4096)
    q = jax.eval_shape(quant.quantize_array, jax.ShapeDtypeStruct(shape, jnp.bfloat16))
    size = math.prod(shape)
    assert q.nbytes == size // 2 + size // 64 + 4 * (size // 64 // 256) + 4
    bytes_per_param = q.nbytes / size
    assert bytes_per_param <= 0.52
    assert bytes_per_param == pytest.approx(0.5159, abs=1e-4)
    assert quant.bits_per_parameter(q) == pytest.approx(4.127, abs=1e-3)
    plain = jax.eval_shape(
        lambda w: quant.quantize_array(w, double_quant=False), jax.ShapeDtypeStruct(shape, "f4")
    )
    assert quant.bits_per_parameter(plain) == 4.5
    int8 = jax.eval_shape(
        lambda w: quant.quantize_array(w, format="int8"), jax.ShapeDtypeStruct(shape, "f4")
    )
    assert quant.bits_per_parameter(int8) == pytest.approx(8.127, abs=1e-3)


# --- packing and rounding, by hand ----------------------------------------------------------


def test_packing_first_element_in_high_nibble():
    # NF4 codes 15, 0, 7, 12 (0.5 -> 0.4407 at code 12; 0.5626 is farther).
    x = jnp.array([1.0, -1.0, 0.0, 0.5])
    q = quant.quantize_array(x, format="nf4", block_size=4, double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.codes), np.array([0xF0, 0x7C], np.uint8))
    hand = QuantizedArray(
        codes=jnp.array([0x0F, 0x87], jnp.uint8),
        scales=jnp.array([2.0], jnp.float32),
        scale_scales=None,
        scale_mean=None,
        shape=(2, 2),
        dtype=np.dtype("float32"),
        format="nf4",
        block_size=4,
    )
    expected = 2.0 * PUBLISHED_NF4[[0, 15, 8, 7]].reshape(2, 2)
    np.testing.assert_allclose(np.asarray(hand.dequantize()), expected, rtol=1e-6)


def packed_codes(x, fmt):
    return np.asarray(quant.quantize_array(x, format=fmt, block_size=4, double_quant=False).codes)


def test_ties_round_to_the_smaller_value():
    half = np.float32(1 / 7) / 2  # exactly halfway between INT4's 0 and 1/7
    x = jnp.array([1.0, half, -half, np.nextafter(half, np.float32(1))])
    codes = packed_codes(x, "int4")
    np.testing.assert_array_equal(codes, [0x70, 0xF1])  # 7, 0 | -1 (0xF), 1
    nf4_half = quant.NF4[8] / 2  # halfway between NF4's 0 and its smallest positive value
    x = jnp.array([1.0, nf4_half, quant.NF4[6] / 2, 0.0])
    codes = packed_codes(x, "nf4")
    np.testing.assert_array_equal(codes, [0xF7, 0x67])
    # FP4 writes +0 (code 0), never -0 (code 8), for zero and for tiny negatives.
    x = jnp.array([1.0, 0.0, -1e-9, -0.0])
    codes = packed_codes(x, "fp4")
    np.testing.assert_array_equal(codes, [0x70, 0x00])


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    x=hnp.arrays(
        np.float32,
        (2, 8),
        elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
        | st.sampled_from([float(np.float32(v)) for v in (0.0, 0.5, -0.5, 1 / 14, 0.04)]),
    ),
)
def test_codes_match_reference_property(fmt, x):
    q = quant.quantize_array(x, format=fmt, block_size=8, double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.codes), ref_quantize(x, fmt, 8)["codes"])


def test_all_zero_block():
    x = np.array(normal(SHAPE))
    x[0, :64] = 0.0
    for fmt in FORMATS:
        out = quant.quantize_array(jnp.asarray(x), format=fmt, block_size=64).dequantize()
        np.testing.assert_array_equal(np.asarray(out[0, :64]), 0.0)
        chex.assert_tree_all_finite(out)


# --- shapes and dtypes ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 64, 96), (2, 3, 32, 64)])
def test_stacked_kernels_round_trip(shape):
    x = normal(shape, seed=4)
    q = quant.quantize_array(x, block_size=64)
    flat = quant.quantize_array(x.reshape(-1), block_size=64)
    assert q.shape == shape and q.ndim == len(shape) and q.size == x.size
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(flat.codes))
    out = q.dequantize()
    chex.assert_shape(out, shape)
    np.testing.assert_array_equal(np.asarray(out).reshape(-1), np.asarray(flat.dequantize()))
    ref = ref_quantize(x, "nf4", 64, mean=float(q.scale_mean))
    np.testing.assert_allclose(np.asarray(out), ref["dequantized"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(jnp.float32, 0.0), (jnp.bfloat16, 1e-2), (jnp.float16, 1e-3)]
)
def test_dtypes(dtype, rtol):
    x = normal(SHAPE, seed=5, dtype=dtype)
    q = quant.quantize_array(x, block_size=64)
    assert q.dtype == dtype
    out = q.dequantize()
    assert out.dtype == dtype
    f32 = q.dequantize(jnp.float32)
    assert f32.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(f32), rtol=rtol, atol=rtol * 1e-2
    )


def test_jit_matches_eager_and_does_not_recompile():
    x = normal(SHAPE, seed=6)
    jitted = jax.jit(quant.quantize_array, static_argnames=("format", "block_size", "double_quant"))
    a = jitted(x, format="fp4", block_size=64)
    b = quant.quantize_array(x, format="fp4", block_size=64)
    chex.assert_trees_all_equal(a, b)
    jitted(normal(SHAPE, seed=7), format="fp4", block_size=64)
    assert jitted._cache_size() == 1


# --- trees ----------------------------------------------------------------------------------


def test_quantized_array_is_a_pytree():
    q = quant.quantize_array(normal(SHAPE, seed=7))
    assert len(jax.tree.leaves(q)) == 4
    assert len(jax.tree.leaves(quant.quantize_array(normal(SHAPE), double_quant=False))) == 2
    same = jax.tree.map(lambda a: a, q)
    assert isinstance(same, QuantizedArray) and same.shape == q.shape and same.format == "nf4"
    shapes = jax.tree.map(lambda a: a.shape, {"w": q}, is_leaf=quant.is_quantized)
    assert shapes == {"w": SHAPE}

    tree = {"w": q, "b": jnp.ones(3)}
    f = jax.jit(quant.dequantize)
    out = f(tree)
    chex.assert_trees_all_close(out, quant.dequantize(tree))
    q2 = quant.quantize_array(normal(SHAPE, seed=8))
    f({"w": q2, "b": jnp.zeros(3)})
    assert f._cache_size() == 1  # same structure and shapes: no recompilation
    # A jitted function returns QuantizedArrays, too.
    made = jax.jit(lambda t: quant.quantize(t, format="int4"))({"w": normal((32, 64))})
    assert quant.is_quantized(made["w"]) and made["w"].format == "int4"


def test_quantize_default_targets_and_round_trip():
    params = {
        "layers": {"kernel": normal((2, 64, 32), seed=9), "bias": normal((32,))},
        "embed": {"embedding": normal((100, 64), seed=10)},
        "step": jnp.array(3),
        "meta": "not an array",
    }
    q = quant.quantize(params, format="nf4", block_size=64)
    assert quant.is_quantized(q["layers"]["kernel"]) and quant.is_quantized(q["embed"]["embedding"])
    assert q["layers"]["bias"] is params["layers"]["bias"] and q["step"] is params["step"]
    assert q["meta"] == "not an array"
    out = quant.dequantize(q)
    assert jax.tree.structure(out) == jax.tree.structure(params)
    for path in [("layers", "kernel"), ("embed", "embedding")]:
        x = params[path[0]][path[1]]
        ref = ref_quantize(x, "nf4", 64, mean=float(q[path[0]][path[1]].scale_mean))
        np.testing.assert_allclose(
            np.asarray(out[path[0]][path[1]]), ref["dequantized"], rtol=1e-6, atol=1e-7
        )
    # Two axes are the only test: a bias stacked by nn.scan is quantized too.
    stacked = quant.quantize({"bias": normal((2, 32))}, block_size=64)
    assert quant.is_quantized(stacked["bias"])
    # Already-quantized leaves are kept, so quantize is idempotent.
    again = quant.quantize(q, block_size=64, targets="kernel")
    assert again["layers"]["kernel"] is q["layers"]["kernel"]
    assert quant.bits_per_parameter(q) == pytest.approx(
        8 * (q["layers"]["kernel"].nbytes + q["embed"]["embedding"].nbytes) / (4096 + 6400)
    )


def test_quantize_targets():
    params = {
        "attn": {"query": {"kernel": normal((64, 64))}, "out": {"kernel": normal((64, 64))}},
        "mlp": {"up": {"kernel": normal((64, 128))}},
        "norm": {"scale": normal((64,))},
    }
    q = quant.quantize(params, targets="query")
    assert quant.is_quantized(q["attn"]["query"]["kernel"])
    assert not quant.is_quantized(q["attn"]["out"]["kernel"])
    q = quant.quantize(params, targets=["up", "norm"])  # regex targets may take 1-D leaves
    assert quant.is_quantized(q["mlp"]["up"]["kernel"]) and quant.is_quantized(q["norm"]["scale"])
    q = quant.quantize(params, targets="attention")
    assert quant.is_quantized(q["attn"]["out"]["kernel"])
    assert not quant.is_quantized(q["mlp"]["up"]["kernel"])
    q = quant.quantize(params, targets=lambda path, leaf: leaf.shape[-1] == 128)
    assert [p for p, x in _quantized_paths(q)] == ["mlp/up/kernel"]


def _quantized_paths(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=quant.is_quantized)[0]
    return [
        (jax.tree_util.keystr(p, simple=True, separator="/"), x)
        for p, x in flat
        if quant.is_quantized(x)
    ]


def test_flax_nnx_state():
    model = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    q = quant.quantize(state, block_size=64)
    assert isinstance(q["kernel"], nnx.Param) and quant.is_quantized(q["kernel"].get_value())
    assert not quant.is_quantized(q["bias"].get_value())
    restored = quant.dequantize(q)
    assert isinstance(restored["kernel"], nnx.Param)
    x = normal((3, 64), seed=11)
    y = nnx.merge(graphdef, restored)(x)
    kernel = q["kernel"].get_value().dequantize()
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ kernel), rtol=1e-5, atol=1e-5)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, quant.dequantize(state))(x)

    np.testing.assert_allclose(np.asarray(forward(q, x)), np.asarray(y), rtol=1e-6, atol=1e-6)


def test_flax_linen_params_and_partitioned_boxes():
    dense = nn.Dense(32)
    x = normal((3, 64), seed=12)
    params = dense.init(jax.random.key(0), x)
    q = quant.quantize(params, format="fp4", block_size=32, double_quant=False)
    assert quant.is_quantized(q["params"]["kernel"])
    y = dense.apply(quant.dequantize(q), x)
    kernel = q["params"]["kernel"].dequantize()
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ kernel), rtol=1e-5, atol=1e-5)

    boxed = nn.Dense(
        32, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("a", "b"))
    )
    params = boxed.init(jax.random.key(0), x)
    q = quant.quantize(params, block_size=64)
    box = q["params"]["kernel"]
    assert isinstance(box, nn.Partitioned) and box.names == ("a", "b")
    assert quant.is_quantized(box.value)
    restored = quant.dequantize(q)["params"]["kernel"]
    assert isinstance(restored, nn.Partitioned) and restored.names == ("a", "b")
    np.testing.assert_array_equal(np.asarray(restored.value), np.asarray(box.value.dequantize()))


# --- errors ---------------------------------------------------------------------------------


def test_unknown_format():
    with pytest.raises(ValueError, match=r"'nf4', 'fp4', 'int4', 'int8'"):
        quant.quantize_array(normal((64,)), format="nf3")
    with pytest.raises(ValueError, match="unknown quantization format 'NF4'"):
        quant.quantize({"w": normal((8, 8))}, format="NF4")


@pytest.mark.parametrize("block_size", [0, -64, 64.0, True, "64", None])
def test_block_size_not_a_positive_int(block_size):
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        quant.quantize({"w": normal((8, 8))}, block_size=block_size)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        quant.quantize_array(normal((8, 8)), block_size=block_size)


def test_bad_double_quant_block_size():
    with pytest.raises(ValueError, match="double_quant_block_size must be a positive int"):
        quant.quantize_array(normal((8, 8)), double_quant_block_size=0)


def test_odd_block_size_for_4bit():
    with pytest.raises(ValueError, match="block_size=3 is odd; format='nf4'"):
        quant.quantize_array(normal((3, 4)), block_size=3)
    q = quant.quantize_array(normal((3, 4)), format="int8", block_size=3)  # fine for int8
    assert q.scales.shape == (4,)


def test_block_size_must_divide_size():
    params = {"layer": {"kernel": normal((10, 10))}}
    with pytest.raises(ValueError, match=r"'layer/kernel'.*size 100.*such as 50 or 100 or 20"):
        quant.quantize(params, block_size=64)
    with pytest.raises(ValueError, match=r"the array with shape \(10, 10\) \(size 100\)"):
        quant.quantize_array(params["layer"]["kernel"], block_size=64)
    with pytest.raises(ValueError, match="no even block size divides 9"):
        quant.quantize_array(normal((3, 3)), block_size=4)


def test_targeted_non_float_leaf():
    params = {"w": normal((8, 8)), "counts": {"table": jnp.ones((8, 8), jnp.int32)}}
    with pytest.raises(TypeError, match=r"'counts/table'.*int32.*\(8, 8\)"):
        quant.quantize(params, targets="table")
    with pytest.raises(TypeError, match="matched 'name'"):
        quant.quantize({"name": "x", "w": normal((8, 8))}, targets="name|w")
    with pytest.raises(TypeError, match="not a floating-point dtype"):
        quant.quantize_array(jnp.ones((8, 8), jnp.int8))


def test_targets_matching_nothing():
    params = {"dense": {"kernel": normal((8, 8)), "bias": normal((8,))}}
    with pytest.raises(ValueError, match=r"matched no leaf.*'dense/bias', 'dense/kernel'"):
        quant.quantize(params, targets="query")
    with pytest.raises(ValueError, match="no floating-point leaf with at least two axes"):
        quant.quantize({"bias": normal((8,))})
    with pytest.raises(TypeError, match="targets must be"):
        quant.quantize(params, targets=3)


def test_bits_per_parameter_without_quantized_arrays():
    with pytest.raises(ValueError, match="holding some; got dict with none"):
        quant.bits_per_parameter({"w": normal((8, 8))})


def test_nonfinite_weights_are_refused_or_zeroed_never_hidden():
    w = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    w[3, 5], w[70, 1] = np.nan, np.inf
    with pytest.raises(
        ValueError, match=r"'l/kernel': 2 of its 8192 entries .* \(1 NaN, 1 infinite\)"
    ):
        quant.quantize({"l": {"kernel": w}})
    with pytest.raises(ValueError, match=r"nonfinite must be 'raise' or 'zero'"):
        quant.quantize_array(w, nonfinite="ignore")
    zeroed = np.asarray(quant.quantize_array(w, nonfinite="zero").dequantize())
    assert zeroed[3, 5] == 0.0 and zeroed[70, 1] == 0.0
    clean = np.where(np.isfinite(w), w, 0.0)
    np.testing.assert_array_equal(zeroed, np.asarray(quant.quantize_array(clean).dequantize()))
    # traced inputs cannot be checked: the blocks that hold them dequantize to NaN, visibly
    traced = jax.jit(lambda x: quant.quantize_array(x, double_quant=False))(w)
    out = np.asarray(traced.dequantize())
    bad_blocks = {(3 * 64 + 5) // 64, (70 * 64 + 1) // 64}
    nan_blocks = set(np.flatnonzero(np.isnan(out.reshape(-1, 64)).any(axis=1)).tolist())
    assert nan_blocks == bad_blocks
    assert np.isfinite(out.reshape(-1, 64)[[b for b in range(128) if b not in bad_blocks]]).all()


# --- ggml's block formats (Q4_1, Q8_0); bit-exactness against gguf is in test_gguf.py ---------


def test_q4_1_nibble_order_and_arithmetic_by_hand():
    # One block: byte j holds element j (low nibble) and element j + 16 (high nibble).
    codes = np.array([(j % 16) | ((15 - j) << 4) for j in range(16)], np.uint8)
    q = QuantizedArray(
        codes=jnp.asarray(codes),
        scales=jnp.array([0.5], jnp.float16),
        scale_scales=None,
        scale_mean=None,
        shape=(32,),
        dtype=np.dtype("float32"),
        format="q4_1",
        block_size=32,
        minimums=jnp.array([-2.0], jnp.float16),
    )
    want = np.array([*range(16), *range(15, -1, -1)], np.float32) * 0.5 - 2.0
    np.testing.assert_array_equal(np.asarray(q.dequantize()), want)
    # ggml's reference: d = (max - min) / 15, q = trunc((x - min) / d + 0.5), m = min.
    x = jnp.asarray(want)
    again = quant.quantize_array(x, format="q4_1")
    np.testing.assert_array_equal(np.asarray(again.codes), codes)
    assert float(again.scales[0]) == 0.5 and float(again.minimums[0]) == -2.0


def test_q8_0_rounds_halves_away_from_zero():
    # d = absmax / 127 = 1: codes are round(x), with halves away from zero (C's roundf).
    x = np.zeros(32, np.float32)
    x[:6] = [127.0, -2.5, 2.5, -0.5, 0.5, 1.49]
    q = quant.quantize_array(jnp.asarray(x), format="q8_0")
    assert q.codes.dtype == jnp.int8 and float(q.scales[0]) == 1.0
    np.testing.assert_array_equal(np.asarray(q.codes)[:6], [127, -3, 3, -1, 1, 1])
    np.testing.assert_array_equal(np.asarray(q.dequantize())[:6], [127, -3, 3, -1, 1, 1])


@pytest.mark.parametrize(("fmt", "bits"), [("q4_1", 5.0), ("q8_0", 8.5)])
def test_ggml_formats_defaults_sizes_and_trees(fmt, bits):
    x = normal(SHAPE, seed=11)
    q = quant.quantize_array(x, format=fmt)  # block_size 32, no double quantization
    assert q.block_size == 32 and not q.double_quant and q.scale_mean is None
    assert q.scales.dtype == jnp.float16 and q.scales.shape == (x.size // 32,)
    assert (q.minimums is not None) == (fmt == "q4_1")
    assert quant.bits_per_parameter(q) == bits  # minimums counted: 4 + 16/32 + 16/32
    # Half a step, plus the float16 rounding of d (times the code) and of the minimum.
    blocks = np.asarray(x).reshape(-1, 32)
    err = np.abs(np.asarray(q.dequantize()).reshape(-1, 32) - blocks).max(axis=1)
    low = blocks.min(axis=1) if fmt == "q4_1" else 0.0
    step = (blocks.max(axis=1) - low) / 15 if fmt == "q4_1" else np.abs(blocks).max(axis=1) / 127
    levels = 15 if fmt == "q4_1" else 127
    assert np.all(err <= step / 2 + (levels * step + np.abs(low)) * 2.0**-11 * 1.01)
    tree = quant.quantize({"w": x, "b": x[0]}, format=fmt)
    chex.assert_trees_all_equal(tree["w"], q)
    assert quant.dequantize(tree)["w"].shape == SHAPE


def test_stored_axes_are_transposed_back_on_dequantize():
    x = normal((64, 96), seed=12)
    for fmt in ("q4_1", "nf4"):
        stored = quant.quantize_array(x.T, format=fmt)  # blocks along the stored rows
        q = dataclasses.replace(stored, shape=(64, 96), axes=(1, 0))
        assert q.stored_shape == (96, 64) and q.shape == (64, 96)
        np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(stored.dequantize()).T)
        assert "axes=(1, 0)" in repr(q) and "axes" not in repr(stored)
    stacked = quant.quantize_array(jnp.stack([x.T, 2 * x.T]), format="q8_0")
    q = dataclasses.replace(stacked, shape=(2, 64, 96), axes=(0, 2, 1))
    assert q.stored_shape == (2, 96, 64)
    np.testing.assert_array_equal(
        np.asarray(q.dequantize()), np.asarray(stacked.dequantize()).transpose(0, 2, 1)
    )


def test_ggml_format_errors():
    x = normal((8, 64))
    with pytest.raises(ValueError, match="format='q4_1' has blocks of 32 only; got block_size=64"):
        quant.quantize_array(x, format="q4_1", block_size=64)
    with pytest.raises(ValueError, match=r"format='q8_0' .* double quantization does not apply"):
        quant.quantize({"w": x}, format="q8_0", double_quant=True)
    with pytest.raises(ValueError, match=r"size 48\) in blocks of block_size=32"):
        quant.quantize_array(normal((6, 8)), format="q4_1")
    with pytest.raises(ValueError, match=r"axes=\(0, 0\) is not a permutation of the 2 axes"):
        dataclasses.replace(quant.quantize_array(x, format="q8_0"), axes=(0, 0))


def test_ggml_nonfinite_blocks_dequantize_to_nan_under_jit():
    w = np.asarray(normal((4, 64), seed=13)).copy()
    w[2, 40] = np.inf
    out = np.asarray(jax.jit(lambda x: quant.quantize_array(x, format="q4_1"))(w).dequantize())
    nan_blocks = np.isnan(out.reshape(-1, 32)).any(axis=1)
    np.testing.assert_array_equal(np.flatnonzero(nan_blocks), [(2 * 64 + 40) // 32])
