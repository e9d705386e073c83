"""Quantized base weights for QLoRA: NF4, FP4, INT4, INT8 (double quantized), Q4_1, Q8_0.

Quantize the frozen base after :func:`jaxlora.split`, train the delta as usual,
and dequantize where a weight is used. ggml's Q4_1 and Q8_0 keep the codes of a
GGUF checkpoint as they are (:func:`jaxlora.models.gguf.load_gguf_llama`).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxlora import quant
    >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 64))}}
    >>> q = quant.quantize(params, format="nf4", block_size=64, double_quant=True)
    >>> round(quant.bits_per_parameter(q), 3)
    4.13
    >>> quant.dequantize(q)["dense"]["kernel"].shape
    (128, 64)

References:
    Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs.
    https://arxiv.org/abs/2305.14314
"""

from jaxlora.quant._array import QuantizedArray as QuantizedArray
from jaxlora.quant._array import bits_per_parameter as bits_per_parameter
from jaxlora.quant._array import is_quantized as is_quantized
from jaxlora.quant._formats import FORMATS as FORMATS
from jaxlora.quant._formats import FP4 as FP4
from jaxlora.quant._formats import INT4 as INT4
from jaxlora.quant._formats import INT8 as INT8
from jaxlora.quant._formats import NF4 as NF4
from jaxlora.quant._quantize import DOUBLE_QUANT_BLOCK_SIZE as DOUBLE_QUANT_BLOCK_SIZE
from jaxlora.quant._quantize import dequantize as dequantize
from jaxlora.quant._quantize import quantize as quantize
from jaxlora.quant._quantize import quantize_array as quantize_array
