"""Key maps: jaxlora parameter paths to the module names of a Hugging Face PyTorch model.

A PEFT adapter file names each adapted module by its dotted name in the PyTorch model
(``encoder.layer.0.attention.self.query``). A key map turns a jaxlora parameter path
(``encoder/layer_0/attention/self/query/kernel``) into that name, or into ``None`` for
a parameter that has no counterpart. A weight stacked over layers (``nn.scan``) maps to
a *template* with one ``{}`` per stacked axis (``model.layers.{}.self_attn.q_proj``),
filled with each layer's index.

Only this direction is written down: :func:`jaxlora.io.peft.load` inverts it by mapping
every weight of the base it is given, so the two directions cannot disagree.

Example:
    >>> from jaxlora.io.peft import BERT_KEY_MAP, LLAMA_KEY_MAP
    >>> BERT_KEY_MAP("encoder/layer_0/attention/output/dense/kernel")
    'encoder.layer.0.attention.output.dense'
    >>> BERT_KEY_MAP("bert/embeddings/word_embeddings/embedding")  # BertClassifier's encoder
    'bert.embeddings.word_embeddings'
    >>> LLAMA_KEY_MAP("params/layers/mlp/gate_proj/kernel")  # scanned layers: one '{}' axis
    'model.layers.{}.mlp.gate_proj'
    >>> LLAMA_KEY_MAP("norm/scale") is None
    True
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Callable

_LEAF_NAMES = ("kernel", "embedding")


def default_is_embedding(path: str) -> bool:
    """Whether ``path`` holds an embedding table: its leaf is Flax's ``embedding``.

    Example:
        >>> default_is_embedding("embed_tokens/embedding"), default_is_embedding("lm_head/kernel")
        (True, False)
    """
    return path.rsplit("/", 1)[-1] == "embedding"


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """Maps jaxlora parameter paths to PEFT module names.

    Args:
        to_peft: ``(path) -> module name | None``. ``path`` is a ``/``-joined parameter
            path (``'layers_0/self_attn/q_proj/kernel'``); the result is the module's
            dotted name in the PyTorch model, without PEFT's ``base_model.model.``
            prefix (``'model.layers.0.self_attn.q_proj'``), or ``None`` for a parameter
            that has no PEFT counterpart. A weight with ``k`` stacked layer axes maps
            to a name with ``k`` ``{}`` fields, one per stacked axis, in order.
        is_embedding: ``(path) -> bool``: whether the module is a ``torch.nn.Embedding``
            (PEFT then stores ``lora_embedding_A``/``lora_embedding_B``). The default
            says yes for Flax's ``embedding`` leaves.

    Example:
        >>> from jaxlora.io.peft import KeyMap
        >>> key_map = KeyMap(lambda path: path.removesuffix("/kernel").replace("/", "."))
        >>> key_map("blocks/0/proj/kernel")
        'blocks.0.proj'
        >>> key_map.prefixed("model.")("blocks/0/proj/kernel")
        'model.blocks.0.proj'
        >>> key_map.is_embedding("embed/embedding"), key_map.is_embedding("proj/kernel")
        (True, False)
    """

    to_peft: Callable[[str], str | None]
    is_embedding: Callable[[str], bool] = default_is_embedding

    def __call__(self, path: str) -> str | None:
        """The PEFT module name (or template) of ``path``, or ``None``."""
        return self.to_peft(path)

    def prefixed(self, prefix: str) -> KeyMap:
        """This map with ``prefix`` put before every module name.

        Use it when the PyTorch model wraps the one the map was written for, e.g.
        ``BERT_KEY_MAP.prefixed("bert.")`` for a ``BertForSequenceClassification``
        whose encoder is the bare ``BertModel`` that :data:`BERT_KEY_MAP` names.

        Args:
            prefix: text to put in front, usually ending with ``.``.

        Returns:
            The new key map.

        Example:
            >>> from jaxlora.io.peft import BERT_KEY_MAP
            >>> BERT_KEY_MAP.prefixed("bert.")("encoder/layer_1/attention/self/query/kernel")
            'bert.encoder.layer.1.attention.self.query'
        """
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str; got {prefix!r}")
        inner = self.to_peft

        def to_peft(path: str) -> str | None:
            name = inner(path)
            return None if name is None else prefix + name

        return dataclasses.replace(self, to_peft=to_peft)


def as_key_map(key_map: KeyMap | Callable[[str], str | None]) -> KeyMap:
    """``key_map`` as a :class:`KeyMap` (a plain function gets the default ``is_embedding``).

    Example:
        >>> as_key_map(lambda path: "lm_head").is_embedding("lm_head/kernel")
        False
    """
    if isinstance(key_map, KeyMap):
        return key_map
    if callable(key_map):
        return KeyMap(key_map)
    raise TypeError(
        "key_map must be a jaxlora.io.peft.KeyMap or a function (path) -> PEFT module name "
        f"| None, such as jaxlora.io.peft.LLAMA_KEY_MAP; got {key_map!r}"
    )


def stacked_fields(template: str, path: str) -> int:
    """How many ``{}`` fields (stacked layer axes) a module name template holds.

    Example:
        >>> stacked_fields("model.layers.{}.mlp.up_proj", "layers/mlp/up_proj/kernel")
        1
    """
    count = 0
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(
            f"key_map({path!r}) returned {template!r}, which is not a valid name template "
            f"({e}); stacked layer axes are written as '{{}}', e.g. 'model.layers.{{}}.mlp'"
        ) from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field != "" or spec or conversion:
            raise ValueError(
                f"key_map({path!r}) returned {template!r}; a stacked layer axis must be "
                "written as a bare '{}' field, e.g. 'model.layers.{}.mlp.up_proj'"
            )
        count += 1
    return count


def _strip(path: str) -> tuple[list[str], str] | None:
    """``'params/a/b/kernel'`` -> ``(['a', 'b'], 'kernel')``; ``None`` for non-weight leaves."""
    parts = path.split("/")
    if parts and parts[0] == "params":
        parts = parts[1:]
    if len(parts) < 2 or parts[-1] not in _LEAF_NAMES:
        return None
    return parts[:-1], parts[-1]


def _bert(path: str) -> str | None:
    stripped = _strip(path)
    if stripped is None:
        return None
    modules, _ = stripped
    return ".".join(re.sub(r"^layer_(\d+)$", r"layer.\1", m) for m in modules)


def _llama(path: str) -> str | None:
    stripped = _strip(path)
    if stripped is None:
        return None
    modules, _ = stripped
    if modules == ["lm_head"]:
        return "lm_head"
    names = []
    for m in modules:
        m = re.sub(r"^layers_(\d+)$", r"layers.\1", m)
        names.append("layers.{}" if m == "layers" else m)
    return "model." + ".".join(names)


BERT_KEY_MAP = KeyMap(_bert)
"""Maps :class:`jaxlora.models.bert.BertModel` parameters to ``transformers.BertModel``.

