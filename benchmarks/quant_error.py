"""Quantization error and storage of the jaxlora.quant formats on N(0, 1) weights.

Prints, for each format with and without double quantization, the mean squared
error of dequantize(quantize(W)) against W, the worst absolute error, the stored
bytes per parameter, and the time to quantize and to dequantize (jitted, after a
warm-up call). QLoRA (Dettmers et al. 2023, arXiv 2305.14314) ranks NF4 best
among the 4-bit data types on normally distributed weights; the table shows it.

``--quick``: a 256 x 256 matrix.

Run: ``python -m benchmarks.quant_error [--rows 4096] [--cols 4096] [--block-size 64] [--quick]``
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as ``python benchmarks/quant_error.py``: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks._common import parse_args
from jaxlora import quant
from jaxlora.apps.progress import progress

FORMATS = ("nf4", "fp4", "int4", "int8")


def _timed(fn, *args):
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args(parser, rows=256, cols=256)

    w = jax.random.normal(jax.random.key(args.seed), (args.rows, args.cols), jnp.float32)
    print(
        f"W ~ N(0, 1), shape {w.shape}, block size {args.block_size}, "
        f"backend {jax.default_backend()}"
    )
    header = (
        f"{'format':<7} {'dq':<5} {'MSE':>10} {'MSE/nf4':>8} {'max |err|':>10} "
        f"{'bytes/param':>12} {'bits/param':>11} {'quant ms':>9} {'dequant ms':>11}"
    )
    print(header)
    print("-" * len(header))
    reference = None
    with progress(2 * len(FORMATS), "formats") as bar:
        for fmt in FORMATS:
            for double_quant in (False, True):
                quantize = jax.jit(
                    lambda x, fmt=fmt, dq=double_quant: quant.quantize_array(
                        x, format=fmt, block_size=args.block_size, double_quant=dq
                    )
                )
                q, t_quant = _timed(quantize, w)
                restore = jax.jit(lambda q: q.dequantize())
                w_hat, t_dequant = _timed(restore, q)
                error = w_hat - w
                mse = float(jnp.mean(error**2))
                if reference is None:
                    reference = mse
                bar.write(
                    f"{fmt:<7} {'yes' if double_quant else 'no':<5} {mse:>10.3e} "
                    f"{mse / reference:>8.3g} {float(jnp.max(jnp.abs(error))):>10.4f} "
                    f"{q.nbytes / q.size:>12.4f} {quant.bits_per_parameter(q):>11.3f} "
                    f"{1e3 * t_quant:>9.1f} {1e3 * t_dequant:>11.1f}",
                    file=sys.stdout,
                )
                bar.update()
    print(f"(float32: 4 bytes/param; bfloat16: 2 bytes/param; {w.size:,} parameters)")


if __name__ == "__main__":
    main()
