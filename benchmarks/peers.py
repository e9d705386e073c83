"""jaxlora vs its peers: one model, one run, one table of ratios.

Model: the Llama-style decoder (d_model 512, 4 layers, 8 heads, d_ff 1408,
vocab 4096, untied head, float32), batch 8 x 128, LoRA r = 8 (alpha 16) on the
q/k/v/o projections, Adam (lr 1e-4), on this machine's CPU. Every method starts
from the same weights and the same adapters: ``a`` from jaxlora's "kaiming"
init (PEFT's kaiming-uniform scheme), ``b`` a small random matrix rather than
zeros so that the loss check exercises the adapter path. The run fails unless
every method's first loss matches jaxlora's (QLoRA rows within 2%: the two
NF4 layouts round differently) and every trainable count is the analytical
``layers * sum over q,k,v,o of r * (in + out)`` = 131,072.

Methods (what each peer's API looks like):
* jaxlora: ``base, delta = split(params, LoraConfig(rank=8, alpha=16,
  targets=<q/k/v/o kernels>, init="kaiming"), key=...)``, then the Adam step of
  ``jaxlora.memory.lora_step`` (``lora_apply``, use-site strategy) over the
  linen ``jaxlora.models.llama.Llama``.
* jaxlora (NNX model): the same on ``nnx.split(NnxLlama)``'s state
  (``benchmarks/_peer_models.py``), like for like with nnx.LoRA.
* nnx.LoRA: each ``nnx.Linear`` projection replaced by
  ``nnx.LoRA(in, r, out, base_module=linear, rngs=...)``; trained in the
  functional NNX form, ``nnx.split(model, nnx.LoRAParam, ...)`` and
  ``nnx.merge`` inside a ``jax.jit`` step (``nnx.jit`` + ``nnx.Optimizer`` would
  add Python work per step). ``nnx.LoRA`` has no alpha/r scale, so its ``b`` is
  loaded multiplied by alpha/r: the same function.
* Qwix: ``qwix.apply_lora_to_model(Llama(cfg), qwix.LoraProvider(
  module_path=".*self_attn/(q|k|v|o)_proj", rank=8, alpha=16))`` on the same
  linen model; ``init`` adds ``kernel_lora_a/b`` beside each kernel and Qwix
  intercepts those modules' ``dot_general`` to add ``x @ a @ b * alpha/r``.
* Qwix QLoRA: the same provider with ``weight_qtype="nf4", tile_size=64``;
  ``qwix.quantize_params(params, abstract_params)`` turns the float kernels
  into NF4 ``QArray`` s (a float32 scale per 64 inputs of each output, no
  double quantization).
* jaxlora QLoRA: ``jaxlora.quantize(base, format="nf4", block_size=64)`` on the
  same four kernels (double quantization on, the default).
* PEFT: ``peft.get_peft_model(transformers.LlamaForCausalLM(LlamaConfig(...)),
  peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj",
  "v_proj", "o_proj"]))`` on torch CPU (SDPA attention), ``torch.optim.Adam``,
  ``torch.set_num_threads(os.cpu_count())``.

Measures:
* step time: one Adam step, state threaded from step to step (the JAX steps
  donate it), after a warm-up step; all methods timed in interleaved rounds
  (``benchmarks.speed.interleaved``) in a new random order each round,
  median per method; ``time/ref`` is the median over rounds of this row's
  time / the reference's in the same round, ``[q1, q3]`` its quartiles.
* memory, JAX rows: XLA's compiled plan of the jitted step with trainable and
  optimizer state donated, ``jaxlora.memory.memory_of`` (argument + output -
  alias + temp: frozen weights, adapters, Adam state, batch, activations and
  temporaries), with the memory-minimizing CPU scheduler.
* memory, PEFT: a fresh subprocess's peak resident set (``VmHWM``, reset with
  ``/proc/self/clear_refs`` after one warm-up step, which also creates Adam's
  state) minus its resident set before the model exists (after imports and a
  tiny model's step, so code pages do not count), ``MALLOC_MMAP_THRESHOLD_=
  65536`` so that freed tensors leave the process. It holds the same things as
  XLA's plan plus allocator slack, but it is a measured high-water mark, not a
  buffer plan: not comparable one to one. The ``jaxlora (RSS)`` row measures
  jaxlora's step the same way (compiled before the baseline), for a like-for-
  like pair (``--no-rss`` skips it).
* floor: XLA's plan of the frozen JAX model's step that differentiates only
  its input embeddings (``jaxlora.memory.floor_step``): what any adapter method
  needs at least with this model and loss.
* GFLOP: XLA's cost analysis of the lowered JAX step.

Results (default runs on 2 shared, loaded cores; quartiles of the per-round
ratios are often +-5-10%, so single-run differences under ~5% are noise) and
every ratio that does not favour jaxlora:
* LoRA rows (jaxlora, jaxlora on the NNX model, nnx.LoRA, Qwix): the same
  63.9 GFLOP and the same 172 dots (shapes and dimension numbers) in XLA's
  optimized programs. Step time: a 24-round shuffled A/B on quieter cores gave
  nnx.LoRA / jaxlora 1.005 [q1 0.995, q3 1.013], Qwix / jaxlora 1.030 [1.023,
  1.044]; Qwix multiplies alpha/r into the (tokens x out) low-rank output,
  forward and backward (28 more copies and 9 more transposes than jaxlora).
  jaxlora did the same until commit 88c24fb ("scale the small second
  factor"); nnx.LoRA (no scale at all) then measured ~0.96x.
* Memory, LoRA rows: jaxlora's plan is 225,248 B (0.08%) above nnx.LoRA's and
  Qwix's (295.4 vs 295.2 MiB, mem/ref 0.999): the engine now forms
  ``s * b`` (8 x 512) per adapter and XLA keeps those 16 products for the
  backward pass. An nnx.LoRA written as ``(x@a) @ (s*b)`` reproduces
  jaxlora's temp bytes exactly (239,964,128); written as ``(s*(x@a)) @ b``
  (the scale on the rank-r activation, whose unscaled value the backward
  keeps anyway) it needs the unscaled 239,738,880. A choice for the engine's
  dot rule (``jaxlora/_engine/_rules.py``), not for this benchmark.
* QLoRA rows: Qwix QLoRA's plan is ~1.045x jaxlora QLoRA's (294.4 vs 281.6
  MiB). Its arguments are only 0.2 MB larger (float32 scale per 64-input tile
  vs double quantization); its temporaries are 13.2 MB larger, about the
  sixteen dequantized 1 MiB kernels kept from the forward for the backward
  (its QLoRA plan is barely below its float LoRA plan, 294.4 vs 295.2 MiB),
  where jaxlora dequantizes again at the backward's use. Step time within
  noise.
* PEFT: 1.8-6x jaxlora's step time (eager torch ops vs one fused XLA
  program; the ratio swings with the machine's load). Memory: PEFT's 249 MiB
  is 0.84x jaxlora's plan and 0.80-0.82x jaxlora's RSS measured the same way
  (302-310 MiB): here jaxlora is ~1.2x larger, and not because of LoRA. The
  floor row (the same JAX model with no adapters, 265 MiB) is already above
  PEFT's whole step; LoRA's own share (jaxlora minus floor, 30 MiB, 1.11x the
  floor) is the same for every JAX method. The JAX model and loss keep more:
  (1) ``causal_lm_loss`` slices ``logits[:, :-1]``, a 16 MiB f32[8,127,4096]
  copy live beside its log-softmax (HF shifts the labels instead; a masked
  logsumexp loss takes jaxlora's plan from 295 to 279 MiB); (2) the reference
  attention keeps its f32 (8, 8, 128, 128) probabilities per layer (16 MiB)
  for the backward, which torch's fused SDPA kernel does not (PEFT with eager
  attention measures 265 MiB); (3) the rest, ~14 MiB, is MLP intermediates
  XLA keeps and the slack between a plan and a resident set.

Peers that are not installed are skipped, with a note: Qwix (the ``bench``
extra) and PEFT (torch, transformers and peft: the ``interop`` extra).

``--quick``: ``LlamaConfig.tiny`` shapes (d_model 64, 4 heads, 2 KV heads) with
1 layer, batch 2 x 32, 2 rounds; every row, the RSS ones included.

Run: ``python -m benchmarks.peers [--rounds 5] [--no-rss] [--no-torch] [--no-qlora] [--quick]``
(~5 minutes on 2 loaded cores with the defaults).
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as ``python benchmarks/peers.py``: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jaxlora.memory

jaxlora.memory.use_memory_minimizing_cpu_scheduler()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx, traverse_util  # noqa: E402

import jaxlora  # noqa: E402
from benchmarks._common import (  # noqa: E402
    abstract_llama,
    installed,
    interleaved,
    lm_loss,
    parse_args,
)
from benchmarks._peer_models import hf_from_linen, hf_llama, nnx_from_linen  # noqa: E402
from jaxlora.apps.progress import progress  # noqa: E402
from jaxlora.models.llama import Llama, LlamaConfig, causal_lm_loss  # noqa: E402

MIB = 2**20
RANK, ALPHA, LR = 8, 16.0, 1e-4
SCALE = ALPHA / RANK
PROJ = ("q", "k", "v", "o")
TARGETS = r"self_attn/(q|k|v|o)_proj/kernel$"
QWIX_MODULES = r".*self_attn/(q|k|v|o)_proj"
HF_TARGETS = [f"{p}_proj" for p in PROJ]


def model_config(seq: int, *, quick: bool = False) -> LlamaConfig:
    if quick:
        return LlamaConfig.tiny(n_layers=1, max_len=seq)
    return LlamaConfig(vocab_size=4096, d_model=512, n_layers=4, n_heads=8, d_ff=1408, max_len=seq)


def analytic_trainable(cfg: LlamaConfig) -> int:
    d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
    shapes = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d)}
    return cfg.n_layers * sum(RANK * (i + o) for i, o in shapes.values())


def _site(path: str) -> tuple[int, str]:
    """(layer, projection) of an adapted weight, from any of the peers' path spellings."""
    m = re.search(r"layers[_/.](\d+)[/.]self_attn[/.]([qkvo])_proj", path)
    if m is None:
        raise KeyError(path)
    return int(m.group(1)), m.group(2)