``encoder/layer_0/attention/self/query/kernel`` becomes
``encoder.layer.0.attention.self.query`` and ``embeddings/word_embeddings/embedding``
becomes ``embeddings.word_embeddings``: the names of a bare ``BertModel``. The
parameters of :class:`jaxlora.models.bert.BertClassifier` (under ``bert/``) map to
``bert.encoder...``, as in ``BertForSequenceClassification``; for bare-encoder
parameters and a wrapped PyTorch model use ``BERT_KEY_MAP.prefixed("bert.")``. A
leading ``params/`` is ignored; biases and LayerNorm scales map to ``None``.

Example:
    >>> from jaxlora.io.peft import BERT_KEY_MAP
    >>> BERT_KEY_MAP("encoder/layer_0/attention/self/query/kernel")
    'encoder.layer.0.attention.self.query'
    >>> BERT_KEY_MAP("encoder/layer_0/attention/self/query/bias") is None
    True
"""

LLAMA_KEY_MAP = KeyMap(_llama)
"""Maps :class:`jaxlora.models.llama.Llama` parameters to ``transformers.LlamaForCausalLM``.

``layers_0/self_attn/q_proj/kernel`` becomes ``model.layers.0.self_attn.q_proj``,
``embed_tokens/embedding`` becomes ``model.embed_tokens`` and ``lm_head/kernel``
becomes ``lm_head``. With ``scan_layers=True`` the stacked
``layers/self_attn/q_proj/kernel`` becomes the template
``model.layers.{}.self_attn.q_proj``: one PEFT module per layer. A leading ``params/``
is ignored; norm scales map to ``None``.

Example:
    >>> from jaxlora.io.peft import LLAMA_KEY_MAP
    >>> LLAMA_KEY_MAP("layers_1/mlp/down_proj/kernel")
    'model.layers.1.mlp.down_proj'
    >>> LLAMA_KEY_MAP("layers/self_attn/q_proj/kernel")
    'model.layers.{}.self_attn.q_proj'
    >>> LLAMA_KEY_MAP("embed_tokens/embedding"), LLAMA_KEY_MAP("lm_head/kernel")
    ('model.embed_tokens', 'lm_head')
"""
