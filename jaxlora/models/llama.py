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

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxlora.models.llama_config import LlamaConfig
from jaxlora.models.llama_layers import (
    _INIT,
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
        self, tokens: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None
    ) -> jax.Array:
        """Computes next-token logits.

        Args:
          tokens: integer token ids, shape ``(batch, seq)``.
          inputs_embeds: token embeddings, shape ``(batch, seq, d_model)``, used instead
            of looking up ``tokens`` (to differentiate with respect to the inputs).

        Returns:
          float32 logits of shape ``(batch, seq, vocab_size)``.

        Raises:
          ValueError: if not exactly one of ``tokens`` and ``inputs_embeds`` is given,
            if its shape is wrong, or if ``seq > config.max_len``.
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
        seq = x.shape[1]
        if seq > cfg.max_len:
            raise ValueError(
                f"sequence length {seq} exceeds config.max_len={cfg.max_len}; "
                "shorten the input or raise max_len."
            )
        cos, sin = rotary_cos_sin(jnp.arange(seq), cfg.head_dim, theta=cfg.rope_theta)

        if cfg.scan_layers:
            layer_cls = LlamaDecoderLayer
            # scan's loop body already keeps XLA from merging the recomputation into the
            # forward pass, so prevent_cse's extra barriers would only cost speed.
            if cfg.remat:
                layer_cls = nn.remat(layer_cls, prevent_cse=False)
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
            )
            x, _ = stack(cfg, name="layers")(x, cos, sin)
        else:
            layer_cls = nn.remat(LlamaDecoderLayer) if cfg.remat else LlamaDecoderLayer
            for i in range(cfg.n_layers):
                x, _ = layer_cls(cfg, name=f"layers_{i}")(x, cos, sin)

        x = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = _dense(cfg.vocab_size, "lm_head", cfg)(x)
        return logits.astype(jnp.float32)


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