def _is_node(x: Any) -> bool:
    return isinstance(x, jaxlora.LoraNode)


def fill_delta(delta: Any, adapters: dict) -> Any:
    """``delta`` with every adapter's ``a`` and ``b`` replaced by the shared ones."""

    def fill(path, node):
        if not _is_node(node):
            return node
        a, b = adapters[_site(jax.tree_util.keystr(path, simple=True, separator="/"))]
        # Fresh buffers throughout: the steps donate them.
        return dataclasses.replace(node, a=jnp.array(a), b=jnp.array(b))

    return jax.tree_util.tree_map_with_path(fill, delta, is_leaf=_is_node)


def shared_adapters(cfg: LlamaConfig, params: Any) -> dict:
    """One set of adapters for every method: jaxlora's kaiming ``a``, a small random ``b``.

    Keyed by ``(layer, projection)``, as :func:`fill_delta` reads them.
    """
    lcfg = jaxlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS, init="kaiming")
    _, delta = jaxlora.split(params, lcfg, key=jax.random.key(2))
    adapters = {}
    nodes = jax.tree_util.tree_flatten_with_path(delta, is_leaf=_is_node)[0]
    for n, (path, node) in enumerate(nodes):
        b = 0.01 * jax.random.normal(jax.random.key(100 + n), node.b.shape, node.b.dtype)
        adapters[_site(jax.tree_util.keystr(path, simple=True, separator="/"))] = (
            np.asarray(node.a),
            np.asarray(b),
        )
    assert len(adapters) == cfg.n_layers * len(PROJ)
    return adapters


