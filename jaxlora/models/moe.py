"""A small mixture-of-experts decoder in Flax linen: Llama attention, routed SwiGLU experts.

Each layer's feed-forward block ``moe`` routes every token to its ``top_k``
experts (softmax router, weights renormalized over the chosen experts), sorts
the token copies by expert and runs all experts as grouped matmuls
(``jax.lax.ragged_dot``), as MaxText and Tunix do: dropless, no capacity
factor, no per-expert loop. An optional shared expert sees every token
(Qwen-MoE, DeepSeek-MoE). Parameter paths follow the Hugging Face names:
``layers_0/moe/router/kernel`` ``(d_model, experts)``,
``layers_0/moe/experts/gate_proj/kernel`` ``(experts, d_model, d_expert)``
(likewise ``up_proj``; ``down_proj`` is ``(experts, d_expert, d_model)``),
``layers_0/moe/shared_expert/gate_proj/kernel``.

The expert weights have a leading expert axis: adapt them with
``stacked_axes=1`` (or :func:`jaxlora.infer_layout`), which gives each expert its
own adapter ``a: (experts, in, r)``, ``b: (experts, r, out)``.

References:
  Shazeer et al. 2017, "Outrageously Large Neural Networks: The Sparsely-Gated
  Mixture-of-Experts Layer", https://arxiv.org/abs/1701.06538. Jiang et al. 2024,
  "Mixtral of Experts", https://arxiv.org/abs/2401.04088. Gale et al. 2022,
  "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts" (dropless grouped
  matmuls), https://arxiv.org/abs/2211.15841.
"""

from __future__ import annotations

import dataclasses
import numbers

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora.models.llama_config import LlamaConfig
from jaxlora.models.llama_layers import (
    _INIT,
    LlamaAttention,
    LlamaMLP,
    RMSNorm,
    _dense,
    rotary_cos_sin,
)

__all__ = ["MoeBlock", "MoeConfig", "MoeDecoder", "route"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeConfig:
    """Sizes of a :class:`MoeDecoder`: a :class:`LlamaConfig` plus the experts.

    Args:
      llama: attention, embedding, norm and numerics sizes (its ``d_ff`` sizes the
        shared expert).
      n_experts: number of routed experts.
      top_k: experts per token, at most ``n_experts``.
      d_expert: hidden width of each routed expert.
      shared_expert: add an expert that sees every token.

    Raises:
      ValueError: if a size is not a positive integer or ``top_k > n_experts``.
      TypeError: if ``llama`` is not a :class:`LlamaConfig`.

    Example:
      >>> cfg = MoeConfig.tiny()
      >>> cfg.n_experts, cfg.top_k, cfg.llama.d_model
      (4, 2, 64)
    """

    llama: LlamaConfig
    n_experts: int
    top_k: int = 2
    d_expert: int
    shared_expert: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.llama, LlamaConfig):
            raise TypeError(f"MoeConfig.llama must be a LlamaConfig, got {self.llama!r}.")
        for name in ("n_experts", "top_k", "d_expert"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"MoeConfig.{name} must be a positive integer, got {value!r}.")
        if self.top_k > self.n_experts:
            raise ValueError(
                f"MoeConfig.top_k={self.top_k} exceeds n_experts={self.n_experts}: a token "
                "cannot go to more experts than there are. Lower top_k."
            )
        if not isinstance(self.shared_expert, bool):
            raise TypeError(f"MoeConfig.shared_expert must be a bool, got {self.shared_expert!r}.")

    @classmethod
    def tiny(cls, **overrides: object) -> MoeConfig:
        """A 2-layer model for tests: d_model 64, 4 experts of width 32, top-2."""
        llama = LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=64)
        fields = dict(llama=llama, n_experts=4, top_k=2, d_expert=32) | overrides
        return cls(**fields)  # type: ignore[arg-type]


