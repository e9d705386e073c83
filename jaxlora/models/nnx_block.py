"""A small pre-norm transformer block in Flax NNX, for testing LoRA on ``nnx.Module``s.

Attribute paths follow the Hugging Face names: ``q_proj``, ``k_proj``, ``v_proj``,
``o_proj`` (bias-free ``nnx.Linear`` with ``(in, out)`` kernels), ``mlp.up``,
``mlp.down``, and the norms ``attn_norm``, ``mlp_norm``. Attention is causal,
multi-head, with rotary position embeddings; scores and softmax run in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from jaxlora.models.llama import apply_rotary, rotary_cos_sin

__all__ = ["NnxBlock", "NnxMLP"]


class NnxMLP(nnx.Module):
    """Two-layer GELU feed-forward: ``down(gelu(up(x)))``.

    Args:
      d_model: input and output width.
      d_ff: hidden width.
      rngs: random streams for the initializers.
      dtype: compute dtype (``None`` follows the inputs).
      param_dtype: dtype of the kernels and biases.

    Example:
      >>> mlp = NnxMLP(8, 16, rngs=nnx.Rngs(0))
      >>> mlp(jnp.ones((2, 8))).shape, mlp.up.kernel.shape
      ((2, 8), (8, 16))
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        rngs: nnx.Rngs,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
    ) -> None:
        self.up = nnx.Linear(d_model, d_ff, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.down = nnx.Linear(d_ff, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the MLP to the last axis of ``x``; same shape out."""
        return self.down(jax.nn.gelu(self.up(x)))


class NnxBlock(nnx.Module):
    """Pre-norm causal self-attention block followed by an MLP, both with residuals.

    Args:
      d_model: width of the residual stream.
      n_heads: number of attention heads; must divide ``d_model`` into an even
        head dimension.
      d_ff: hidden width of the MLP.
      rngs: random streams for the initializers.
      dtype: compute dtype (``None`` follows the inputs).
      param_dtype: dtype of the parameters.

    Raises:
      ValueError: if a size is not positive or ``d_model // n_heads`` is not a
        whole, even number.

    Example:
      >>> block = NnxBlock(16, 2, 32, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(0), (1, 5, 16))
      >>> block(x).shape, block.q_proj.kernel.shape
      ((1, 5, 16), (16, 16))
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        rngs: nnx.Rngs,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
    ) -> None:
        if min(d_model, n_heads, d_ff) < 1:
            raise ValueError(
                f"NnxBlock sizes must be positive, got d_model={d_model}, "
                f"n_heads={n_heads}, d_ff={d_ff}."
            )
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(
                f"NnxBlock needs d_model // n_heads to be a whole, even head dimension for "
                f"rotary embeddings, got d_model={d_model}, n_heads={n_heads}."
            )
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads

        def linear(d_in: int, d_out: int) -> nnx.Linear:
            return nnx.Linear(
                d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )

        self.attn_norm = nnx.RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d_model, d_model)
        self.k_proj = linear(d_model, d_model)
        self.v_proj = linear(d_model, d_model)
        self.o_proj = linear(d_model, d_model)
        self.mlp_norm = nnx.RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = NnxMLP(d_model, d_ff, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Runs the block on ``x`` of shape ``(batch, seq, d_model)``; same shape out."""
        batch, seq, d_model = x.shape
        heads = lambda t: t.reshape(batch, seq, self.n_heads, self.head_dim)
        h = self.attn_norm(x)
        q, k, v = heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h))
        cos, sin = rotary_cos_sin(jnp.arange(seq), self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scores = jnp.einsum("bqhd,bshd->bhqs", q, k, preferred_element_type=jnp.float32)
        scores = scores.astype(jnp.float32) / np.float32(np.sqrt(self.head_dim))
        causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqs,bshd->bqhd", probs, v).reshape(batch, seq, d_model)
        x = x + self.o_proj(out)
        return x + self.mlp(self.mlp_norm(x))