def _size(tree: Any) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def _adam_step(loss: Callable[[Any, Any, Any], jax.Array], tx: optax.GradientTransformation):
    """``step(train, opt_state, frozen, tokens)`` for a loss of ``(train, frozen, tokens)``."""

    def step(train, opt_state, frozen, tokens):
        value, grads = jax.value_and_grad(loss)(train, frozen, tokens)
        updates, opt_state = tx.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, value

    return step


@dataclasses.dataclass
class JaxMethod:
    """A JAX train step and its state, run as a training loop (state donated and threaded)."""

    name: str
    step: Callable[..., Any]
    train: Any
    opt_state: Any
    frozen: Any
    trainable: int
    note: str
    memory: Any = None
    flops: float = float("nan")
    losses: list = dataclasses.field(default_factory=list)
    seconds: list = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.jitted = jax.jit(self.step, donate_argnums=(0, 1))

    def plan(self, tokens: Any) -> None:
        args = [
            jaxlora.memory.abstract(x) for x in (self.train, self.opt_state, self.frozen, tokens)
        ]
        self.memory = jaxlora.memory.memory_of(self.step, *args, donate_argnums=(0, 1))
        cost = jax.jit(self.step).lower(*args).cost_analysis()
        self.flops = float(cost["flops"]) if cost else float("nan")

    def runner(self, tokens: Any) -> Callable[[], Any]:
        def run():
            start = time.perf_counter()
            self.train, self.opt_state, loss = self.jitted(
                self.train, self.opt_state, self.frozen, tokens
            )
            loss.block_until_ready()
            self.seconds.append(time.perf_counter() - start)
            self.losses.append(loss)
            return loss

        return run


