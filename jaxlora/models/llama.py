"""A Llama-style decoder in Flax linen, named like Hugging Face's ``LlamaForCausalLM``.

The parameter tree mirrors the Hugging Face module names so that PEFT-style target
patterns carry over: ``embed_tokens/embedding``, ``layers_0/self_attn/q_proj/kernel``,
``layers_0/mlp/gate_proj/kernel``, ``layers_0/input_layernorm/scale``, ``norm/scale``,
``lm_head/kernel``. Kernels are Flax's ``(in, out)``. With ``scan_layers=True`` the
layers live under one module ``layers`` and every leaf gains a leading layer axis, e.g.
``layers/self_attn/q_proj/kernel`` has shape ``(n_layers, d_model, n_heads * head_dim)``.

References:
  Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models",
  https://arxiv.org/abs/2302.13971. Su et al. 2021, "RoFormer: Enhanced Transformer
  with Rotary Position Embedding", https://arxiv.org/abs/2104.09864. Ainslie et al.
  2023, "GQA: Training Generalized Multi-Query Transformer Models",
  https://arxiv.org/abs/2305.13245. Shazeer 2020, "GLU Variants Improve Transformer",
  https://arxiv.org/abs/2002.05202.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxlora.models.llama_config import LlamaConfig
from jaxlora.models.llama_layers import (
    _INIT,
    KVCache,
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    RMSNorm,
    _dense,
    apply_rotary,
    causal_attention,
    rotary_cos_sin,
)

__all__ = [
    "KVCache",
    "Llama",
    "LlamaAttention",
    "LlamaConfig",
    "LlamaDecoderLayer",
    "LlamaMLP",
    "RMSNorm",
    "apply_rotary",
    "causal_attention",
    "causal_lm_loss",
    "rotary_cos_sin",
]


class Llama(nn.Module):
    """A Llama-style causal language model.

    Attributes:
      config: the model config.

    Example:
      >>> model = Llama(LlamaConfig.tiny())
      >>> tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 256)
      >>> params = model.init(jax.random.key(1), tokens)
      >>> model.apply(params, tokens).shape
      (2, 8, 256)
      >>> params["params"]["layers_0"]["self_attn"]["k_proj"]["kernel"].shape
      (64, 32)
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        logits_at: jax.Array | None = None,
    ) -> Any:
        """Computes next-token logits, optionally with a KV cache.

        Args:
          tokens: integer token ids, shape ``(batch, seq)``.
          inputs_embeds: token embeddings, shape ``(batch, seq, d_model)``, used instead
            of looking up ``tokens`` (to differentiate with respect to the inputs).
          positions: ``(batch, seq)`` rotary positions; by default ``0, 1, ...`` (after
            the cache's filled slots, with a cache). Left-padded prompts pass each
            sequence's own positions.
          attention_mask: ``(batch, seq)``, true on real tokens; padding is never
            attended. By default every token is real.
          cache: a :class:`KVCache`: the tokens are written at its ``index`` and
            attend everything cached before them; the updated cache is returned.
          logits_at: ``(batch, k)`` positions (indices into ``seq``) whose logits to
            compute, instead of every position's (the last one, to decode; the
            answer's, to score): the vocabulary projection is the costliest op.

        Returns:
          float32 logits of shape ``(batch, seq, vocab_size)`` (``(batch, k, vocab)``
          with ``logits_at``); with a cache, ``(logits, cache)``.

        Raises:
          ValueError: if not exactly one of ``tokens`` and ``inputs_embeds`` is given,
            if its shape is wrong, or if the sequence (or the cache) is longer than
            ``config.max_len``.
        """
        cfg = self.config
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=_INIT,
            name="embed_tokens",
        )
        if tokens is not None and inputs_embeds is None:
            if jnp.ndim(tokens) != 2:
                raise ValueError(
                    f"tokens must have shape (batch, seq), got shape {jnp.shape(tokens)}."
                )
            x = embed(tokens)
        elif inputs_embeds is not None and tokens is None:
            if jnp.ndim(inputs_embeds) != 3 or jnp.shape(inputs_embeds)[-1] != cfg.d_model:
                raise ValueError(
                    f"inputs_embeds must have shape (batch, seq, {cfg.d_model}), "
                    f"got shape {jnp.shape(inputs_embeds)}."
                )
            if self.is_initializing():
                embed(jnp.zeros((1, 1), jnp.int32))  # Create embed_tokens all the same.
            x = jnp.asarray(inputs_embeds).astype(cfg.dtype)
        else:
            raise ValueError(
                "Llama needs exactly one of tokens and inputs_embeds; call model.apply("
                "params, tokens) or model.apply(params, inputs_embeds=embeds)."
            )
        batch, seq = x.shape[:2]
        length = seq if cache is None else cache.mask.shape[1]
        if length > cfg.max_len:
            raise ValueError(
                f"sequence length {length} exceeds config.max_len={cfg.max_len}; "
                "shorten the input (or the cache) or raise max_len."
            )
        start = 0 if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(seq), (batch, seq))
        cos, sin = rotary_cos_sin(positions, cfg.head_dim, theta=cfg.rope_theta)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
        if cache is not None:
            new = jnp.ones((batch, seq), bool) if mask is None else mask
            mask = jax.lax.dynamic_update_slice(cache.mask, new, (0, cache.index))

        layer_cls = LlamaDecoderLayer
        if cfg.remat:
            # in a scan, the loop body already keeps XLA from merging the recomputation
            # into the forward pass, so prevent_cse's extra barriers would only cost speed
            layer_cls = nn.remat(layer_cls, prevent_cse=not cfg.scan_layers)
        layer_caches = None if cache is None else (cache.k, cache.v)
        index = 0 if cache is None else cache.index
        if cfg.scan_layers:
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.n_layers,
            )
            x, updated = stack(cfg, name="layers")(x, cos, sin, mask, layer_caches, index)
        else:
            per_layer = []
            for i in range(cfg.n_layers):
                layer_cache = None if cache is None else (cache.k[i], cache.v[i])
                x, new_cache = layer_cls(cfg, name=f"layers_{i}")(
                    x, cos, sin, mask, layer_cache, index
                )
                per_layer.append(new_cache)
            updated = None if cache is None else jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)

        x = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(x)
        if logits_at is not None:
            x = jnp.take_along_axis(x, jnp.asarray(logits_at)[..., None], axis=1)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = _dense(cfg.vocab_size, "lm_head", cfg)(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        k, v = updated
        return logits, KVCache(k, v, mask, (cache.index + seq).astype(jnp.int32))


def causal_lm_loss(logits: ArrayLike, tokens: ArrayLike) -> jax.Array:
    """Mean next-token cross-entropy: position ``t`` predicts ``tokens[:, t + 1]``.

    Args:
      logits: shape ``(batch, seq, vocab)``; the last position is not scored.
      tokens: integer ids, shape ``(batch, seq)``; the first position is not a target.

    Returns:
      The scalar mean loss over ``batch * (seq - 1)`` predictions, in float32.

    Raises:
      ValueError: if the shapes do not match or ``seq < 2``.

    Example:
      >>> logits = jnp.zeros((1, 4, 10))
      >>> tokens = jnp.array([[1, 2, 3, 4]])
      >>> round(float(causal_lm_loss(logits, tokens)), 4)  # log(10): uniform guesses
      2.3026
    """
    logits, tokens = jnp.asarray(logits), jnp.asarray(tokens)
    if logits.ndim != 3 or tokens.shape != logits.shape[:2] or tokens.shape[1] < 2:
        raise ValueError(
            f"causal_lm_loss expects logits (batch, seq, vocab) and tokens (batch, seq) "
            f"with seq >= 2, got logits {logits.shape} and tokens {tokens.shape}."
        )
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)
    return -jnp.mean(target)
