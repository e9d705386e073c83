"""The reference Llama decoder rebuilt for the peers of ``benchmarks/peers.py``.

* :class:`NnxLlama`: the same computation as :class:`jaxlora.models.llama.Llama`
  (unscanned, no remat) written with Flax NNX modules, so that ``nnx.LoRA`` can
  wrap its ``nnx.Linear`` projections. Attribute paths follow the linen tree
  (``layers[i].self_attn.q_proj.kernel``), and :func:`nnx_from_linen` loads a
  linen parameter tree into it.
* :func:`hf_from_linen`: a Hugging Face ``LlamaForCausalLM`` of the same shapes
  holding the same weights (kernels transposed to torch's ``(out, in)``).

Both reuse the rotary helpers of ``jaxlora.models.llama`` and are checked
against the linen model's loss by ``peers.py`` before anything is timed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models.llama import LlamaConfig, apply_rotary, causal_attention, rotary_cos_sin

_INIT = nnx.initializers.normal(stddev=0.02)


def _linear(d_in: int, d_out: int, cfg: LlamaConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=False,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=_INIT,
        rngs=rngs,
    )


def _norm(cfg: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(
        cfg.d_model, epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
    )


class NnxAttention(nnx.Module):
    """Causal self-attention with rotary embeddings (grouped-query if ``n_kv_heads < n_heads``)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        kv = cfg.n_kv_heads * cfg.head_dim
        self.q_proj = _linear(cfg.d_model, cfg.n_heads * cfg.head_dim, cfg, rngs)
        self.k_proj = _linear(cfg.d_model, kv, cfg, rngs)
        self.v_proj = _linear(cfg.d_model, kv, cfg, rngs)
        self.o_proj = _linear(cfg.n_heads * cfg.head_dim, cfg.d_model, cfg, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        cfg = self.cfg
        batch, seq, _ = x.shape
        hd, kv = cfg.head_dim, cfg.n_kv_heads
        q = self.q_proj(x).reshape(batch, seq, cfg.n_heads, hd)
        k = self.k_proj(x).reshape(batch, seq, kv, hd)
        v = self.v_proj(x).reshape(batch, seq, kv, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(causal_attention(q, k, v, dtype=cfg.dtype))


class NnxMLP(nnx.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs) -> None:
        self.gate_proj = _linear(cfg.d_model, cfg.d_ff, cfg, rngs)
        self.up_proj = _linear(cfg.d_model, cfg.d_ff, cfg, rngs)
        self.down_proj = _linear(cfg.d_ff, cfg.d_model, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class NnxDecoderLayer(nnx.Module):
    """Pre-norm decoder layer: attention then MLP, each with a residual."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs) -> None:
        self.input_layernorm = _norm(cfg, rngs)
        self.self_attn = NnxAttention(cfg, rngs=rngs)
        self.post_attention_layernorm = _norm(cfg, rngs)
        self.mlp = NnxMLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class NnxLlama(nnx.Module):
    """The Llama-style causal LM of ``jaxlora.models.llama`` in Flax NNX (untied head only).

    Example:
      >>> cfg = LlamaConfig.tiny()
      >>> model = NnxLlama(cfg, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((1, 4), jnp.int32)).shape
      (1, 4, 256)
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs) -> None:
        if cfg.tie_embeddings or cfg.scan_layers or cfg.remat:
            raise ValueError("NnxLlama supports untied, unscanned layers without remat only.")
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=_INIT,
            rngs=rngs,
        )
        self.layers = nnx.List([NnxDecoderLayer(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = _norm(cfg, rngs)
        self.lm_head = _linear(cfg.d_model, cfg.vocab_size, cfg, rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = self.embed_tokens(tokens)
        cos, sin = rotary_cos_sin(jnp.arange(tokens.shape[1]), cfg.head_dim, theta=cfg.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x)).astype(jnp.float32)


def nnx_from_linen(cfg: LlamaConfig, params: dict[str, Any]) -> NnxLlama:
    """An :class:`NnxLlama` holding the linen ``Llama`` parameters ``params``."""
    model = nnx.eval_shape(lambda: NnxLlama(cfg, rngs=nnx.Rngs(0)))
    pure = {k: v for k, v in params.items() if not k.startswith("layers_")}
    pure["layers"] = {i: params[f"layers_{i}"] for i in range(cfg.n_layers)}
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def hf_llama(cfg: LlamaConfig) -> Any:
    """A randomly initialized ``transformers.LlamaForCausalLM`` (float32) of ``cfg``'s shapes."""
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(hf_cfg)


def hf_from_linen(cfg: LlamaConfig, params: dict[str, Any]) -> Any:
    """:func:`hf_llama` holding the linen ``Llama`` parameters ``params``."""
    import torch

    model = hf_llama(cfg)
    t = lambda x: torch.from_numpy(np.array(x, np.float32))
    sd = {
        "model.embed_tokens.weight": t(params["embed_tokens"]["embedding"]),
        "model.norm.weight": t(params["norm"]["scale"]),
        "lm_head.weight": t(params["lm_head"]["kernel"]).T.contiguous(),
    }
    for i in range(cfg.n_layers):
        layer, pre = params[f"layers_{i}"], f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = t(layer["input_layernorm"]["scale"])
        sd[pre + "post_attention_layernorm.weight"] = t(layer["post_attention_layernorm"]["scale"])
        for group, names in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
            for n in names:
                name = f"{n}_proj"
                sd[f"{pre}{group}.{name}.weight"] = t(layer[group][name]["kernel"]).T.contiguous()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise ValueError(f"HF weight copy: missing {missing}, unexpected {unexpected}")
    return model