def build_jax_methods(
    cfg, params, tokens, adapters, key, *, qlora: bool, qwix: bool
) -> list[JaxMethod]:
    model = Llama(cfg)
    adam = optax.adam(LR)
    lcfg = jaxlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS, init="kaiming")
    methods = []

    # jaxlora on the linen model.
    base, delta = jaxlora.split(params, lcfg, key=key)
    delta = fill_delta(delta, adapters)
    tx = jaxlora.memory.lora_optimizer(adam, delta)
    step = jaxlora.memory.lora_step(lm_loss(model), tx)
    jl_step = lambda train, opt, frozen, t: step(train, opt, frozen, t)
    count = jaxlora.count_parameters(base, delta).trainable
    methods.append(
        JaxMethod(
            "jaxlora",
            jl_step,
            delta,
            tx.init(delta),
            base,
            count,
            "lora_apply use-site, linen Llama; XLA plan",
        )
    )
    if qlora:
        qbase = jaxlora.quantize(base, format="nf4", block_size=64, targets=TARGETS)
        qdelta = fill_delta(delta, adapters)
        methods.append(
            JaxMethod(
                "jaxlora QLoRA",
                jl_step,
                qdelta,
                tx.init(qdelta),
                qbase,
                count,
                "NF4 q/k/v/o, block 64, double quant; XLA plan",
            )
        )

    # jaxlora on the NNX model (like for like with nnx.LoRA).
    graphdef, state = nnx.split(nnx_from_linen(cfg, params))
    nbase, ndelta = jaxlora.split(state, lcfg, key=key)
    ndelta = fill_delta(ndelta, adapters)
    nnx_loss = lambda s, t: causal_lm_loss(nnx.merge(graphdef, s)(t), t)
    ntx = jaxlora.memory.lora_optimizer(adam, ndelta)
    nstep = jaxlora.memory.lora_step(nnx_loss, ntx)
    methods.append(
        JaxMethod(
            "jaxlora (NNX model)",
            nstep,
            ndelta,
            ntx.init(ndelta),
            nbase,
            jaxlora.count_parameters(nbase, ndelta).trainable,
            "lora_apply use-site on nnx.split state; XLA plan",
        )
    )

    # nnx.LoRA wrapping the NNX model's projections.
    lora_model = nnx_from_linen(cfg, params)
    for i, layer in enumerate(lora_model.layers):
        for p in PROJ:
            linear = getattr(layer.self_attn, f"{p}_proj")
            wrapped = nnx.LoRA(
                linear.in_features, RANK, linear.out_features, base_module=linear, rngs=nnx.Rngs(i)
            )
            a, b = adapters[(i, p)]
            wrapped.lora_a.value = jnp.asarray(a)
            wrapped.lora_b.value = jnp.asarray(SCALE * b)  # nnx.LoRA has no alpha/r scale
            setattr(layer.self_attn, f"{p}_proj", wrapped)
    lgraph, lora_state, rest = nnx.split(lora_model, nnx.LoRAParam, ...)
    lloss = lambda tr, fr, t: causal_lm_loss(nnx.merge(lgraph, tr, fr)(t), t)
    methods.append(
        JaxMethod(
            "nnx.LoRA",
            _adam_step(lloss, adam),
            lora_state,
            adam.init(lora_state),
            rest,
            _size(lora_state),
            "nnx.LoRA(base_module=Linear), split/merge + jit; XLA plan",
        )
    )

    if qwix:
        methods += qwix_methods(model, params, tokens, adapters, key, qlora=qlora)
    order = ["jaxlora", "jaxlora (NNX model)", "nnx.LoRA", "Qwix", "jaxlora QLoRA", "Qwix QLoRA"]
    return sorted(methods, key=lambda m: order.index(m.name))