def route(
    router_logits: jax.Array, top_k: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Top-k routing, sorted by expert, for grouped matmuls.

    Args:
      router_logits: ``(tokens, experts)``.
      top_k: experts per token.

    Returns:
      ``(token_of, weight, group_sizes, order)``: for each of the ``tokens * top_k``
      copies in expert order, the token it copies and its routing weight (softmax
      over the chosen experts' logits); ``group_sizes[e]`` copies go to expert
      ``e``; ``order`` sorts the flat ``(token, choice)`` copies by expert.

    Example:
      >>> logits = jnp.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
      >>> token_of, weight, sizes, _ = route(logits, 1)
      >>> token_of.tolist(), sizes.tolist()
      ([0, 1], [1, 1, 0])
    """
    n_experts = router_logits.shape[-1]
    top_logits, experts = jax.lax.top_k(router_logits.astype(jnp.float32), top_k)
    weights = jax.nn.softmax(top_logits, axis=-1)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    return order // top_k, weights.reshape(-1)[order], group_sizes, order


class _Experts(nn.Module):
    """One weight ``kernel: (experts, in, out)`` applied as a grouped matmul."""

    n_experts: int
    features: int
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        cfg = self.config
        kernel = self.param(
            "kernel", _INIT, (self.n_experts, x.shape[-1], self.features), cfg.param_dtype
        )
        return jax.lax.ragged_dot(x.astype(cfg.dtype), kernel.astype(cfg.dtype), group_sizes)


class _RoutedExperts(nn.Module):
    """SwiGLU experts ``down(silu(gate(x)) * up(x))`` on copies grouped by expert."""

    config: MoeConfig

    @nn.compact
    def __call__(self, copies: jax.Array, group_sizes: jax.Array) -> jax.Array:
        cfg, llama = self.config, self.config.llama
        gate = _Experts(cfg.n_experts, cfg.d_expert, llama, name="gate_proj")
        up = _Experts(cfg.n_experts, cfg.d_expert, llama, name="up_proj")
        down = _Experts(cfg.n_experts, llama.d_model, llama, name="down_proj")
        hidden = nn.silu(gate(copies, group_sizes)) * up(copies, group_sizes)
        return down(hidden, group_sizes)


class MoeBlock(nn.Module):
    """Routed SwiGLU experts (and an optional shared expert) over ``(..., d_model)``.

    Attributes:
      config: the model config.

    Example:
      >>> cfg = MoeConfig.tiny()
      >>> x = jax.random.normal(jax.random.key(0), (2, 3, 64))
      >>> y, params = MoeBlock(cfg).init_with_output(jax.random.key(1), x)
      >>> y.shape, params["params"]["experts"]["gate_proj"]["kernel"].shape
      ((2, 3, 64), (4, 64, 32))
    """

    config: MoeConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, llama = self.config, self.config.llama
        tokens = x.reshape(-1, x.shape[-1])
        logits = _dense(cfg.n_experts, "router", llama)(tokens)
        token_of, weight, group_sizes, _ = route(logits, cfg.top_k)
        out = _RoutedExperts(cfg, name="experts")(tokens[token_of], group_sizes)
        out = out * weight[:, None].astype(out.dtype)
        y = jnp.zeros(tokens.shape, out.dtype).at[token_of].add(out)
        if cfg.shared_expert:
            y = y + LlamaMLP(llama, name="shared_expert")(tokens).astype(y.dtype)
        return y.reshape(x.shape).astype(x.dtype)


class _Layer(nn.Module):
    config: MoeConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        llama = self.config.llama
        norm = lambda name: RMSNorm(llama.norm_eps, llama.dtype, llama.param_dtype, name=name)
        h, _ = LlamaAttention(llama, name="self_attn")(norm("input_layernorm")(x), cos, sin)
        x = x + h
        return x + MoeBlock(self.config, name="moe")(norm("post_attention_layernorm")(x))


class MoeDecoder(nn.Module):
    """A causal language model whose layers are attention + :class:`MoeBlock`.

    Attributes:
      config: the model config.

    Example:
      >>> model = MoeDecoder(MoeConfig.tiny())
      >>> tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 256)
      >>> params = model.init(jax.random.key(1), tokens)
      >>> model.apply(params, tokens).shape
      (2, 8, 256)
      >>> params["params"]["layers_0"]["moe"]["experts"]["down_proj"]["kernel"].shape
      (4, 32, 64)
    """

    config: MoeConfig

    @nn.compact
    def __call__(
        self, tokens: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None
    ) -> jax.Array:
        """float32 next-token logits ``(batch, seq, vocab)``.

        Args:
          tokens: integer ids ``(batch, seq)``.
          inputs_embeds: ``(batch, seq, d_model)`` used instead of looking up
            ``tokens`` (to differentiate with respect to the inputs).

        Raises:
          ValueError: unless exactly one of ``tokens`` and ``inputs_embeds`` is
            given, with its shape.
        """
        llama = self.config.llama
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("MoeDecoder needs exactly one of tokens and inputs_embeds.")
        shape = jnp.shape(tokens if inputs_embeds is None else inputs_embeds)
        if len(shape) != (2 if inputs_embeds is None else 3):
            raise ValueError(
                "tokens must have shape (batch, seq) and inputs_embeds (batch, seq, d_model); "
                f"got shape {shape}."
            )
        embed = nn.Embed(
            llama.vocab_size,
            llama.d_model,
            dtype=llama.dtype,
            param_dtype=llama.param_dtype,
            embedding_init=_INIT,
            name="embed_tokens",
        )
        if inputs_embeds is None:
            x = embed(tokens)
        else:
            if self.is_initializing():
                embed(jnp.zeros((1, 1), jnp.int32))
            x = jnp.asarray(inputs_embeds).astype(llama.dtype)
        batch, seq = shape[:2]
        cos, sin = rotary_cos_sin(
            jnp.broadcast_to(jnp.arange(seq), (batch, seq)), llama.head_dim, theta=llama.rope_theta
        )
        layer = nn.remat(_Layer) if llama.remat else _Layer
        for i in range(llama.n_layers):
            x = layer(self.config, name=f"layers_{i}")(x, cos, sin)
        x = RMSNorm(llama.norm_eps, llama.dtype, llama.param_dtype, name="norm")(x)
        return _dense(llama.vocab_size, "lm_head", llama)(x).astype(jnp.float32)
