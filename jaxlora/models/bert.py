"""A BERT encoder in Flax linen that reproduces Hugging Face ``transformers.BertModel``.

Post-LayerNorm BERT (Devlin et al. 2018, arXiv:1810.04805) with exact (erf) GELU and
LayerNorm epsilon 1e-12. Its checkpoint loaders (Hugging Face state dicts, the
pretrained all-MiniLM-L6-v2, its tokenizer) are in :mod:`jaxlora.models.minilm`.

Parameter paths mirror the Hugging Face names so that a key map to PEFT is one rule:
``encoder/layer_3/attention/self/query/kernel`` is ``encoder.layer.3.attention.self.query.weight``
transposed (Flax kernels are ``(in, out)``, torch ``Linear`` weights ``(out, in)``), and
``embedding``/``scale`` are ``weight``.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
from flax import linen as nn

_INIT = nn.initializers.normal(stddev=0.02)  # transformers' initializer_range


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """Shapes of a BERT encoder.

    Attributes:
        vocab_size: Number of WordPiece tokens.
        hidden_size: Width of the residual stream; a multiple of ``num_heads``.
        num_layers: Number of transformer layers.
        num_heads: Attention heads per layer.
        intermediate_size: Width of the feed-forward block.
        max_position: Longest sequence the position table covers.
        type_vocab_size: Number of token types (segments).
        layer_norm_eps: LayerNorm epsilon.

    Raises:
        TypeError: If a size is not an integer.
        ValueError: If a size is not positive, ``hidden_size`` is not a multiple of
            ``num_heads``, or ``layer_norm_eps`` is not positive.

    Example:
        >>> BertConfig(vocab_size=100, hidden_size=16, num_layers=2, num_heads=4,
        ...            intermediate_size=32).head_dim
        4
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "layer_norm_eps":
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
                    raise ValueError(
                        f"BertConfig.layer_norm_eps must be a positive float, got {value!r}; "
                        "BERT uses 1e-12"
                    )
            elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(
                    f"BertConfig.{field.name} must be an int, got {type(value).__name__} {value!r}"
                )
            elif value < 1:
                raise ValueError(f"BertConfig.{field.name} must be positive, got {value}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig.hidden_size={self.hidden_size} is not a multiple of "
                f"num_heads={self.num_heads}; pick num_heads dividing hidden_size"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``hidden_size // num_heads``."""
        return self.hidden_size // self.num_heads

    @classmethod
    def minilm_l6(cls) -> BertConfig:
        """The shapes of sentence-transformers' all-MiniLM-L6-v2 (22.7M parameters).

        Returns:
            The config: 30522 tokens, width 384, 6 layers of 12 heads, feed-forward 1536.

        Example:
            >>> BertConfig.minilm_l6().num_layers
            6
        """
        return cls(
            vocab_size=30522,
            hidden_size=384,
            num_layers=6,
            num_heads=12,
            intermediate_size=1536,
            max_position=512,
            type_vocab_size=2,
            layer_norm_eps=1e-12,
        )


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=_INIT, name=name)


def _layer_norm(config: BertConfig) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name="LayerNorm")


class _Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        c = self.config
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=_INIT, name="word_embeddings")(
            input_ids
        )
        # Same order of additions as transformers: (words + types) + positions.
        x = x + nn.Embed(
            c.type_vocab_size, c.hidden_size, embedding_init=_INIT, name="token_type_embeddings"
        )(token_type_ids)
        x = x + nn.Embed(
            c.max_position, c.hidden_size, embedding_init=_INIT, name="position_embeddings"
        )(positions)
        return _layer_norm(c)(x)


class _SelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        *batch, seq, _ = x.shape

        def heads(name: str) -> jax.Array:
            return _dense(c.hidden_size, name)(x).reshape(*batch, seq, c.num_heads, c.head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) * c.head_dim**-0.5
        keep = mask[..., None, None, :]
        scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("...hqk,...khd->...qhd", weights, v)
        return out.reshape(*batch, seq, c.hidden_size)