def qwix_methods(model, params, tokens, adapters, key, *, qlora: bool) -> list[JaxMethod]:
    """Qwix on the linen model, LoRA and (with ``qlora``) QLoRA."""
    import qwix

    adam = optax.adam(LR)
    methods = []
    flat = traverse_util.flatten_dict(params, sep="/")
    for name, kw, note in (
        ("Qwix", {}, "LoraProvider on linen Llama; XLA plan"),
        (
            "Qwix QLoRA",
            dict(weight_qtype="nf4", tile_size=64),
            "LoraProvider nf4, tile 64; XLA plan",
        ),
    ):
        if kw and not qlora:
            continue
        provider = qwix.LoraProvider(module_path=QWIX_MODULES, rank=RANK, alpha=ALPHA, **kw)
        qmodel = qwix.apply_lora_to_model(model, provider)
        abstract = jax.eval_shape(qmodel.init, key, tokens[:, :8])["params"]
        train, frozen = {}, dict(flat)
        for path in traverse_util.flatten_dict(abstract, sep="/"):
            if path.endswith(("_lora_a", "_lora_b")):
                a, b = adapters[_site(path)]
                train[path] = jnp.asarray(a if path.endswith("_lora_a") else b)
        train = traverse_util.unflatten_dict(train, sep="/")
        frozen = traverse_util.unflatten_dict(frozen, sep="/")
        if kw:
            frozen = qwix.quantize_params(frozen, abstract)

        def qloss(tr, fr, t, qmodel=qmodel):
            merged = traverse_util.unflatten_dict(
                {**traverse_util.flatten_dict(fr), **traverse_util.flatten_dict(tr)}
            )
            return causal_lm_loss(qmodel.apply({"params": merged}, t), t)

        methods.append(
            JaxMethod(
                name, _adam_step(qloss, adam), train, adam.init(train), frozen, _size(train), note
            )
        )
    return methods


class PeftMethod:
    """Hugging Face PEFT on torch CPU, same weights and adapters."""

    name = "PEFT (torch)"
    note = "peak RSS delta of a subprocess, not an XLA plan"

    def __init__(self, cfg, params, tokens, adapters) -> None:
        import peft
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        model = hf_from_linen(cfg, params)
        self.model = peft.get_peft_model(model, _peft_config())
        with torch.no_grad():
            for i, layer in enumerate(self.model.base_model.model.model.layers):
                for p in PROJ:
                    module = getattr(layer.self_attn, f"{p}_proj")
                    a, b = adapters[(i, p)]
                    module.lora_A["default"].weight.copy_(torch.from_numpy(np.array(a).T))
                    module.lora_B["default"].weight.copy_(torch.from_numpy(np.array(b).T))
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in trainable)
        self.opt = torch.optim.Adam(trainable, lr=LR)
        self.ids = torch.from_numpy(np.array(tokens)).long()
        self.losses: list = []
        self.seconds: list = []
        self.memory: float | None = None
        self.flops = float("nan")

    def runner(self, tokens: Any) -> Callable[[], None]:
        def run():
            start = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
            loss.backward()
            self.opt.step()
            self.seconds.append(time.perf_counter() - start)
            self.losses.append(loss.detach())
            return None

        return run


