"""LoRA on mixture-of-experts weights used through ``jax.lax.ragged_dot`` (grouped matmuls).

Expert weights ``(experts, in, out)`` adapted with ``stacked_axes=1`` get one adapter per
expert; the use-site engine factors the grouped matmul (no merged expert weight, no
fallback: ``strict=True``). References: a float64 numpy loop over the experts' row groups
with ``W_e + s·a_e@b_e``, and the merge strategy's gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora

E, D, F, T = 4, 8, 12, 10
GROUPS = np.array([3, 0, 5, 2], np.int32)  # tokens per expert (expert 1 gets none)


def moe(params, x, group_sizes):
    h = jax.nn.relu(jax.lax.ragged_dot(x, params["experts"]["up"], group_sizes))
    return jax.lax.ragged_dot(h, params["experts"]["down"], group_sizes)


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "experts": {
            "up": jnp.asarray(rng.normal(size=(E, D, F)) / 3, jnp.float32),
            "down": jnp.asarray(rng.normal(size=(E, F, D)) / 3, jnp.float32),
        }
    }
    config = jaxlora.LoraConfig(rank=2, alpha=3.0, targets=["up", "down"], stacked_axes=1)
    base, delta = jaxlora.split(params, config, key=jax.random.key(0))
    delta = jax.tree.map(lambda z: z + jnp.asarray(rng.normal(size=z.shape) / 4, z.dtype), delta)
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    return params, base, delta, x


def _reference(params, delta, x):
    """float64: each expert's rows through ``W_e + s·a_e@b_e``."""

    def adapted(name):
        node = delta["experts"][name]
        w = np.asarray(params["experts"][name], np.float64)
        return w + node.scale * np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)

    up, down = adapted("up"), adapted("down")
    x = np.asarray(x, np.float64)
    out, start = np.zeros((T, D)), 0
    for e, n in enumerate(GROUPS):
        rows = slice(start, start + n)
        out[rows] = np.maximum(x[rows] @ up[e], 0) @ down[e]
        start += n
    return out


def _assert_grads_equal_merges(fn, base, delta, *args, reduce=jnp.sum, rtol=1e-4, atol=1e-5):
    """The use-site gradients of ``reduce(sin(fn))`` equal the merge strategy's; returns them."""

    def grad(strategy):
        f = jaxlora.lora_apply(fn, strategy=strategy)
        return jax.grad(lambda d: reduce(jnp.sin(f(base, d, *args))))(delta)

    got, want = grad("use-site"), grad("merge")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
    return got