class _AddNorm(nn.Module):
    """``LayerNorm(residual + dense(x))``: BERT's ``*Output`` blocks."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        return _layer_norm(self.config)(_dense(self.config.hidden_size, "dense")(x) + residual)


class _Attention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        context = _SelfAttention(self.config, name="self")(x, mask)
        return _AddNorm(self.config, name="output")(context, x)


class _Intermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.gelu(_dense(self.config.intermediate_size, "dense")(x), approximate=False)


class _Layer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = _Attention(self.config, name="attention")(x, mask)
        h = _Intermediate(self.config, name="intermediate")(x)
        return _AddNorm(self.config, name="output")(h, x)


class _Encoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for i in range(self.config.num_layers):
            x = _Layer(self.config, name=f"layer_{i}")(x, mask)
        return x


class BertModel(nn.Module):
    """BERT encoder returning the last hidden states, like ``transformers.BertModel``.

    Parameters live at ``embeddings/{word_embeddings,position_embeddings,
    token_type_embeddings,LayerNorm}`` and ``encoder/layer_{i}/{attention/self/{query,key,value},
    attention/output/{dense,LayerNorm},intermediate/dense,output/{dense,LayerNorm}}``. There is
    no pooler and no dropout: the encoder is deterministic.

    Attributes:
        config: The encoder's shapes.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> config = BertConfig(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2,
        ...                     intermediate_size=16, max_position=16)
        >>> ids = jnp.array([[2, 7, 9, 3], [2, 5, 3, 0]])
        >>> mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
        >>> model = BertModel(config)
        >>> params = model.init(jax.random.key(0), ids, mask)["params"]
        >>> model.apply({"params": params}, ids, mask).shape
        (2, 4, 8)
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.typing.ArrayLike,
        attention_mask: jax.typing.ArrayLike,
        token_type_ids: jax.typing.ArrayLike | None = None,
    ) -> jax.Array:
        """Encodes a batch of token ids.

        Args:
            input_ids: Integer token ids, ``(batch, seq)``. Ids outside ``[0, vocab_size)``
                are not checked (they read NaN embeddings).
            attention_mask: ``(batch, seq)``, 1 (or True) for real tokens, 0 for padding.
            token_type_ids: ``(batch, seq)`` segment ids; zeros when omitted.

        Returns:
            Hidden states of the last layer, ``(batch, seq, hidden_size)``.

        Raises:
            ValueError: If the inputs are not ``(batch, seq)`` of one shape, or ``seq``
                exceeds ``config.max_position``.
        """
        c = self.config
        input_ids = jnp.asarray(input_ids)
        attention_mask = jnp.asarray(attention_mask)
        if input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must be (batch, seq), got shape {input_ids.shape}; "
                "add a batch axis with input_ids[None]"
            )
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise TypeError(f"input_ids must be integers, got dtype {input_ids.dtype}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {attention_mask.shape} but input_ids has "
                f"{input_ids.shape}; they must match"
            )
        if input_ids.shape[1] > c.max_position:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position={c.max_position}; "
                f"truncate the inputs (load_tokenizer(max_length={c.max_position}))"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        else:
            token_type_ids = jnp.asarray(token_type_ids)
            if token_type_ids.shape != input_ids.shape:
                raise ValueError(
                    f"token_type_ids has shape {token_type_ids.shape} but input_ids has "
                    f"{input_ids.shape}; they must match (or pass None)"
                )
        x = _Embeddings(c, name="embeddings")(input_ids, token_type_ids)
        return _Encoder(c, name="encoder")(x, attention_mask.astype(bool))


