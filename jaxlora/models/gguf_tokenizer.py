"""The tokenizer and chat template stored in a GGUF file's ``tokenizer.*`` metadata.

:func:`load_gguf_tokenizer` builds a Hugging Face ``tokenizers.Tokenizer``
from ``tokenizer.ggml.*`` (byte-level BPE, ``tokenizer.ggml.model = "gpt2"``)
that gives the token ids transformers' GGUF tokenizer gives;
:func:`apply_chat_template` renders ``tokenizer.chat_template`` with jinja2 as
transformers' ``apply_chat_template`` does.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from jaxlora.models.gguf import read_gguf_metadata

__all__ = ["GGUFTokenizer", "apply_chat_template", "load_gguf_tokenizer"]

_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType
# tokenizer.ggml.pre -> split digits one by one before the byte-level regex (llama.cpp's
# pre-tokenizers; "smollm" is SmolLM's \p{N} split followed by GPT-2's regex)
_PRE_TOKENIZERS = {"default": False, "gpt2": False, "smollm": True}
_SPECIAL_KEYS = {
    "bos_token": "bos",
    "eos_token": "eos",
    "unk_token": "unknown",
    "pad_token": "padding",
}


class GGUFTokenizer(NamedTuple):
    """What :func:`load_gguf_tokenizer` returns.

    Attributes:
        tokenizer: the ``tokenizers.Tokenizer``.
        bos_id: ``tokenizer.ggml.bos_token_id``, or ``None``.
        eos_id: ``tokenizer.ggml.eos_token_id``, or ``None``.
    """

    tokenizer: Tokenizer
    bos_id: int | None
    eos_id: int | None


def _metadata(source: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    return source if isinstance(source, Mapping) else read_gguf_metadata(source)


def load_gguf_tokenizer(source: str | os.PathLike | Mapping[str, Any]) -> GGUFTokenizer:
    """Builds the byte-level BPE tokenizer of a GGUF file from its metadata.

    The vocabulary is ``tokenizer.ggml.tokens`` (id = index, in GPT-2's
    byte-to-unicode spelling), the merges ``tokenizer.ggml.merges`` in rank
    order; tokens of type CONTROL (``tokenizer.ggml.token_type`` 3) become
    special tokens, USER_DEFINED (4) added ones. Pre-tokenization is GPT-2's
    byte-level regex (with ``tokenizer.ggml.add_space_prefix``), after a split
    into single digits for ``tokenizer.ggml.pre = "smollm"`` as llama.cpp does.
    The bos/eos tokens are added to every encoding when
    ``tokenizer.ggml.add_bos_token``/``add_eos_token`` say so.

    Args:
        source: a ``.gguf`` file, or its metadata from
            :func:`jaxlora.models.gguf.read_gguf_metadata`.

    Returns:
        a :class:`GGUFTokenizer`: ``(tokenizer, bos_id, eos_id)``.

    Raises:
        ValueError: if the metadata has no tokenizer, or one that is not
            byte-level BPE (``"gpt2"``), a pre-tokenizer it does not know, or
            merges or token types that do not fit the tokens.
        FileNotFoundError: if there is no file at ``source``.

    Example:
        >>> from tokenizers import pre_tokenizers
        >>> from jaxlora.models.gguf_tokenizer import load_gguf_tokenizer
        >>> tokens = ["<s>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "hi", "Ġhi"]
        >>> meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
        ...         "tokenizer.ggml.merges": ["h i", "Ġ hi"],
        ...         "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        ...         "tokenizer.ggml.bos_token_id": 0}
        >>> tok, bos, eos = load_gguf_tokenizer(meta)
        >>> ids = tok.encode("<s>hi hi!").ids
        >>> ids, [tokens[i] for i in ids], bos, eos
        ([0, 257, 258, 1], ['<s>', 'hi', 'Ġhi', '!'], 0, None)
        >>> tok.decode(ids)  # special tokens are skipped
        'hi hi!'
    """
    meta = _metadata(source)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise ValueError("the GGUF metadata has no tokenizer (no 'tokenizer.ggml.model')")
    if kind != "gpt2":
        raise ValueError(
            f"tokenizer.ggml.model is {kind!r}; load_gguf_tokenizer builds byte-level BPE "
            "('gpt2') tokenizers only"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"tokenizer.ggml.pre is {pre!r}, a pre-tokenizer load_gguf_tokenizer does not know; "
            f"it knows {', '.join(map(repr, _PRE_TOKENIZERS))}"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    for rank, merge in enumerate(merges):
        if len(merge) != 2 or any(part not in vocab for part in (*merge, "".join(merge))):
            raise ValueError(
                f"tokenizer.ggml.merges[{rank}] = {' '.join(merge)!r} is not 'left right' with "
                "left, right and their concatenation in tokenizer.ggml.tokens"
            )
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(types) != len(tokens):
        raise ValueError(
            f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
    if _PRE_TOKENIZERS[pre]:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == _USER_DEFINED
        ]
    )
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    ends = [
        (tokens[i], i)
        for i, key in ((bos, "add_bos_token"), (eos, "add_eos_token"))
        if i is not None and meta.get(f"tokenizer.ggml.{key}", False)
    ]
    if ends:
        first = f"{ends[0][0]}:0 " if meta.get("tokenizer.ggml.add_bos_token") else ""
        last = f" {ends[-1][0]}:0" if meta.get("tokenizer.ggml.add_eos_token") else ""
        tok.post_processor = processors.TemplateProcessing(
            single=f"{first}$A:0{last}", pair=f"{first}$A:0{last} $B:1", special_tokens=ends
        )
    return GGUFTokenizer(tok, None if bos is None else int(bos), None if eos is None else int(eos))


def apply_chat_template(
    path_or_metadata: str | os.PathLike | Mapping[str, Any],
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
) -> str:
    """Renders the file's ``tokenizer.chat_template`` for ``messages``, as transformers does.

    jinja2's ``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and
    ``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception`` and
    ``strftime_now``, and a ``tojson`` that does not escape HTML; the template
    sees ``messages``, ``add_generation_prompt`` and the special tokens
    (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``) as strings.

    Args:
        path_or_metadata: a ``.gguf`` file, or its metadata from
            :func:`jaxlora.models.gguf.read_gguf_metadata`.
        messages: ``[{"role": ..., "content": ...}, ...]``.
        add_generation_prompt: end with the header of an assistant turn.

    Returns:
        the prompt text (tokenize it with the special tokens recognized, as
        :func:`load_gguf_tokenizer`'s tokenizer does).

    Raises:
        ValueError: if the metadata has no chat template, ``messages`` is empty,
            or the template raises.

    Example:
        >>> from jaxlora.models.gguf_tokenizer import apply_chat_template
        >>> meta = {"tokenizer.chat_template": "{% for m in messages %}<|{{ m['role'] }}|>"
        ...         "{{ m['content'] }}{{ eos_token }}\\n{% endfor %}"
        ...         "{% if add_generation_prompt %}<|assistant|>{% endif %}",
        ...         "tokenizer.ggml.tokens": ["</s>"], "tokenizer.ggml.eos_token_id": 0}
        >>> apply_chat_template(meta, [{"role": "user", "content": "Hi"}])
        '<|user|>Hi</s>\\n<|assistant|>'
    """
    meta = _metadata(path_or_metadata)
    template = meta.get("tokenizer.chat_template")
    if not template:
        raise ValueError("the GGUF metadata has no chat template ('tokenizer.chat_template')")
    if not messages:
        raise ValueError("apply_chat_template needs at least one message")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    tokens = meta.get("tokenizer.ggml.tokens") or []
    specials = {}
    for name, key in _SPECIAL_KEYS.items():
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            specials[name] = tokens[i]
    try:
        return env.from_string(template).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **specials,
        )
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the chat template failed: {e}") from None