def _peft_config():
    import peft

    return peft.LoraConfig(
        r=RANK, lora_alpha=int(ALPHA), target_modules=HF_TARGETS, lora_dropout=0.0
    )


# --- resident-set measurement in a fresh subprocess ----------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peft_rss_setup(cfg: LlamaConfig, batch: int) -> Callable[[], Callable[[], None]]:
    import peft
    import torch

    torch.set_num_threads(os.cpu_count() or 1)

    def allocate():
        model = peft.get_peft_model(hf_llama(cfg), _peft_config())
        model.train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
        ids = torch.randint(0, cfg.vocab_size, (batch, cfg.max_len))

        def step():
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()

        return step

    return allocate


def _jaxlora_rss_setup(cfg: LlamaConfig, batch: int) -> Callable[[], Callable[[], None]]:
    """Compiles jaxlora's step ahead of time from abstract inputs; allocates nothing yet."""
    model, tokens, params = abstract_llama(cfg, batch=batch, seq=cfg.max_len)
    lcfg = jaxlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS, init="kaiming")
    base, delta = jax.eval_shape(lambda p: jaxlora.split(p, lcfg, key=jax.random.key(0)), params)
    loss = lm_loss(model)
    tx = jaxlora.memory.lora_optimizer(optax.adam(LR), delta)
    opt_state = jax.eval_shape(tx.init, delta)
    compiled = (
        jax.jit(jaxlora.memory.lora_step(loss, tx), donate_argnums=(0, 1))
        .lower(delta, opt_state, base, tokens)
        .compile()
    )

    def allocate():
        fill = lambda s: jax.device_put(
            np.full(s.shape, 0.01 if s.dtype.kind == "f" else 1, s.dtype)
        )
        state = {"delta": jax.tree.map(fill, delta), "opt": jax.tree.map(fill, opt_state)}
        frozen, ids = jax.tree.map(fill, base), jax.tree.map(fill, tokens)

        def step():
            state["delta"], state["opt"], value = compiled(
                state["delta"], state["opt"], frozen, ids
            )
            value.block_until_ready()

        return step

    return allocate


def _rss_child(kind: str, batch: int, seq: int, steps: int, *, quick: bool) -> dict:
    """Peak RSS of ``steps`` train steps minus RSS before any of the model's data exists.

    A tiny model runs first (so the code each step runs is paged in), and a
    JAX step is compiled before the baseline is read (so the compiler's
    leftovers do not count); then weights, adapters and batch are allocated,
    one warm-up step creates the optimizer state (torch) and the peak is reset.
    """
    cfg = model_config(seq, quick=quick)
    setup = _peft_rss_setup if kind == "peft" else _jaxlora_rss_setup
    tiny = dataclasses.replace(
        cfg, vocab_size=64, d_model=64, n_heads=2, n_kv_heads=2, d_ff=64, n_layers=1
    )
    step = setup(tiny, batch)()
    step()
    del step
    allocate = setup(cfg, batch)
    gc.collect()
    baseline = _status_kib("VmRSS")
    step = allocate()
    step()
    gc.collect()
    _reset_peak_rss()
    for _ in range(steps):
        step()
    return {"baseline_kib": baseline, "peak_kib": _status_kib("VmHWM")}


def measure_rss(kind: str, batch: int, seq: int, *, quick: bool) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.peers",
        "--rss-child",
        kind,
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        *(["--quick"] if quick else []),
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_delta_bytes"] = (result["peak_kib"] - result["baseline_kib"]) * 1024
    return result


# --- main ----------------------------------------------------------------------------


def floor_memory(cfg: LlamaConfig, params: Any, tokens: Any) -> jaxlora.memory.MemoryReport:
    """XLA's plan of the frozen model's step that differentiates only its input embeddings."""
    model = Llama(cfg)
    embed_loss = lambda p, e, t: causal_lm_loss(model.apply({"params": p}, inputs_embeds=e), t)
    embeds = jax.ShapeDtypeStruct((*tokens.shape, cfg.d_model), cfg.dtype)
    return jaxlora.memory.memory_of(
        jaxlora.memory.floor_step(embed_loss),
        jaxlora.memory.abstract(params),
        embeds,
        jaxlora.memory.abstract(tokens),
    )


