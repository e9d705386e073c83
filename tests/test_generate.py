"""KV-cache decoding of the reference Llama against full recomputation, with and without LoRA."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.models.generate import generate, left_pad
from jaxlora.models.llama import KVCache, Llama, LlamaConfig
from tests.helpers import randomize_b

CONFIG = LlamaConfig.tiny(max_len=48)
PROMPTS = [[5, 17, 3, 99, 42, 7], [8, 1], [250, 251, 252, 9]]


@functools.cache
def model_and_params(scan: bool = False):
    config = dataclasses.replace(CONFIG, scan_layers=scan)
    model = Llama(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return config, model, params


def plain_fn(model):
    return lambda p, tokens, **kw: model.apply({"params": p}, tokens, **kw)


def greedy_by_recomputation(model, params, prompt, n):
    """Greedy decoding that runs the whole sequence again at every step: no cache."""
    seq = list(prompt)
    for _ in range(n):
        logits = model.apply({"params": params}, jnp.asarray([seq]))
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt) :]


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_cached_logits_equal_full_recomputation(scan):
    config, model, params = model_and_params(scan)
    tokens = jnp.asarray([[5, 17, 3, 99, 42, 7, 11, 13]])
    full = model.apply({"params": params}, tokens)
    cache = KVCache.empty(config, batch=1, slots=8)
    logits, cache = model.apply({"params": params}, tokens[:, :5], cache=cache)  # prefill 5
    np.testing.assert_allclose(logits, full[:, :5], rtol=1e-5, atol=1e-5)
    for t in range(5, 8):  # then one token at a time
        logits, cache = model.apply({"params": params}, tokens[:, t : t + 1], cache=cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    assert int(cache.index) == 8 and bool(cache.mask.all())


@pytest.mark.slow
def test_left_padding_masks_and_positions_equal_the_unpadded_sequence():
    _, model, params = model_and_params()
    tokens, mask = left_pad([[1, 2, 3, 4, 5], [7, 8]])
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    padded = model.apply(
        {"params": params}, jnp.asarray(tokens), positions=positions, attention_mask=mask
    )
    alone = model.apply({"params": params}, jnp.asarray([[7, 8]]))
    np.testing.assert_allclose(padded[1, 3:], alone[0], rtol=1e-5, atol=1e-5)
    last = model.apply({"params": params}, jnp.asarray(tokens), positions=positions,
                       attention_mask=mask, logits_at=jnp.array([[4], [4]]))  # fmt: skip
    np.testing.assert_allclose(last[:, 0], padded[:, 4], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_greedy_generation_equals_recomputation_for_each_prompt_of_a_batch(scan):
    config, model, params = model_and_params(scan)
    out = generate(plain_fn(model), params, PROMPTS, config=config, max_new_tokens=7, eos_id=-1)
    assert out.tokens.shape == (3, 7) and (out.lengths == 7).all() and not out.finished.any()
    for row, prompt in enumerate(PROMPTS):
        assert out.tokens[row].tolist() == greedy_by_recomputation(model, params, prompt, 7)


def test_generation_stops_at_eos_and_pads():
    config, model, params = model_and_params()
    first = generate(plain_fn(model), params, PROMPTS, config=config, max_new_tokens=4, eos_id=-1)
    eos = int(first.tokens[0, 1])  # the second token of the first sequence
    out = generate(plain_fn(model), params, PROMPTS, config=config, max_new_tokens=4, eos_id=eos,
                   pad_id=255)  # fmt: skip
    row = out.tokens[0].tolist()
    stop = row.index(eos) + 1
    assert out.lengths[0] == stop and out.finished[0]
    assert row[:stop] == first.tokens[0, :stop].tolist() and all(t == 255 for t in row[stop:])
    assert out.sequences()[0] == row[:stop]


@pytest.mark.slow
def test_lora_generation_equals_the_merged_model_and_routes_adapters_per_sequence(key):
    config, model, params = model_and_params()
    lora_config = jaxlora.LoraConfig(rank=4, targets="all-linear")
    base, d0 = jaxlora.split(params, lora_config, key=key)
    d0 = randomize_b(d0, jax.random.fold_in(key, 1), scale=0.5)
    d1 = randomize_b(d0, jax.random.fold_in(key, 2), scale=0.5)
    lora = jaxlora.lora_apply(plain_fn(model), strict=True)
    unmerged = lambda p, tokens, **kw: lora(p[0], p[1], tokens, **kw)
    kwargs = dict(config=config, max_new_tokens=6, eos_id=-1)
    for d in (d0, d1):
        merged = generate(plain_fn(model), jaxlora.merge(base, d), PROMPTS, **kwargs)
        adapted = generate(unmerged, (base, d), PROMPTS, **kwargs)
        np.testing.assert_array_equal(adapted.tokens, merged.tokens)
    plain = generate(plain_fn(model), params, PROMPTS, **kwargs)
    assert not np.array_equal(
        generate(unmerged, (base, d0), PROMPTS, **kwargs).tokens, plain.tokens
    )  # fmt: skip  (the adapter changes the output)

    def routed(p, tokens, **kw):
        base, stacked, ids = p
        return lora(base, stacked, tokens, adapter_ids=ids, **kw)

    ids = jnp.array([1, -1, 0])
    mixed = generate(routed, (base, jaxlora.stack([d0, d1]), ids), PROMPTS, **kwargs)
    alone = [generate(unmerged, (base, d1), PROMPTS, **kwargs).tokens[0], plain.tokens[1],
             generate(unmerged, (base, d0), PROMPTS, **kwargs).tokens[2]]  # fmt: skip
    np.testing.assert_array_equal(mixed.tokens, np.stack(alone))


@pytest.mark.slow
def test_sampling_is_reproducible_and_nucleus_of_one_token_is_greedy():
    config, model, params = model_and_params()
    fn, kw = plain_fn(model), dict(config=config, max_new_tokens=6, eos_id=-1)
    greedy = generate(fn, params, PROMPTS, **kw)
    tiny_nucleus = generate(fn, params, PROMPTS, temperature=1.0, top_p=1e-6,
                            key=jax.random.key(3), **kw)  # fmt: skip
    np.testing.assert_array_equal(tiny_nucleus.tokens, greedy.tokens)
    a = generate(fn, params, PROMPTS, temperature=2.0, key=jax.random.key(4), **kw)
    b = generate(fn, params, PROMPTS, temperature=2.0, key=jax.random.key(4), **kw)
    c = generate(fn, params, PROMPTS, temperature=2.0, key=jax.random.key(5), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert ((a.tokens >= 0) & (a.tokens < config.vocab_size)).all()


def test_sampled_frequencies_follow_the_temperature_softmax():
    """One prompt, many sampled first tokens: their frequencies are softmax(logits / T)."""
    config, model, params = model_and_params()
    prompt = [5, 17, 3]
    logits = model.apply({"params": params}, jnp.asarray([prompt]))[0, -1]
    temperature = 0.05  # peaked enough that a few hundred samples pin the top tokens down
    probs = np.asarray(jax.nn.softmax(logits / temperature))
    out = generate(plain_fn(model), params, [prompt] * 400, config=config, max_new_tokens=1,
                   eos_id=-1, temperature=temperature, key=jax.random.key(6))  # fmt: skip
    counts = np.bincount(out.tokens[:, 0], minlength=config.vocab_size) / 400
    top = np.argsort(-probs)[:3]
    np.testing.assert_allclose(counts[top], probs[top], atol=0.08)


def test_generate_errors():
    config, model, params = model_and_params()
    fn = plain_fn(model)
    with pytest.raises(ValueError, match="at least one token"):
        generate(fn, params, [[1], []], config=config, max_new_tokens=2, eos_id=0)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generate(fn, params, PROMPTS, config=config, max_new_tokens=0, eos_id=0)
    with pytest.raises(ValueError, match=r"more than config.max_len=48"):
        generate(fn, params, PROMPTS, config=config, max_new_tokens=45, eos_id=0)
    with pytest.raises(ValueError, match="needs key="):
        generate(fn, params, PROMPTS, config=config, max_new_tokens=2, eos_id=0, temperature=1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate(fn, params, PROMPTS, config=config, max_new_tokens=2, eos_id=0, top_p=0)
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        generate(fn, params, PROMPTS, config=config, max_new_tokens=2, eos_id=0,
                 temperature=1.0, key=1)  # fmt: skip