def test_forward_equals_each_expert_with_its_own_adapter():
    params, base, delta, x = _setup()
    f = jax.jit(jaxlora.lora_apply(moe, strict=True))  # strict: a fallback would raise
    np.testing.assert_allclose(
        f(base, delta, x, GROUPS), _reference(params, delta, x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
def test_gradients_equal_the_merge_strategys():
    _, base, delta, x = _setup()
    got = _assert_grads_equal_merges(moe, base, delta, x, GROUPS)
    assert float(jnp.abs(got["experts"]["up"].a[1]).max()) == 0.0  # expert 1 saw no token


def test_the_compiled_step_keeps_no_merged_expert_weight():
    """No (experts, in, out)-sized intermediate beyond the frozen weights themselves."""
    _, base, delta, x = _setup()
    f = jaxlora.lora_apply(moe, strict=True)
    jaxpr = jax.make_jaxpr(jax.grad(lambda d: jnp.sum(f(base, d, x, GROUPS))))(delta)
    shapes = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars}
    assert (E, D, F) not in shapes and (E, F, D) not in shapes


@pytest.mark.slow
def test_qlora_experts():
    _, base, delta, x = _setup()
    q = jaxlora.quantize(base, block_size=16)
    f = jax.jit(jaxlora.lora_apply(moe, strict=True))
    want = moe(jaxlora.merge(jaxlora.dequantize(q), delta), x, GROUPS)
    np.testing.assert_allclose(f(q, delta, x, GROUPS), want, rtol=1e-5, atol=1e-5)


def test_training_the_expert_adapters():
    _, base, delta, x = _setup()
    target = jnp.cos(x)
    f = jaxlora.lora_apply(moe, strict=True)
    tx = optax.adam(3e-2)
    loss = lambda d: jnp.mean((f(base, d, x, GROUPS) - target) ** 2)

    @jax.jit
    def step(d, state):
        value, grads = jax.value_and_grad(loss)(d)
        updates, state = tx.update(grads, state, d)
        return optax.apply_updates(d, updates), state, value

    state, first = tx.init(delta), float(loss(delta))
    for _ in range(40):
        delta, state, _ = step(delta, state)
    assert float(loss(delta)) < 0.5 * first


def test_another_layout_falls_back_with_a_warning_and_stays_right():
    """Experts stored (experts, out, in) and transposed at use: merged there, never wrong."""
    params, _, _, x = _setup()
    flipped = jax.tree.map(lambda w: jnp.swapaxes(w, 1, 2), params)
    config = jaxlora.LoraConfig(rank=2, targets=["up", "down"], stacked_axes=1)
    fbase, fdelta = jaxlora.split(flipped, config, key=jax.random.key(1))
    fdelta = jax.tree.map(lambda z: z + 0.1, fdelta)

    def moe_t(p, x, g):
        t = {"experts": {k: jnp.swapaxes(w, 1, 2) for k, w in p["experts"].items()}}
        return moe(t, x, g)

    f = jaxlora.lora_apply(moe_t)
    with pytest.warns(jaxlora.FallbackWarning, match="ragged_dot_general"):
        got = f(fbase, fdelta, x, GROUPS)
    np.testing.assert_allclose(
        got, moe_t(jaxlora.merge(fbase, fdelta), x, GROUPS), rtol=1e-5, atol=1e-5
    )


# ------------------------------------------- experts as an einsum axis, or one expert at a time


def _per_expert_reference(params, delta, x_e):
    """float64: ``x_e[e] @ (W_e + s·a_e@b_e)`` for each expert's rows ``x_e[e]``."""
    node = delta["experts"]["up"]
    w = np.asarray(params["experts"]["up"], np.float64)
    w = w + node.scale * np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)
    return np.stack([np.asarray(x_e[e], np.float64) @ w[e] for e in range(E)])


def _by_einsum(p, x_e):  # GShard-style dispatch: (experts, capacity, d) @ (experts, d, f)
    return jnp.einsum("ecd,edf->ecf", x_e, p["experts"]["up"])


def _by_loop(p, x_e):  # each expert's weight taken by index (jnp's w[e]: a static slice)
    return jnp.stack([x_e[e] @ p["experts"]["up"][e] for e in range(E)])


def _by_fori_loop(p, x_e):  # a traced index (dynamic_slice)
    def body(e, out):
        return out.at[e].set(x_e[e] @ p["experts"]["up"][e])

    return jax.lax.fori_loop(0, E, body, jnp.zeros((E, x_e.shape[1], F), x_e.dtype))


@pytest.mark.parametrize("fn", [_by_einsum, _by_loop, _by_fori_loop], ids=lambda f: f.__name__)
def test_experts_used_through_an_expert_axis_are_factored(fn):
    """No merged expert weight, whichever way the program picks each expert's weight."""
    params, base, delta, _ = _setup()
    x_e = jnp.asarray(np.random.default_rng(5).normal(size=(E, 3, D)), jnp.float32)
    assert jaxlora.infer_layout(fn, params, x_e)["stacked_axes"] == {"^experts/up$": 1}
    f = jaxlora.lora_apply(fn, strict=True)  # strict: a fallback would raise
    want = _per_expert_reference(params, delta, x_e)
    np.testing.assert_allclose(jax.jit(f)(base, delta, x_e), want, rtol=1e-5, atol=1e-5)

    _assert_grads_equal_merges(fn, base, delta, x_e)
    loss = lambda d: jnp.sum(jnp.sin(f(base, d, x_e)))
    products = _dot_shapes(jax.make_jaxpr(jax.grad(loss))(delta).jaxpr)
    assert not products & {(E, D, F), (1, D, F), (D, F)}  # no a@b of the stack or an expert


