"""The layers of the reference Llama decoder: rotary embeddings, attention, MLP, one layer.

See :mod:`jaxlora.models.llama` for the model and its parameter names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jaxlora.models.llama_config import LlamaConfig

__all__ = [
    "KVCache",
    "LlamaAttention",
    "LlamaDecoderLayer",
    "LlamaMLP",
    "RMSNorm",
    "apply_rotary",
    "causal_attention",
    "rotary_cos_sin",
]

_INIT = nn.initializers.normal(stddev=0.02)


def rotary_cos_sin(
    positions: ArrayLike, head_dim: int, *, theta: float = 10000.0
) -> tuple[jax.Array, jax.Array]:
    """Cosines and sines of the rotary embedding angles, in float32.

    Uses the Hugging Face layout: frequency ``i`` drives features ``i`` and
    ``i + head_dim // 2``, so both tables repeat their first half.

    Args:
      positions: integer positions, shape ``(seq,)`` or ``(batch, seq)``.
      head_dim: features per head (even).
      theta: frequency base; frequency ``i`` is ``theta ** (-2 i / head_dim)``.

    Returns:
      ``(cos, sin)``, each of shape ``positions.shape + (head_dim,)``.

    Example:
      >>> cos, sin = rotary_cos_sin(jnp.arange(3), 4)
      >>> cos.shape, float(cos[0, 0]), float(sin[0, 0])
      ((3, 4), 1.0, 0.0)
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: ArrayLike, cos: ArrayLike, sin: ArrayLike) -> jax.Array:
    """Rotates query or key features by position ("rotate_half" convention).

    Computes ``x * cos + rotate_half(x) * sin`` in float32, where
    ``rotate_half([x1, x2]) = [-x2, x1]`` over the two halves of the last axis, and
    returns the result in ``x``'s dtype.

    Args:
      x: features, shape ``(batch, seq, heads, head_dim)``.
      cos: cosines from :func:`rotary_cos_sin`, shape ``(seq, head_dim)`` or
        ``(batch, seq, head_dim)``.
      sin: sines, same shape as ``cos``.

    Returns:
      The rotated features, same shape and dtype as ``x``.

    Example:
      >>> x = jnp.ones((1, 2, 1, 4))
      >>> cos, sin = rotary_cos_sin(jnp.arange(2), 4)
      >>> apply_rotary(x, cos, sin)[0, 0, 0]
      Array([1., 1., 1., 1.], dtype=float32)
    """
    x = jnp.asarray(x)
    x32 = x.astype(jnp.float32)
    cos = jnp.expand_dims(jnp.asarray(cos, jnp.float32), -2)
    sin = jnp.expand_dims(jnp.asarray(sin, jnp.float32), -2)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    dtype: Any,
    key_mask: jax.Array | None = None,
    query_start: Any = 0,
) -> jax.Array:
    """Causal grouped-query softmax attention, scores and softmax in float32.

    Query ``s`` sits at slot ``query_start + s`` of the key sequence and attends
    the keys at slots up to its own, where ``key_mask`` is true: with a KV cache
    the keys are the cache (``query_start`` its write index), without one they
    are the queries' own tokens (``query_start = 0``).

    Args:
        q: ``(batch, seq, n_heads, head_dim)``, rotary already applied.
        k: ``(batch, keys, n_kv_heads, head_dim)``, rotary already applied.
        v: ``(batch, keys, n_kv_heads, head_dim)``.
        dtype: the compute dtype of the probabilities and the output.
        key_mask: optional ``(batch, keys)`` bools: the slots that hold real tokens.
        query_start: the slot of the first query (an int or a traced scalar).

    Returns:
        ``(batch, seq, n_heads * head_dim)``. A query with no key to attend (a
        padding position) gets zeros.

    Example:
        >>> import jax.numpy as jnp
        >>> q = jnp.ones((1, 3, 4, 2)); kv = jnp.ones((1, 3, 2, 2))
        >>> causal_attention(q, kv, kv, dtype=jnp.float32).shape
        (1, 3, 8)
    """
    batch, seq, n_heads, hd = q.shape
    n_keys, kv = k.shape[1], k.shape[2]
    q = q.reshape(batch, seq, kv, n_heads // kv, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) / np.float32(np.sqrt(hd))
    slots = query_start + jnp.arange(seq)
    allowed = jnp.arange(n_keys)[None, :] <= slots[:, None]  # (seq, keys)
    allowed = jnp.broadcast_to(allowed, (batch, seq, n_keys))
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]
    allowed = allowed[:, None, None]  # (batch, 1, 1, seq, keys)
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(jnp.any(allowed, axis=-1, keepdims=True), probs, 0.0).astype(dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(dtype))
    return out.reshape(batch, seq, n_heads * hd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The keys and values of the tokens decoded so far, for every layer.

    Slots are positions in the cache, shared by the batch; a sequence's token
    at slot ``j`` is real where ``mask[:, j]``. Prompts of different lengths are
    left-padded, so that every sequence writes its next token at slot ``index``.

    Attributes:
        k: ``(n_layers, batch, slots, n_kv_heads, head_dim)``.
        v: the same for the values.
        mask: ``(batch, slots)`` bools: slots that hold real tokens.
        index: int32 scalar: the slot the next token goes to.

    Example:
        >>> from jaxlora.models.llama import LlamaConfig
        >>> cache = KVCache.empty(LlamaConfig.tiny(), batch=2, slots=16)
        >>> cache.k.shape, int(cache.index)
        ((2, 2, 16, 2, 16), 0)
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array

    @classmethod
    def empty(
        cls, config: LlamaConfig, *, batch: int, slots: int, dtype: DTypeLike | None = None
    ) -> KVCache:
        """A cache of ``slots`` empty slots per sequence (``dtype``: the model's by default)."""
        shape = (config.n_layers, batch, slots, config.n_kv_heads, config.head_dim)
        dtype = config.dtype if dtype is None else dtype
        return cls(
            jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype),
            jnp.zeros((batch, slots), bool),
            jnp.zeros((), jnp.int32),
        )


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned ``scale`` (no bias, no centring).

    Normalizes in float32, casts back to ``dtype``, then multiplies by ``scale``,
    as Hugging Face's ``LlamaRMSNorm`` does.

    Attributes:
      eps: added to the mean square before the reciprocal square root.
      dtype: output dtype.
      param_dtype: dtype of ``scale``.

    Example:
      >>> norm = RMSNorm()
      >>> x = jax.random.normal(jax.random.key(0), (2, 8))
      >>> y, params = norm.init_with_output(jax.random.key(1), x)
      >>> params["params"]["scale"].shape, bool(jnp.allclose((y**2).mean(-1), 1, atol=1e-4))
      ((8,), True)
    """

    eps: float = 1e-6
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalizes the last axis of ``x``; returns the same shape in ``dtype``."""
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return x32.astype(self.dtype) * scale.astype(self.dtype)