def abstract_params(config: BertConfig) -> dict:
    """The encoder's parameter tree as ``jax.ShapeDtypeStruct`` s: shapes only, nothing allocated.

    Example:
        >>> from jaxlora.models.bert import BertConfig, abstract_params
        >>> config = BertConfig(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2,
        ...                     intermediate_size=16, max_position=16)
        >>> abstract_params(config)["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"].shape
        (8, 16)
    """
    dummy = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: BertModel(config).init(jax.random.key(0), dummy, dummy)["params"])


def mean_pool(hidden: jax.typing.ArrayLike, mask: jax.typing.ArrayLike) -> jax.Array:
    """Averages hidden states over real tokens, as sentence-transformers pools.

    Args:
        hidden: ``(..., seq, features)`` hidden states.
        mask: ``(..., seq)``, 1 for real tokens and 0 for padding.

    Returns:
        ``(..., features)``: the sum over real tokens divided by their count (at least 1e-9).

    Raises:
        ValueError: If ``mask``'s shape is not ``hidden``'s without the last axis.

    Example:
        >>> import jax.numpy as jnp
        >>> hidden = jnp.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
        >>> mean_pool(hidden, jnp.array([[1, 1, 0]]))
        Array([[2., 3.]], dtype=float32)
    """
    hidden = jnp.asarray(hidden)
    mask = jnp.asarray(mask)
    if mask.shape != hidden.shape[:-1]:
        raise ValueError(
            f"mask has shape {mask.shape} but hidden has {hidden.shape}; the mask must be "
            f"hidden.shape[:-1] = {hidden.shape[:-1]}"
        )
    weights = mask.astype(hidden.dtype)[..., None]
    total = jnp.sum(hidden * weights, axis=-2)
    return total / jnp.maximum(jnp.sum(weights, axis=-2), 1e-9)


class BertClassifier(nn.Module):
    """Sentence classifier: BERT encoder, mean pooling, dropout, then a linear head.

    The encoder's parameters sit under ``bert`` (as in ``BertForSequenceClassification``)
    and the head under ``classifier``, so pretrained weights slot in as
    ``{"bert": encoder_params, "classifier": ...}``.

    Attributes:
        config: The encoder's shapes.
        num_classes: Number of output logits.
        dropout_rate: Dropout on the pooled embedding while training, in ``[0, 1)``.

    Raises:
        ValueError: If ``num_classes < 1`` or ``dropout_rate`` is outside ``[0, 1)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> config = BertConfig(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2,
        ...                     intermediate_size=16, max_position=16)
        >>> ids, mask = jnp.array([[2, 7, 3]]), jnp.array([[1, 1, 1]])
        >>> model = BertClassifier(config, num_classes=2, dropout_rate=0.1)
        >>> params = model.init(jax.random.key(0), ids, mask)["params"]
        >>> sorted(params)
        ['bert', 'classifier']
        >>> logits = model.apply({"params": params}, ids, mask, deterministic=False,
        ...                      rngs={"dropout": jax.random.key(1)})
        >>> logits.shape
        (1, 2)
    """

    config: BertConfig
    num_classes: int = 2
    dropout_rate: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ValueError(f"num_classes must be an int, got {self.num_classes!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {self.num_classes}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.typing.ArrayLike,
        attention_mask: jax.typing.ArrayLike,
        token_type_ids: jax.typing.ArrayLike | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Classifies a batch of sentences.

        Args:
            input_ids: Integer token ids, ``(batch, seq)``.
            attention_mask: ``(batch, seq)``, 1 for real tokens, 0 for padding.
            token_type_ids: ``(batch, seq)`` segment ids; zeros when omitted.
            deterministic: If False, apply dropout (needs a ``"dropout"`` rng).

        Returns:
            Logits, ``(batch, num_classes)``.
        """
        hidden = BertModel(self.config, name="bert")(input_ids, attention_mask, token_type_ids)
        pooled = mean_pool(hidden, attention_mask)
        pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=deterministic)
        return nn.Dense(self.num_classes, kernel_init=_INIT, name="classifier")(pooled)
