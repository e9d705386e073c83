"""llama.cpp LoRA adapters: a delta of the reference Llama as an adapter GGUF file.

llama.cpp applies an adapter file to a base model loaded from GGUF
(``llama-cli -m base.gguf --lora adapter.gguf``, or ``Llama(model_path=...,
lora_path=...)`` in llama-cpp-python). The file holds, for each adapted
weight ``blk.N.<name>.weight`` of the base, two tensors
``blk.N.<name>.weight.lora_a`` (ggml shape ``[in, r]``, numpy ``(r, in)``)
and ``.lora_b`` (``[r, out]``, numpy ``(out, r)``), and the metadata
``general.type = "adapter"``, ``adapter.type = "lora"`` and
``adapter.lora.alpha``; llama.cpp scales each pair by ``alpha / r``. Like the
base weights, the query and key projections' output rows are in llama.cpp's
rotary order, so their ``lora_b`` rows are permuted the same way.

jaxlora's per-weight scales (``rank_pattern``, ``alpha_pattern``, rsLoRA) are
folded into ``lora_b`` so that one ``alpha`` serves every weight. Any additive
adapter (LoRA, rsLoRA, PiSSA, OLoRA, VeRA, AdaLoRA) is written through its
factors ``(a, b)``; DoRA rescales the weight and has no llama.cpp form.

References:
    llama.cpp's ``convert_lora_to_gguf.py``: https://github.com/ggml-org/llama.cpp
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from jaxlora._checks import delta_items
from jaxlora._hosts import is_primary, sync, to_host
from jaxlora._node import AdapterNode
from jaxlora.models import gguf as _gguf
from jaxlora.models.llama_config import LlamaConfig

__all__ = ["save_gguf_lora"]

# jaxlora's Llama module path (after layers_N/ or layers/) -> GGUF tensor name
_NAMES = {
    "self_attn/q_proj": "attn_q",
    "self_attn/k_proj": "attn_k",
    "self_attn/v_proj": "attn_v",
    "self_attn/o_proj": "attn_output",
    "mlp/gate_proj": "ffn_gate",
    "mlp/up_proj": "ffn_up",
    "mlp/down_proj": "ffn_down",
}
_LAYER = re.compile(r"^(?:params/)?layers(?:_(\d+))?/(.+)/kernel$")


def save_gguf_lora(
    path: str | os.PathLike,
    delta: Any,
    *,
    config: LlamaConfig,
    alpha: float | None = None,
    dtype: str = "F32",
) -> None:
    """Writes ``delta`` as a llama.cpp LoRA adapter GGUF for the base it was split from.

    Under ``jax.distributed`` every process calls it: the factors are gathered
    across processes and process 0 writes the file; all return once it is written.

    Args:
        path: the ``.gguf`` file to write.
        delta: a delta of :class:`jaxlora.models.llama.Llama` parameters (layers
            unrolled or ``nn.scan``-stacked), adapting the attention and MLP
            projections and/or ``lm_head``.
        config: the model's config (head counts for the rotary row order).
        alpha: the file's ``adapter.lora.alpha``; by default the largest rank, so
            that the folded factors stay near their own scale.
        dtype: ``"F32"`` or ``"F16"`` tensors.

    Raises:
        TypeError: for a delta that holds something other than adapters, or a
            DoRA node (not additive).
        ValueError: for an adapted weight llama.cpp has no tensor for (an
            embedding table), no adapter, or a bad ``alpha``/``dtype``.
        ImportError: without the ``gguf`` package.

    Example:
        >>> import os, tempfile, jax, jax.numpy as jnp, jaxlora, gguf
        >>> from jaxlora.models.llama import Llama, LlamaConfig
        >>> from jaxlora.models.gguf_lora import save_gguf_lora
        >>> config = LlamaConfig.tiny()
        >>> params = Llama(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
        >>> _, delta = jaxlora.split(params, jaxlora.LoraConfig(rank=4, targets="q_proj"),
        ...                          key=jax.random.key(1))
        >>> path = os.path.join(tempfile.mkdtemp(), "adapter.gguf")
        >>> save_gguf_lora(path, delta, config=config)
        >>> reader = gguf.GGUFReader(path)
        >>> sorted(t.name for t in reader.tensors)[:2]
        ['blk.0.attn_q.weight.lora_a', 'blk.0.attn_q.weight.lora_b']
        >>> str(reader.fields["adapter.type"].contents())
        'lora'
    """
    lib = _gguf.require_gguf()
    if dtype not in ("F32", "F16"):
        raise ValueError(f"dtype must be 'F32' or 'F16'; got {dtype!r}")
    pairs = list(_pairs(delta, config))
    if not pairs:
        raise ValueError("delta holds no adapter node; pass the delta of jaxlora.split")
    if alpha is None:
        alpha = float(max(a.shape[0] for _, a, _, _ in pairs))
    if not (isinstance(alpha, int | float) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite positive number; got {alpha!r}")
    np_dtype = np.float32 if dtype == "F32" else np.float16
    if not is_primary():  # under jax.distributed: every process gathered the factors, one writes
        sync(f"jaxlora.save_gguf_lora {os.path.abspath(path)}: written")
        return
    writer = lib.GGUFWriter(os.fspath(path), arch="llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for name, lora_a, lora_b, scale in pairs:
        rank = lora_a.shape[0]
        folded = lora_b * np.float32(scale * rank / alpha)  # llama.cpp applies alpha / rank
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(lora_a.astype(np_dtype)))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(folded.astype(np_dtype)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    sync(f"jaxlora.save_gguf_lora {os.path.abspath(path)}: written")


def _pairs(delta: Any, config: LlamaConfig) -> Any:
    """``(tensor name, lora_a (r, in), lora_b (out, r), scale)`` per adapted matrix."""
    for path, node in delta_items(delta, "save_gguf_lora"):
        if node is None:
            continue
        if type(node).output_scale is not AdapterNode.output_scale or node.n_adapters:
            raise TypeError(
                f"{path!r} holds a {type(node).__name__}, which llama.cpp's LoRA adapters cannot "
                "express (they add a * b to the weight); export a LoRA, VeRA or AdaLoRA delta, "
                "or merge this one into the base"
            )
        for index, name in _tensor_names(path, node, config):
            layer = node.layer(index)
            a, b = (to_host(f).astype(np.float32) for f in layer.factors())
            lora_a, lora_b = a.T, b.T  # (r, in), (out, r)
            short = name.split(".")[-2]
            if short in ("attn_q", "attn_k"):
                heads = config.n_heads if short == "attn_q" else config.n_kv_heads
                lora_b = lora_b[np.argsort(_gguf.rotary_rows(lora_b.shape[0], heads))]
            yield name, lora_a, lora_b, float(node.scale)


def _tensor_names(path: str, node: AdapterNode, config: LlamaConfig) -> list[tuple[tuple, str]]:
    if re.fullmatch(r"(params/)?lm_head/kernel", path):
        if config.tie_embeddings:
            raise ValueError(
                f"{path!r}: a model with tied embeddings has no output weight for an adapter"
            )
        return [((), "output.weight")]
    match = _LAYER.fullmatch(path)
    if match is None or match.group(2) not in _NAMES:
        raise ValueError(
            f"{path!r} has no llama.cpp tensor to adapt (llama.cpp's LoRA covers the attention "
            "and MLP projections and the output head, not embedding tables or norms); leave it "
            "out of the config's targets"
        )
    tensor = _NAMES[match.group(2)]
    if match.group(1) is not None:
        return [((), f"blk.{match.group(1)}.{tensor}.weight")]
    if len(node.layout.stacked) != 1:
        raise ValueError(f"{path!r} should have one stacked layer axis; got {node.layout.stacked}")
    return [((i,), f"blk.{i}.{tensor}.weight") for i in range(node.layout.stacked[0])]