def shuffled_slots(runners: list[Callable[[], Any]], seed: int = 0) -> dict[str, Callable[[], Any]]:
    """Slots for ``interleaved`` that run ``runners`` in a new random order each round.

    Every method runs once per round (the warm-up round in the given order),
    so rounds stay paired, and no method always runs in the same place or
    right after the same neighbour (the torch step, say). Each runner records
    its own time.
    """
    n = len(runners)
    rng = np.random.default_rng(seed)
    orders: list[np.ndarray] = [np.arange(n)]
    calls = [0]

    def slot(k: int) -> Any:
        r = calls[0] // n
        while len(orders) <= r:
            orders.append(rng.permutation(n))
        calls[0] += 1
        return runners[orders[r][k]]()

    return {f"slot {k}": functools.partial(slot, k) for k in range(n)}


def _paired(seconds: list, reference: list) -> tuple[float, float, float]:
    """Median and quartiles over rounds of this method's time / the reference's, same round."""
    ratios = np.asarray(seconds[1:]) / np.asarray(reference[1:])  # [0] is the warm-up call
    q1, med, q3 = np.percentile(ratios, [25, 50, 75])
    return float(med), float(q1), float(q3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--no-torch", action="store_true", help="skip PEFT")
    parser.add_argument("--no-qlora", action="store_true", help="skip the QLoRA rows")
    parser.add_argument(
        "--no-rss",
        action="store_true",
        help="skip measuring jaxlora's peak RSS the way PEFT's is measured",
    )
    parser.add_argument("--rss-child", choices=["peft", "jaxlora"], help=argparse.SUPPRESS)
    args = parse_args(parser, rounds=2, batch=2, seq=32)
    if args.rss_child:
        result = _rss_child(args.rss_child, args.batch, args.seq, steps=3, quick=args.quick)
        print(json.dumps(result))
        return

    skipped = []
    has_qwix = installed("qwix")
    if not has_qwix:
        skipped.append("the Qwix rows: qwix is not installed (pip install -e '.[bench]')")
    has_torch = installed("torch", "transformers", "peft")
    if not args.no_torch and not has_torch:
        skipped.append(
            "the PEFT row: torch, transformers or peft is not installed "
            "(pip install -e '.[interop]')"
        )

    t0 = time.perf_counter()
    cfg = model_config(args.seq, quick=args.quick)
    key = jax.random.key(0)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
    params = jax.jit(Llama(cfg).init)(key, tokens[:, :8])["params"]

    adapters = shared_adapters(cfg, params)

    methods: list[Any] = build_jax_methods(
        cfg, params, tokens, adapters, key, qlora=not args.no_qlora, qwix=has_qwix
    )
    with progress(len(methods) + 1, "memory plans") as bar:
        for m in methods:
            m.plan(tokens)
            bar.update()
        floor = floor_memory(cfg, params, tokens)
        bar.update()
    peft_method = None
    if not args.no_torch and has_torch:
        peft_method = PeftMethod(cfg, params, tokens, adapters)
        methods.append(peft_method)
    t_setup = time.perf_counter() - t0

    interleaved(
        shuffled_slots([m.runner(tokens) for m in methods]), args.rounds, desc="train steps"
    )
    times = {m.name: statistics.median(m.seconds[1:]) for m in methods}
    t_timed = time.perf_counter() - t0 - t_setup

    kinds = {"PEFT": "peft"} if peft_method is not None else {}
    if not args.no_rss:
        kinds["jaxlora"] = "jaxlora"
    rss = {}
    with progress(len(kinds), "peak RSS (subprocesses)") as bar:
        for name, kind in kinds.items():
            rss[name] = measure_rss(kind, args.batch, args.seq, quick=args.quick)
            bar.update()
    if peft_method is not None:
        peft_method.memory = rss["PEFT"]["peak_delta_bytes"]

    # Checks: first losses agree; trainable counts are the analytical one.
    expected = analytic_trainable(cfg)
    first = {m.name: float(m.losses[0]) for m in methods}
    problems = []
    for m in methods:
        tol = 2e-2 if "QLoRA" in m.name else 1e-4
        if abs(first[m.name] - first["jaxlora"]) > tol * abs(first["jaxlora"]):
            problems.append(
                f"{m.name}: first loss {first[m.name]:.6f} vs jaxlora {first['jaxlora']:.6f}"
            )
        if m.trainable != expected:
            problems.append(f"{m.name}: {m.trainable} trainable, expected {expected}")

    print(
        f"Llama d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, d_ff "
        f"{cfg.d_ff}, vocab {cfg.vocab_size}, batch {args.batch}x{args.seq}, float32; LoRA "
        f"r={RANK} alpha={ALPHA:g} on q/k/v/o; Adam; {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cores; {args.rounds} interleaved rounds after a warm-up step"
    )
    print(f"analytical trainable parameters: {expected:,}")
    for note in skipped:
        print(f"skipped {note}")
    header = (
        f"{'method':20} {'trainable':>9} {'step ms':>8} {'time/ref':>8} {'[q1, q3]':>13} "
        f"{'MiB':>6} {'mem/ref':>7} {'GFLOP':>6} {'loss0':>8}  memory is"
    )
    print(header)
    print("-" * (len(header) + 40))
    by_name = {m.name: m for m in methods}
    gflop = lambda m: f"{m.flops / 1e9:.1f}" if np.isfinite(m.flops) else "-"
    for m in methods:
        ref = by_name["jaxlora QLoRA" if "QLoRA" in m.name else "jaxlora"]
        mem = m.memory if m is peft_method else m.memory.peak
        ref_mem = ref.memory.peak
        med, q1, q3 = _paired(m.seconds, ref.seconds)
        print(
            f"{m.name:20} {m.trainable:9,} {times[m.name] * 1e3:8.1f} {med:8.3f} "
            f"{f'[{q1:.2f}, {q3:.2f}]':>13} {mem / MIB:6.1f} {mem / ref_mem:7.3f} "
            f"{gflop(m):>6} {first[m.name]:8.5f}  {m.note}"
        )
    jl_mem = by_name["jaxlora"].memory.peak
    print(
        f"{'floor (no adapter)':20} {0:9,} {'':8} {'':8} {'':13} {floor.peak / MIB:6.1f} "
        f"{floor.peak / jl_mem:7.3f} {'':6} {'':8}  XLA plan: frozen JAX model, input gradient "
        "only"
    )
    if "jaxlora" in rss:
        r = rss["jaxlora"]["peak_delta_bytes"]
        print(
            f"{'jaxlora (RSS)':20} {'':9} {'':8} {'':8} {'':13} {r / MIB:6.1f} "
            f"{r / jl_mem:7.3f} {'':6} {'':8}  peak RSS delta of a subprocess, measured as "
            "PEFT's"
        )
        if "PEFT" in rss:
            p = rss["PEFT"]["peak_delta_bytes"]
            print(f"like for like, PEFT RSS / jaxlora RSS = {p / r:.3f}")
    print(
        "ref: jaxlora QLoRA for the QLoRA rows, jaxlora (LoRA) otherwise. time/ref: median "
        "over rounds of\nthis row's step time / ref's in the same round ([q1, q3]: quartiles); "
        "> 1 means jaxlora is faster/smaller.\nGFLOP: XLA's cost analysis of the lowered "
        "JAX step (same work = same number)."
    )
    print(
        f"setup+compile {t_setup:.0f} s, timing {t_timed:.0f} s, "
        f"total {time.perf_counter() - t0:.0f} s"
    )
    if problems:
        print("CHECKS FAILED:\n  " + "\n  ".join(problems))
        sys.exit(1)
    print(
        f"checks passed: first losses agree with jaxlora's (QLoRA within 2%), every "
        f"trainable count is {expected:,}"
    )


if __name__ == "__main__":
    main()
