"""Tests for jaxlora/sharding.py and sharded LoRA training on 8 simulated CPU devices.

The root ``conftest.py`` gives the suite 8 CPU devices. A small Llama trains one
LoRA Adam step under data parallelism (DP), fully sharded data parallelism
(FSDP) and tensor parallelism (TP); each must reproduce the single-device step,
must not all-gather a weight that the frozen model's own step does not gather,
and reports XLA's per-device memory.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora import memory as _memory
from jaxlora._paths import Layout
from jaxlora.models.llama import Llama, LlamaConfig, causal_lm_loss
from jaxlora.sharding import adapter_shardings, factor_specs
from tests.helpers import randomize_b

N_DEVICES = 8
BATCH, SEQ = 8, 12  # 96 tokens: activation sizes carry a factor 3, weight sizes do not
RANK = 4


def test_suite_sees_eight_devices():
    assert len(jax.devices()) == N_DEVICES, "the root conftest.py should set XLA_FLAGS"


# --------------------------------------------------------------------------- specs


def _mesh(shape, names, axis_type):
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


AXIS_TYPES = [AxisType.Auto, AxisType.Explicit]


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_specs_dense_2d(axis_type):
    mesh = _mesh((4, 2), ("data", "model"), axis_type)
    layout = Layout((), (16,), (32,))
    node = _abstract_node(layout)
    cases = {
        P(None, "model"): (P(None, None), P(None, "model")),  # column-parallel
        P("model", None): (P("model", None), P(None, None)),  # row-parallel
        P("data"): (P("data", None), P(None, None)),  # FSDP, short spec
        P(("data", "model"), None): (P(("data", "model"), None), P(None, None)),
        P("data", "model"): (P("data", None), P(None, "model")),
        P(): (P(None, None), P(None, None)),
    }
    for spec, (a_spec, b_spec) in cases.items():
        out = adapter_shardings({"w": NamedSharding(mesh, spec)}, {"w": node})["w"]
        assert (out.a.spec, out.b.spec) == (a_spec, b_spec), spec
        assert len(jax.tree.leaves(out)) == 2  # one sharding per array; the scale is static
        assert out.a.mesh == mesh and out.layout == layout


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_specs_dense_general_3d(axis_type):
    mesh = _mesh((4, 2), ("data", "model"), axis_type)
    # q/k/v kernel (d_model, heads, head_dim): one input axis, two output axes
    qkv = Layout((), (64,), (4, 16))
    # attention output kernel (heads, head_dim, d_model): two input axes (input_axes=2)
    out = Layout((), (4, 16), (64,))
    cases = [
        (qkv, P(None, "model", None), P(None, None), P(None, "model")),  # heads sharded
        (qkv, P("data", "model", None), P("data", None), P(None, "model")),
        (qkv, P(None, None, "model"), P(None, None), P(None, None)),  # head_dim: inexact
        (qkv, P(None, "model", "data"), P(None, None), P(None, None)),  # 2 heads left: inexact
        (out, P("model", None, None), P("model", None), P(None, None)),
        (out, P("model", None, "data"), P("model", None), P(None, "data")),
        (out, P(None, "model", None), P(None, None), P(None, None)),  # head_dim: inexact
    ]
    for layout, spec, a_spec, b_spec in cases:
        node = _abstract_node(layout)
        got = adapter_shardings({"w": NamedSharding(mesh, spec)}, {"w": node})["w"]
        assert (got.a.spec, got.b.spec) == (a_spec, b_spec), (layout, spec)


def test_specs_flatten_exactly_when_leading_axes_are_fully_split():
    mesh = _mesh((4, 2), ("data", "model"), AxisType.Auto)
    # heads = 4 over 'data' (4 devices) leaves one head per device, so sharding
    # head_dim over 'model' as well flattens exactly to ('data', 'model').
    layout = Layout((), (64,), (4, 16))
    got = adapter_shardings(
        {"w": NamedSharding(mesh, P(None, "data", "model"))}, {"w": _abstract_node(layout)}
    )["w"]
    assert got.b.spec == P(None, ("data", "model"))
    # the same specs given as PartitionSpecs, with no mesh to read sizes from, replicate
    specs = adapter_shardings({"w": P(None, "data", "model")}, {"w": _abstract_node(layout)})
    assert specs["w"].b == P(None, None)
    # ... and use the ambient mesh's sizes when there is one
    with jax.set_mesh(mesh):
        specs = adapter_shardings({"w": P(None, "data", "model")}, {"w": _abstract_node(layout)})
    assert specs["w"].b == P(None, ("data", "model"))
    # a dimension of size 1 in front of a sharded axis never breaks contiguity
    assert factor_specs(P(None, None, "model"), Layout((), (8,), (1, 16)))[1] == P(None, "model")


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_specs_stacked_layers(axis_type):
    mesh = _mesh((4, 2), ("data", "model"), axis_type)
    layout = Layout((6,), (64,), (128,))  # nn.scan'd MLP kernel (layers, in, out)
    node = _abstract_node(layout)
    for spec, a_spec, b_spec in [
        (P(None, "data", "model"), P(None, "data", None), P(None, None, "model")),
        (P("model", None, "data"), P("model", None, None), P("model", None, "data")),
        (P(None, None, ("data", "model")), P(None, None, None), P(None, None, ("data", "model"))),
    ]:
        got = adapter_shardings({"w": NamedSharding(mesh, spec)}, {"w": node})["w"]
        assert (got.a.spec, got.b.spec) == (a_spec, b_spec), spec


def test_specs_from_arrays_boxes_and_replicated_shardings():
    mesh = _mesh((8,), ("data",), AxisType.Auto)
    layout = Layout((), (16,), (8,))
    delta = {"x": _abstract_node(layout), "y": None, "z": _abstract_node(layout)}
    single = SingleDeviceSharding(jax.devices()[1])
    array = jax.device_put(jnp.ones((16, 8)), NamedSharding(mesh, P("data")))
    struct = jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    for x in (array, struct, nn.Partitioned(array, names=("data", None))):
        got = adapter_shardings({"x": x, "y": object(), "z": single}, delta)
        assert got["x"].a.spec == P("data", None) and got["x"].b.spec == P(None, None)
        assert got["y"] is None
        assert got["z"].a == got["z"].b == single


def test_shardings_place_a_delta_and_feed_jit():
    mesh = _mesh((4, 2), ("data", "model"), AxisType.Auto)
    params = {
        "q": {"kernel": jax.random.normal(jax.random.key(0), (16, 4, 8))},
        "o": {"kernel": jax.random.normal(jax.random.key(1), (4, 8, 16))},
    }
    config = jaxlora.LoraConfig(rank=2, targets=["q", "o"], input_axes={"^o/": 2})
    specs = {"q": {"kernel": P(None, "model")}, "o": {"kernel": P("model")}}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    base, delta = jaxlora.split(params, config, key=jax.random.key(2))
    delta = randomize_b(delta, jax.random.key(3))
    out = adapter_shardings(shardings, delta)
    sharded = jax.device_put(delta, out)
    assert sharded["q"]["kernel"].b.sharding.spec == P(None, "model")
    assert sharded["o"]["kernel"].a.sharding.spec == P("model", None)

    def fn(p, x):
        h = jnp.einsum("bd,dhk->bhk", x, p["q"]["kernel"])
        return jnp.einsum("bhk,hkd->bd", h, p["o"]["kernel"])

    x = jax.random.normal(jax.random.key(4), (8, 16))
    apply = jax.jit(jaxlora.lora_apply(fn), in_shardings=(shardings, out, None))
    expected = fn(jaxlora.merge(base, delta), x)
    chex.assert_trees_all_close(apply(base, sharded, x), expected, rtol=1e-5, atol=1e-5)


def test_errors_name_the_path_and_the_fix():
    node = _abstract_node(Layout((), (16,), (8,)))
    mesh = _mesh((8,), ("data",), AxisType.Auto)
    with pytest.raises(ValueError, match="does not have the structure of delta"):
        adapter_shardings({"other": NamedSharding(mesh, P())}, {"w": node})
    with pytest.raises(TypeError, match=r"'w'.*Expected a NamedSharding"):
        adapter_shardings({"w": "data"}, {"w": node})
    with pytest.raises(TypeError, match="without a sharding"):
        adapter_shardings({"w": jax.ShapeDtypeStruct((16, 8), jnp.float32)}, {"w": node})
    with pytest.raises(
        ValueError, match=r"at 'w': .* 3 entries, but the weight it shards has 2 axes"
    ):
        adapter_shardings({"w": NamedSharding(mesh, P(None, None, "data"))}, {"w": node})
    with pytest.raises(ValueError, match=r"at 'w'.*3 entries"):
        adapter_shardings({"w": P(None, None, "data")}, {"w": node})
    with pytest.raises(TypeError, match=r"at 'w'.*a delta holds adapter nodes"):
        adapter_shardings({"w": NamedSharding(mesh, P())}, {"w": jnp.ones(3)})


# ------------------------------------------------------- split places the adapters


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_split_places_adapters_like_their_weights(axis_type):
    mesh = _mesh((4, 2), ("data", "model"), axis_type)
    k = jax.random.split(jax.random.key(0), 3)
    params = {
        "up": {"kernel": jax.random.normal(k[0], (16, 32))},
        "down": {"kernel": jax.random.normal(k[1], (32, 16))},
        "scan": {"kernel": jax.random.normal(k[2], (2, 16, 32))},
    }
    specs = {
        "up": {"kernel": P("data", "model")},
        "down": {"kernel": P("model")},
        "scan": {"kernel": P(None, None, "model")},
    }
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    config = jaxlora.LoraConfig(rank=2, targets=".*", stacked_axes={"scan": 1})
    _, reference = jaxlora.split(params, config, key=jax.random.key(1))
    _, delta = jaxlora.split(jax.device_put(params, shardings), config, key=jax.random.key(1))
    expected = adapter_shardings(shardings, delta)
    for got, want in zip(jax.tree.leaves(delta), jax.tree.leaves(expected), strict=True):
        if got.ndim:
            assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
    assert delta["scan"]["kernel"].b.sharding.spec == P(None, None, "model")
    chex.assert_trees_all_equal(jax.device_get(delta), jax.device_get(reference))
    if axis_type == AxisType.Explicit:  # the sharding is part of the type, also under jit
        with jax.set_mesh(mesh):
            traced = jax.jit(lambda p: jaxlora.split(p, config, key=jax.random.key(1))[1])(
                jax.device_put(params, shardings)
            )
        assert jax.typeof(traced["down"]["kernel"].a).sharding.spec == P("model", None)
        assert jax.typeof(traced["up"]["kernel"].b).sharding.spec == P(None, "model")


def test_split_under_jit_with_out_shardings():
    """The multi-host recipe: shardings from abstract shapes, then split inside jit."""
    mesh = _mesh((4, 2), ("data", "model"), AxisType.Auto)
    params = {
        "q": {"kernel": jax.random.normal(jax.random.key(0), (16, 4, 8))},
        "o": {"kernel": jax.random.normal(jax.random.key(1), (4, 8, 16))},
        "norm": {"scale": jnp.ones(16)},
    }
    specs = {
        "q": {"kernel": P("data", "model")},
        "o": {"kernel": P("model")},
        "norm": {"scale": P()},
    }
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    config = jaxlora.LoraConfig(rank=2, targets=["q", "o"], input_axes={"^o/": 2})

    def split(p):
        return jaxlora.split(p, config, key=jax.random.key(2))

    _, abstract_delta = jax.eval_shape(split, params)
    out_shardings = (shardings, adapter_shardings(shardings, abstract_delta))
    base, delta = jax.jit(split, out_shardings=out_shardings)(jax.device_put(params, shardings))
    assert base["q"]["kernel"].sharding.spec == P("data", "model")
    assert delta["q"]["kernel"].a.sharding.spec == P("data", None)
    assert delta["q"]["kernel"].b.sharding.spec == P(None, "model")
    assert delta["o"]["kernel"].a.sharding.spec == P("model", None)
    assert delta["norm"]["scale"] is None
    chex.assert_trees_all_equal(jax.device_get(delta), jax.device_get(split(params)[1]))


def test_split_leaves_unsharded_adapters_alone():
    params = {"w": jnp.ones((8, 4))}
    config = jaxlora.LoraConfig(rank=2, targets="w")
    _, delta = jaxlora.split(params, config, key=jax.random.key(0))
    assert delta["w"].a.sharding == SingleDeviceSharding(jax.devices()[0])
    _, abstract = jax.eval_shape(lambda p: jaxlora.split(p, config, key=jax.random.key(0)), params)
    assert abstract["w"].a.shape == (8, 2)


@pytest.mark.parametrize("parallel", ["dp", "column"])
def test_explicit_mesh_lora_grad_matches_single_device(parallel):
    """Explicit axes: shardings are types; a LoRA gradient still matches one device."""
    mesh = _mesh((4, 2), ("data", "model"), AxisType.Explicit)
    params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (16, 32)) / 4}}
    x = jax.random.normal(jax.random.key(1), (8, 16))
    config = jaxlora.LoraConfig(rank=2, targets="up")
    spec = {"dp": P(), "column": P(None, "model")}[parallel]

    def loss(delta, base, x):
        y = jaxlora.lora_apply(lambda p, x: x @ p["up"]["kernel"])(base, delta, x)
        return jnp.mean(jnp.tanh(y) ** 2)

    base, delta = jaxlora.split(params, config, key=jax.random.key(2))
    delta = randomize_b(delta, jax.random.key(3))
    expected = jax.jit(jax.value_and_grad(loss))(delta, base, x)
    with jax.set_mesh(mesh):
        shardings = {"up": {"kernel": NamedSharding(mesh, spec)}}
        sbase = jax.device_put(base, shardings)
        sdelta = jax.device_put(delta, adapter_shardings(shardings, delta))
        sx = jax.device_put(x, NamedSharding(mesh, P("data")))
        value, grads = jax.jit(jax.value_and_grad(loss))(sdelta, sbase, sx)
    assert jax.typeof(grads["up"]["kernel"].b).sharding.spec == P(None, spec[1] if spec else None)
    chex.assert_trees_all_close((value, grads), expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------ sharded training of a small Llama


def _tp_spec(path: str, ndim: int) -> P:
    """Megatron-style: q/k/v/gate/up split their output over 'model', o/down their input."""
    if ndim < 2:
        return P()
    if re.search(r"(o_proj|down_proj)/", path):
        return P("model", None)
    return P(None, "model")  # q/k/v/gate/up, embedding features, lm_head vocabulary


LAYOUTS = {
    # name: (mesh shape, mesh axes, weight spec (path, ndim) -> P, batch spec)
    "dp": ((8,), ("data",), lambda path, ndim: P(), P("data")),
    "fsdp": ((8,), ("data",), lambda path, ndim: P("data") if ndim >= 2 else P(), P("data")),
    "tp": ((4, 2), ("data", "model"), _tp_spec, P("data")),
}


@functools.cache
def _problem():
    cfg = LlamaConfig.tiny(n_layers=1)  # d_model 64, 4 heads, 2 KV heads, d_ff 128, vocab 256
    model = Llama(cfg)
    tokens = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, cfg.vocab_size)
    params = model.init(jax.random.key(1), tokens)["params"]
    config = jaxlora.LoraConfig(rank=RANK, targets="all-linear")  # q,k,v,o,gate,up,down

    def loss(p, batch):
        return causal_lm_loss(model.apply({"params": p}, batch), batch)

    def embed_loss(p, embeds, batch):  # the frozen model, differentiated w.r.t. its input
        x = jnp.take(p["embed_tokens"]["embedding"], batch, axis=0) + embeds
        return causal_lm_loss(model.apply({"params": p}, inputs_embeds=x), batch)

    return params, tokens, config, loss, embed_loss


@dataclasses.dataclass(frozen=True)
class _Run:
    losses: tuple[float, ...]
    delta: object
    lora: object  # compiled LoRA step
    memory: _memory.MemoryReport
    floor: object | None  # compiled frozen-model step, on the same mesh


@functools.cache
def _train(layout: str | None) -> _Run:
    """Two LoRA Adam steps on one device (``None``) or on a mesh of the 8 devices."""
    params, tokens, config, loss, embed_loss = _problem()
    if layout is None:
        shardings, batch_sharding = None, SingleDeviceSharding(jax.devices()[0])
    else:
        shape, names, weight_spec, batch_spec = LAYOUTS[layout]
        mesh = _mesh(shape, names, AxisType.Auto)
        shardings = jax.tree_util.tree_map_with_path(
            lambda p, x: NamedSharding(mesh, weight_spec(jaxlora._paths.path_str(p), x.ndim)),
            params,
        )
        params = jax.device_put(params, shardings)
        batch_sharding = NamedSharding(mesh, batch_spec)
    base, delta = jaxlora.split(params, config, key=jax.random.key(2))
    delta = randomize_b(delta, jax.random.key(3))  # so that `a` gets a gradient too
    if shardings is not None:
        delta = jax.device_put(delta, adapter_shardings(shardings, delta))
    tokens = jax.device_put(tokens, batch_sharding)
    optimizer = _memory.lora_optimizer(optax.adam(1e-2), delta)
    opt_state = optimizer.init(delta)  # the Adam moments follow the adapters...
    if shardings is not None:  # ... and the step count goes on every device of the mesh
        replicated = NamedSharding(mesh, P())
        opt_state = jax.tree.map(
            lambda x: x if len(x.sharding.device_set) > 1 else jax.device_put(x, replicated),
            opt_state,
        )
    step = _memory.lora_step(loss, optimizer)
    # pin the state's output shardings to its input shardings, as a training loop does
    state = jax.tree.map(lambda x: x.sharding, (delta, opt_state))
    jitted = jax.jit(step, donate_argnums=(0, 1), out_shardings=(*state, None))
    compiled = jitted.lower(delta, opt_state, base, tokens).compile()
    m = compiled.memory_analysis()
    memory = _memory.MemoryReport(
        argument=m.argument_size_in_bytes,
        output=m.output_size_in_bytes,
        alias=m.alias_size_in_bytes,
        temp=m.temp_size_in_bytes,
    )
    losses = []
    for _ in range(2):
        delta, opt_state, value = compiled(delta, opt_state, base, tokens)
        losses.append(float(value))
    floor = None
    if layout is not None:
        embeds = jax.device_put(jnp.zeros((BATCH, SEQ, LlamaConfig.tiny().d_model)), batch_sharding)
        floor = jax.jit(_memory.floor_step(embed_loss)).lower(params, embeds, tokens).compile()
    return _Run(tuple(losses), jax.device_get(delta), compiled, memory, floor)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_lora_step_matches_single_device(layout):
    single, sharded = _train(None), _train(layout)
    np.testing.assert_allclose(sharded.losses, single.losses, rtol=1e-5)
    assert single.losses[1] < single.losses[0]
    chex.assert_trees_all_equal_structs(sharded.delta, single.delta)
    chex.assert_trees_all_close(sharded.delta, single.delta, rtol=1e-5, atol=1e-6)


_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) "
    r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\("
)
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def collectives(hlo: str) -> collections.Counter:
    """``(op, dtype, shape)`` -> count, for every collective's result in an HLO module."""
    found: collections.Counter = collections.Counter()
    for line in hlo.splitlines():
        m = _COLLECTIVE.match(line)
        if not m:
            continue
        shapes = _SHAPE.findall(m.group(1))
        if m.group(3):  # async start: (operands..., results...)
            shapes = shapes[len(shapes) // 2 :]
        for dtype, dims in shapes:
            found[m.group(2), dtype, tuple(int(d) for d in dims.split(",") if d)] += 1
    return found


def test_collectives_parser():
    hlo = """
  %all-gather.1 = f32[64,128]{1,0} all-gather(f32[8,128]{1,0} %p), dimensions={0}
  %all-reduce.2 = (f32[4,128]{1,0}, /*index=1*/f32[64,4]{1,0}) all-reduce(%a, %b), to_apply=%add
  ROOT %ags = (f32[8,4]{1,0}, f32[64,4]{1,0}) all-gather-start(f32[8,4]{1,0} %q)
  %add.3 = f32[64,4]{1,0} add(%x, %y)
"""
    assert collectives(hlo) == collections.Counter(
        {
            ("all-gather", "f32", (64, 128)): 1,
            ("all-reduce", "f32", (4, 128)): 1,
            ("all-reduce", "f32", (64, 4)): 1,
            ("all-gather", "f32", (64, 4)): 1,
        }
    )


def _weight_gathers(counter: collections.Counter, weight_sizes: set[int]) -> collections.Counter:
    return collections.Counter(
        {k: n for k, n in counter.items() if k[0] == "all-gather" and np.prod(k[2]) in weight_sizes}
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_gathers_no_weight_the_frozen_model_does_not(layout):
    params = _problem()[0]
    weight_sizes = {int(x.size) for x in jax.tree.leaves(params) if x.ndim >= 2}
    run = _train(layout)
    lora = collectives(run.lora.as_text())
    floor = collectives(run.floor.as_text())
    lora_w, floor_w = _weight_gathers(lora, weight_sizes), _weight_gathers(floor, weight_sizes)
    print(f"\n{layout}: LoRA step collectives {dict(lora)}")
    print(f"{layout}: frozen-model step collectives {dict(floor)}")
    print(f"{layout}: weight-sized all-gathers: LoRA {dict(lora_w)}, frozen {dict(floor_w)}")
    assert set(lora_w) <= set(floor_w), f"only the LoRA step gathers {set(lora_w) - set(floor_w)}"
    if layout != "fsdp":  # replicated or tensor-parallel weights are never gathered
        assert not lora_w
    else:  # FSDP gathers each weight for its use, as the frozen model does
        assert lora_w


def test_memory_per_device():
    single = _train(None).memory
    rows = {"1 device": single} | {name: _train(name).memory for name in LAYOUTS}
    print("\nLoRA Adam step, tiny Llama, batch 8x12, r=4 all-linear: per-device bytes")
    print(f"{'layout':10}{'argument':>10}{'output':>10}{'alias':>10}{'temp':>10}{'peak':>10}")
    for name, m in rows.items():
        print(f"{name:10}{m.argument:>10}{m.output:>10}{m.alias:>10}{m.temp:>10}{m.peak:>10}")
    fsdp = rows["fsdp"]
    assert fsdp.peak < single.peak
    assert fsdp.argument < single.argument / 2  # weights, adapters and Adam state split 8 ways
    assert rows["tp"].argument < single.argument  # the weights split 2 ways
    for m in rows.values():
        assert m.peak > 0


def _abstract_node(layout: Layout, rank: int = 2) -> jaxlora.LoraNode:
    a = jax.ShapeDtypeStruct((*layout.stacked, layout.n_in, rank), jnp.float32)
    b = jax.ShapeDtypeStruct((*layout.stacked, rank, layout.n_out), jnp.float32)
    return jaxlora.LoraNode(a, b, scale=1.0, layout=layout)
