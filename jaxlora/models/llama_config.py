"""``LlamaConfig``: the sizes of the reference Llama-style decoder, with presets and counts."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax.numpy as jnp
from jax.typing import DTypeLike

__all__ = ["LlamaConfig"]

_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "d_ff",
    "max_len",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shapes and numerics of a :class:`Llama` model.

    Args:
      vocab_size: number of token ids.
      d_model: width of the residual stream.
      n_layers: number of decoder layers.
      n_heads: number of query heads; must divide ``d_model``.
      n_kv_heads: number of key/value heads for grouped-query attention; must divide
        ``n_heads``. ``None`` (the default) means ``n_heads`` (plain multi-head).
      d_ff: hidden width of the SwiGLU MLP.
      max_len: longest sequence the model accepts.
      rope_theta: base of the rotary position embedding frequencies.
      norm_eps: epsilon added to the mean square in every RMSNorm.
      tie_embeddings: compute logits with the transposed token embedding instead of a
        separate ``lm_head``.
      scan_layers: run the layers with ``nn.scan`` over one stacked module ``layers``.
      remat: rematerialize each layer's activations in the backward pass.
      dtype: compute dtype of activations and matmuls.
      param_dtype: dtype the parameters are created in.

    Raises:
      ValueError: if a size is not a positive integer, the heads do not divide
        ``d_model`` (or the KV heads the heads), the head dimension is odd, a float
        hyperparameter is not positive, or a dtype is not a floating dtype.

    Example:
      >>> cfg = LlamaConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, d_ff=64)
      >>> cfg.n_kv_heads, cfg.head_dim
      (4, 8)
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int = None  # type: ignore[assignment]  # __post_init__: None -> n_heads
    d_ff: int
    max_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    scan_layers: bool = False
    remat: bool = False
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}.")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"LlamaConfig.d_model={self.d_model} is not divisible by "
                f"n_heads={self.n_heads}; pick n_heads that divides d_model."
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig.n_heads={self.n_heads} is not divisible by "
                f"n_kv_heads={self.n_kv_heads}; grouped-query attention shares each "
                "key/value head among n_heads // n_kv_heads query heads."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"LlamaConfig head_dim = d_model // n_heads = {self.head_dim} is odd; "
                "rotary embeddings rotate pairs of features, so it must be even."
            )
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive number, got {value!r}.")
        for name in ("tie_embeddings", "scan_layers", "remat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LlamaConfig.{name} must be a bool, got {getattr(self, name)!r}.")
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            try:
                ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(
                    f"LlamaConfig.{name} must be a floating dtype such as jnp.float32 or "
                    f"jnp.bfloat16, got {value!r}."
                )

    @property
    def head_dim(self) -> int:
        """Features per attention head, ``d_model // n_heads``.

        Example:
          >>> LlamaConfig.tiny().head_dim
          16
        """
        return self.d_model // self.n_heads

    @classmethod
    def tiny(cls, **overrides: Any) -> LlamaConfig:
        """A toy model for unit tests: 2 layers, d_model 64, 4 heads, 2 KV heads.

        Args:
          **overrides: fields to change, e.g. ``scan_layers=True``.

        Returns:
          The config (106,816 parameters without overrides).

        Example:
          >>> LlamaConfig.tiny(scan_layers=True).num_params()
          106816
        """
        fields = dict(
            vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_len=128
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def llama_1b(cls, **overrides: Any) -> LlamaConfig:
        """A 1.1B-parameter model with the TinyLlama-1.1B shapes.

        Vocabulary 32000, d_model 2048, 22 layers, 32 heads, 4 KV heads, d_ff 5632,
        untied embeddings: 1,100,048,384 parameters.

        Args:
          **overrides: fields to change, e.g. ``dtype=jnp.bfloat16``.

        Returns:
          The config.

        Example:
          >>> LlamaConfig.llama_1b().num_params()
          1100048384
        """
        fields = dict(
            vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def llama_7b(cls, **overrides: Any) -> LlamaConfig:
        """The LLaMA-7B shapes: 6,738,415,616 parameters.

        Vocabulary 32000, d_model 4096, 32 layers, 32 heads (no GQA), d_ff 11008,
        untied embeddings.

        Args:
          **overrides: fields to change, e.g. ``scan_layers=True``.

        Returns:
          The config.

        Example:
          >>> LlamaConfig.llama_7b().num_params()
          6738415616
        """
        fields = dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008)
        return cls(**{**fields, **overrides})

    def num_params(self) -> int:
        """Counts the parameters analytically, without building the model.

        Returns:
          The number of scalars in the parameter tree of :class:`Llama` with this config.

        Example:
          >>> LlamaConfig.tiny(tie_embeddings=True).num_params()
          90432
        """
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        attn = 2 * d * d + 2 * d * kv
        mlp = 3 * d * self.d_ff
        layer = attn + mlp + 2 * d
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return embed + self.n_layers * layer + d + head