def _dense(features: int, name: str, config: LlamaConfig) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=_INIT,
        name=name,
    )


class LlamaAttention(nn.Module):
    """Causal self-attention with rotary embeddings and grouped-query attention.

    Submodules ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` are bias-free
    ``nn.Dense``. Query head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)``.
    Scores and softmax are computed in float32.

    Attributes:
      config: the model config.

    Example:
      >>> cfg = LlamaConfig.tiny()
      >>> x = jax.random.normal(jax.random.key(0), (1, 5, cfg.d_model))
      >>> cos, sin = rotary_cos_sin(jnp.arange(5), cfg.head_dim)
      >>> (y, _), _ = LlamaAttention(cfg).init_with_output(jax.random.key(1), x, cos, sin)
      >>> y.shape
      (1, 5, 64)
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        key_mask: jax.Array | None = None,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: Any = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attends causally over ``x`` of shape ``(batch, seq, d_model)``.

        ``cos`` and ``sin`` come from :func:`rotary_cos_sin` for the tokens'
        positions; ``key_mask`` marks real tokens (of ``x``, or of the cache's
        slots). With ``cache = (k, v)`` (one layer's slots), the new keys and
        values are written at slot ``cache_index`` and the queries attend the
        cache.

        Returns:
            ``(output, (k, v))``: the output (same shape as ``x``) and, with a
            cache, its updated slots (``None`` without).
        """
        cfg = self.config
        batch, seq, _ = x.shape
        hd, kv = cfg.head_dim, cfg.n_kv_heads
        q = _dense(cfg.n_heads * hd, "q_proj", cfg)(x).reshape(batch, seq, cfg.n_heads, hd)
        k = _dense(kv * hd, "k_proj", cfg)(x).reshape(batch, seq, kv, hd)
        v = _dense(kv * hd, "v_proj", cfg)(x).reshape(batch, seq, kv, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            out = causal_attention(q, k, v, dtype=cfg.dtype, key_mask=key_mask)
            updated = None
        else:
            cache_k, cache_v = cache
            index = cache_index
            start = (0, index, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            out = causal_attention(
                q, cache_k, cache_v, dtype=cfg.dtype, key_mask=key_mask, query_start=index
            )
            updated = (cache_k, cache_v)
        return _dense(cfg.d_model, "o_proj", cfg)(out), updated


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

    Attributes:
      config: the model config.

    Example:
      >>> cfg = LlamaConfig.tiny()
      >>> x = jax.random.normal(jax.random.key(0), (1, 3, cfg.d_model))
      >>> y, params = LlamaMLP(cfg).init_with_output(jax.random.key(1), x)
      >>> y.shape, params["params"]["gate_proj"]["kernel"].shape
      ((1, 3, 64), (64, 128))
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the MLP to the last axis of ``x``; same shape out."""
        cfg = self.config
        gate = _dense(cfg.d_ff, "gate_proj", cfg)(x)
        up = _dense(cfg.d_ff, "up_proj", cfg)(x)
        return _dense(cfg.d_model, "down_proj", cfg)(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """One pre-norm decoder layer: attention then MLP, each with a residual.

    Returns a ``(hidden, None)`` pair, the carry/output shape that ``nn.scan`` wants,
    so the same module runs scanned and unscanned.

    Attributes:
      config: the model config.

    Example:
      >>> cfg = LlamaConfig.tiny()
      >>> x = jax.random.normal(jax.random.key(0), (1, 4, cfg.d_model))
      >>> cos, sin = rotary_cos_sin(jnp.arange(4), cfg.head_dim)
      >>> (y, _), params = LlamaDecoderLayer(cfg).init_with_output(
      ...     jax.random.key(1), x, cos, sin)
      >>> y.shape, sorted(params["params"])
      ((1, 4, 64), ['input_layernorm', 'mlp', 'post_attention_layernorm', 'self_attn'])
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        key_mask: jax.Array | None = None,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: Any = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Runs the layer on ``x`` of shape ``(batch, seq, d_model)``.

        ``key_mask``, ``cache`` and ``cache_index`` are :class:`LlamaAttention`'s;
        returns the new hidden states and, with a cache, this layer's updated slots.
        """
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        h, updated = LlamaAttention(cfg, name="self_attn")(
            norm("input_layernorm")(x), cos, sin, key_mask, cache, cache_index
        )
        x = x + h
        h = LlamaMLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
        return x + h, updated