def _dot_shapes(jaxpr) -> set:
    """The output shapes of every ``dot_general`` in ``jaxpr`` and its nested bodies."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.add(tuple(eqn.outvars[0].aval.shape))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found |= _dot_shapes(inner)
    return found


# ------------------------------------------------------------------ the reference MoE decoder


def _dense_moe_block(p, x, cfg):
    """float64 numpy, token by token: the top-k experts' SwiGLU outputs, softmax-weighted."""
    f64 = lambda a: np.asarray(a, np.float64)
    tokens = f64(x).reshape(-1, x.shape[-1])
    logits = tokens @ f64(p["router"]["kernel"])
    silu = lambda z: z / (1 + np.exp(-z))
    experts = p["experts"]
    out = np.zeros_like(tokens)
    for t, row in enumerate(tokens):
        chosen = np.argsort(-logits[t], kind="stable")[: cfg.top_k]
        w = np.exp(logits[t, chosen] - logits[t, chosen].max())
        for e, we in zip(chosen, w / w.sum(), strict=True):
            gate = row @ f64(experts["gate_proj"]["kernel"][e])
            up = row @ f64(experts["up_proj"]["kernel"][e])
            out[t] += we * (silu(gate) * up) @ f64(experts["down_proj"]["kernel"][e])
        if cfg.shared_expert:
            s = p["shared_expert"]
            h = silu(row @ f64(s["gate_proj"]["kernel"])) * (row @ f64(s["up_proj"]["kernel"]))
            out[t] += h @ f64(s["down_proj"]["kernel"])
    return out.reshape(x.shape)


@pytest.mark.slow
@pytest.mark.parametrize("shared", [False, True])
def test_the_moe_block_equals_a_token_by_token_reference(shared):
    from jaxlora.models.moe import MoeBlock, MoeConfig

    cfg = MoeConfig.tiny(shared_expert=shared)
    x = jax.random.normal(jax.random.key(0), (2, 5, 64))
    params = MoeBlock(cfg).init(jax.random.key(1), x)["params"]
    np.testing.assert_allclose(
        MoeBlock(cfg).apply({"params": params}, x), _dense_moe_block(params, x, cfg),
        rtol=2e-4, atol=2e-5,
    )  # fmt: skip


@pytest.mark.slow
def test_lora_on_the_decoders_experts_with_an_inferred_layout_matches_merge():
    """``infer_layout`` reads the expert axis; presets find experts; every use is factored."""
    from jaxlora.models.moe import MoeConfig, MoeDecoder

    model = MoeDecoder(MoeConfig.tiny(shared_expert=True))
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 256)
    params = model.init(jax.random.key(1), tokens)["params"]
    apply = lambda p, t: model.apply({"params": p}, t)
    layout = jaxlora.infer_layout(apply, params, tokens)
    names = ("gate", "up", "down")
    experts = {f"^layers_{i}/moe/experts/{n}_proj/kernel$" for i in (0, 1) for n in names}
    assert layout == {"stacked_axes": dict.fromkeys(experts, 1), "input_axes": {}}
    config = jaxlora.LoraConfig(rank=2, targets="mlp", **layout)
    base, delta = jaxlora.split(params, config, key=jax.random.key(2))
    adapted = {
        jaxlora._paths.path_str(p)
        for p, n in jax.tree_util.tree_flatten_with_path(
            delta, is_leaf=lambda z: isinstance(z, jaxlora.LoraNode)
        )[0]
        if isinstance(n, jaxlora.LoraNode)
    }
    assert {p.strip("^$") for p in experts} < adapted  # and the shared expert's three
    assert not any("router" in p for p in adapted)
    delta = jax.tree.map(lambda z: z + 0.05, delta)
    f = jaxlora.lora_apply(apply, strict=True)
    want = apply(jaxlora.merge(base, delta), tokens)
    np.testing.assert_allclose(jax.jit(f)(base, delta, tokens), want, rtol=1e-4, atol=1e-4)
    _assert_grads_equal_merges(apply, base, delta, tokens, reduce=jnp.mean, rtol=1e-3, atol=1e-6)


