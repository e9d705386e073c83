"""``generate``: jit-compiled decoding with a KV cache, for the reference Llama (and LoRA on it).

Prompts of different lengths are left-padded into one batch, so that every
sequence writes its next token into the same cache slot; each keeps its own
rotary positions and never attends its padding. One prefill pass fills the
cache with the prompts, then a ``lax.while_loop`` decodes one token per step
for every sequence until each has produced an end-of-sequence token or
``max_new_tokens``. Sampling is greedy (``temperature=0``) or from the
temperature-scaled distribution restricted to its top-``p`` mass.

The model is any function ``fn(params, tokens, *, positions, attention_mask,
cache, logits_at) -> (logits, cache)`` with the keywords of
:class:`jaxlora.models.llama.Llama`: the plain model, ``merge``-d weights,
or :func:`jaxlora.lora_apply` of it with ``params = (base, delta)`` (and, for
one adapter per sequence, a stacked delta and its ``adapter_ids``; see the
example). ``params`` is traced, so new adapter values reuse the compiled loop;
pass the same ``fn`` object each time to reuse it.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._checks import check_key
from jaxlora.models.llama_config import LlamaConfig
from jaxlora.models.llama_layers import KVCache

__all__ = ["Generation", "generate", "left_pad"]


@dataclasses.dataclass(frozen=True)
class Generation:
    """What :func:`generate` returns.

    Attributes:
        tokens: ``(batch, max_new_tokens)`` int32 numpy: each sequence's new tokens, its
            end-of-sequence token included, then ``pad_id``.
        lengths: ``(batch,)``: how many of them each sequence produced.
        finished: ``(batch,)`` bools: whether it ended with an end-of-sequence token.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray

    def sequences(self) -> list[list[int]]:
        """The new tokens of each sequence, as lists (without padding)."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


def left_pad(prompts: Sequence[Sequence[int]], *, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, mask)``: prompts left-padded to the longest, ``(batch, length)`` each.

    Example:
        >>> tokens, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
        >>> tokens.tolist(), mask.tolist()
        ([[5, 6, 7], [0, 0, 8]], [[True, True, True], [False, False, True]])
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    length = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt) :] = prompt
        mask[row, length - len(prompt) :] = True
    return tokens, mask


def generate(
    fn: Callable[..., Any],
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    config: LlamaConfig,
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
) -> Generation:
    """Decodes up to ``max_new_tokens`` tokens after each prompt, with a KV cache.

    Args:
        fn: ``fn(params, tokens, *, positions, attention_mask, cache, logits_at)``
            returning ``(logits, cache)``, as ``Llama(config).apply`` does with a
            :class:`~jaxlora.models.llama.KVCache`.
        params: what ``fn`` takes first (the weights, ``(base, delta)``, ...).
        prompts: token ids, one list per sequence (different lengths allowed).
        config: the model's config (cache shapes and ``max_len``).
        max_new_tokens: the most tokens to generate per sequence, at least 1.
        eos_id: the end-of-sequence id, or several.
        pad_id: the id written after a sequence ends (and used to pad prompts).
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: sample from the smallest set of tokens whose probability reaches
            ``top_p`` (nucleus sampling); 1 keeps them all.
        key: a PRNG key; required when ``temperature > 0``.

    Returns:
        A :class:`Generation`.

    Raises:
        ValueError: for empty prompts, a non-positive ``max_new_tokens``, prompts
            plus new tokens longer than ``config.max_len``, a ``temperature < 0``,
            a ``top_p`` outside ``(0, 1]``, or sampling without a key.
        TypeError: for a ``key`` that is not a PRNG key.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlora
        >>> from jaxlora.models.generate import generate
        >>> from jaxlora.models.llama import Llama, LlamaConfig
        >>> config = LlamaConfig.tiny()
        >>> model = Llama(config)
        >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
        >>> fn = lambda p, tokens, **kw: model.apply({"params": p}, tokens, **kw)
        >>> out = generate(fn, params, [[1, 2, 3], [4]], config=config, max_new_tokens=5,
        ...                eos_id=0)
        >>> out.tokens.shape, out.lengths.tolist()[0] <= 5
        ((2, 5), True)
        >>> # LoRA: lora_apply's wrapper takes (base, delta); route one adapter per sequence
        >>> base, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=2),
        ...                             key=jax.random.key(1))
        >>> lora = jaxlora.lora_apply(lambda p, tokens, **kw: model.apply({"params": p},
        ...                                                               tokens, **kw))
        >>> def lora_fn(p, tokens, **kw):
        ...     base, stacked, ids = p
        ...     return lora(base, stacked, tokens, adapter_ids=ids, **kw)
        >>> stacked = jaxlora.stack([delta, delta])
        >>> mixed = generate(lora_fn, (base, stacked, jnp.array([0, 1])), [[1, 2, 3], [4]],
        ...                  config=config, max_new_tokens=5, eos_id=0)
        >>> bool((mixed.tokens == out.tokens).all())  # b = 0: the base model's tokens
        True
    """
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    if not isinstance(temperature, numbers.Real) or not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy); got {temperature!r}")
    if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p!r}")
    if temperature > 0:
        if key is None:
            raise ValueError("sampling (temperature > 0) needs key=jax.random.key(seed)")
        check_key("key", key)
    key = jax.random.key(0) if key is None else key
    tokens, mask = left_pad(prompts, pad_id=pad_id)
    slots = tokens.shape[1] + int(max_new_tokens)
    if slots > config.max_len:
        raise ValueError(
            f"the longest prompt ({tokens.shape[1]} tokens) plus max_new_tokens="
            f"{max_new_tokens} is {slots}, more than config.max_len={config.max_len}"
        )
    eos = tuple(int(e) for e in ((eos_id,) if isinstance(eos_id, numbers.Integral) else eos_id))
    out, lengths, finished = _decode(
        fn,
        params,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        key,
        config=config,
        max_new=int(max_new_tokens),
        eos=eos,
        pad_id=int(pad_id),
        temperature=float(temperature),
        top_p=float(top_p),
    )
    return Generation(np.asarray(out), np.asarray(lengths), np.asarray(finished))


@functools.partial(
    jax.jit,
    static_argnums=(0,),
    static_argnames=("config", "max_new", "eos", "pad_id", "temperature", "top_p"),
)
def _decode(
    fn: Callable[..., Any],
    params: Any,
    tokens: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    *,
    config: LlamaConfig,
    max_new: int,
    eos: tuple[int, ...],
    pad_id: int,
    temperature: float,
    top_p: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    batch, prompt_len = tokens.shape
    cache = KVCache.empty(config, batch=batch, slots=prompt_len + max_new)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    last = jnp.full((batch, 1), prompt_len - 1)
    logits, cache = fn(
        params, tokens, positions=positions, attention_mask=mask, cache=cache, logits_at=last
    )
    lengths = jnp.sum(mask, axis=1)  # each sequence's next position
    eos_ids = jnp.asarray(eos, jnp.int32)

    def pick(logits: jax.Array, key: jax.Array) -> jax.Array:
        return _sample(logits[:, -1], key, temperature=temperature, top_p=top_p)

    def cond(state: tuple) -> jax.Array:
        t, _, _, done, _, _ = state
        return (t < max_new) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        t, cache, logits, done, out, count = state
        token = pick(logits, jax.random.fold_in(key, t))
        token = jnp.where(done, pad_id, token).astype(jnp.int32)
        out = out.at[:, t].set(token)
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, eos_ids)
        step_positions = (lengths + t)[:, None]
        logits, cache = fn(
            params,
            token[:, None],
            positions=step_positions,
            attention_mask=jnp.ones((batch, 1), bool),
            cache=cache,
            logits_at=jnp.zeros((batch, 1), jnp.int32),
        )
        return t + 1, cache, logits, done, out, count

    state = (
        jnp.int32(0),
        cache,
        logits,
        jnp.zeros((batch,), bool),
        jnp.full((batch, max_new), pad_id, jnp.int32),
        jnp.zeros((batch,), jnp.int32),
    )
    _, _, _, done, out, count = jax.lax.while_loop(cond, body, state)
    return out, count, done


def _sample(logits: jax.Array, key: jax.Array, *, temperature: float, top_p: float) -> jax.Array:
    """The next token of each row: argmax, or a top-``p`` sample at ``temperature``."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if top_p < 1:
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        kept = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        scaled = (
            jnp.full_like(scaled, -jnp.inf)
            .at[jnp.arange(scaled.shape[0])[:, None], order]
            .set(kept)
        )
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