def test_moe_config_rejects_bad_sizes():
    from jaxlora.models.llama_config import LlamaConfig
    from jaxlora.models.moe import MoeConfig

    llama = LlamaConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, d_ff=8)
    with pytest.raises(ValueError, match="top_k=3 exceeds n_experts=2"):
        MoeConfig(llama=llama, n_experts=2, top_k=3, d_expert=4)
    with pytest.raises(ValueError, match="n_experts must be a positive integer"):
        MoeConfig(llama=llama, n_experts=0, d_expert=4)
    with pytest.raises(TypeError, match="LlamaConfig"):
        MoeConfig(llama={"d_model": 8}, n_experts=2, d_expert=4)


@pytest.mark.slow
def test_expert_adapters_as_peft_files_of_per_expert_modules_load_into_peft(tmp_path):
    """Mixtral's PEFT layout: one ``nn.Linear`` per expert (``experts.{e}.w1``).

    A key map with a ``{}`` field for the expert axis writes each expert's
    adapter as its own module; PEFT loads the file onto a torch model of
    per-expert linears and its merged weights equal ours (an independent
    reference), and ``load_peft`` reads the same adapters back.
    """
    torch = pytest.importorskip("torch")
    hf_peft = pytest.importorskip("peft")
    from jaxlora.io import peft

    params, base, delta, _ = _setup()
    config = jaxlora.LoraConfig(rank=2, alpha=3.0, targets=["up", "down"], stacked_axes=1)
    names = {"experts/up": "experts.{}.w1", "experts/down": "experts.{}.w2"}
    key_map = lambda path: names.get(path)
    peft.save_peft(tmp_path, delta, config=config, key_map=key_map)

    class Expert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Linear(D, F, bias=False)
            self.w2 = torch.nn.Linear(F, D, bias=False)

    model = torch.nn.Module()
    model.experts = torch.nn.ModuleList([Expert() for _ in range(E)])
    with torch.no_grad():
        for e, expert in enumerate(model.experts):
            expert.w1.weight.copy_(torch.tensor(np.asarray(params["experts"]["up"][e]).T))
            expert.w2.weight.copy_(torch.tensor(np.asarray(params["experts"]["down"][e]).T))
    merged_torch = hf_peft.PeftModel.from_pretrained(model, tmp_path).merge_and_unload()
    merged = jaxlora.merge(base, delta)
    for e in range(E):
        np.testing.assert_allclose(merged_torch.experts[e].w1.weight.detach().numpy().T,
                                   merged["experts"]["up"][e], rtol=1e-5, atol=1e-6)  # fmt: skip
        np.testing.assert_allclose(merged_torch.experts[e].w2.weight.detach().numpy().T,
                                   merged["experts"]["down"][e], rtol=1e-5, atol=1e-6)  # fmt: skip
    loaded, _ = peft.load_peft(tmp_path, base=base, key_map=key_map, config=config)
    for name in ("up", "down"):
        np.testing.assert_allclose(loaded["experts"][name].a, delta["experts"][name].a, rtol=1e-6)
        np.testing.assert_allclose(loaded["experts"][name].b, delta["experts"][name].b, rtol=1e-6)
