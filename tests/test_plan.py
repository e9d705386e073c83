"""Tests for jaxlora.plan and its CLI: counts against the LoRA paper, XLA memory plans."""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora import memory as _memory
from jaxlora.apps.cli import main
from jaxlora.apps.plan_cli import PRESETS, add_arguments
from jaxlora.models.hf import llama_config_from_hf
from jaxlora.models.llama import Llama, LlamaConfig, causal_lm_loss
from jaxlora.plan import MethodPlan, Plan, parse_bytes, plan
from jaxlora.quant import is_quantized
from tests.helpers import is_node

ADAM = optax.adam(1e-3)


def _abstract_llama(cfg: LlamaConfig, batch: int = 1, seq: int = 8):
    model = Llama(cfg)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]

    def loss(p, t):
        return causal_lm_loss(model.apply({"params": p}, t), t)

    return loss, params, tokens


# ------------------------------------------------------------------ the LoRA paper


def _gpt3(**overrides) -> LlamaConfig:
    # GPT-3 175B's attention shapes (Brown et al. 2020, Table 2.1): 96 layers, d_model 12288
    fields = dict(vocab_size=50257, d_model=12288, n_layers=96, n_heads=96, d_ff=32768)
    return LlamaConfig(**{**fields, **overrides})


@pytest.mark.parametrize(
    ("rank", "expected"),
    [(4, 18_874_368), (1, 4_718_592)],  # Hu et al. 2021: "18.9M" (Sec. 4.2), "4.7M" (Table 4)
)
@pytest.mark.parametrize("scan", [True, False])
def test_paper_counts_for_gpt3_175b(rank, expected, scan):
    """LoRA on W_q and W_v of GPT-3 175B, counted from abstract shapes only."""
    loss, params, tokens = _abstract_llama(_gpt3(scan_layers=scan))
    config = jaxlora.LoraConfig(
        rank=rank, targets=["q_proj", "v_proj"], stacked_axes={"^layers/": 1} if scan else None
    )
    p = plan(loss, params, config, batch=tokens, optimizer=ADAM, skip_compile=True)
    d, layers = 12288, 96
    assert expected == layers * 2 * (d * rank + rank * d)  # the paper's formula
    assert p.lora.trainable_params == expected
    assert p.lora.checkpoint_bytes_16 == 2 * expected  # float16 adapters
    assert p.lora.checkpoint_bytes == 4 * expected
    assert p.full.total_params == _gpt3().num_params() == 175_183_663_104
    assert p.lora.total_params == p.full.total_params + expected
    assert p.full.checkpoint_bytes_16 == 2 * p.full.total_params  # "350GB"
    assert p.lora.memory is None and p.lora.fits is None and not p.compiled
    if rank == 4:  # "35MB" vs "350GB": "about 10,000×" smaller
        assert p.lora.checkpoint_bytes_16 == 37_748_736
        assert 9_000 < p.full.checkpoint_bytes_16 / p.lora.checkpoint_bytes_16 < 10_000


def test_cli_reproduces_the_paper(capsys):
    assert main(["plan", "gpt3-175b", "--rank", "1", "--targets", "q_proj,v_proj",
                 "--skip-compile", "--quantize", "none"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "4,718,592" in out and "175,183,663,104" in out
    assert "9.4 MB" in out  # 4.7M float16 parameters
    assert "not compiled" in out


def test_counts_match_an_actual_split_and_the_analytic_formula():
    cfg = LlamaConfig.tiny()
    loss, abstract, tokens = _abstract_llama(cfg)
    config = jaxlora.LoraConfig(rank=4, targets="all-linear")
    params = Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    base, delta = jaxlora.split(params, config, key=jax.random.key(1))
    count = jaxlora.count_parameters(base, delta)
    p = plan(loss, abstract, config, batch=tokens, optimizer=ADAM, skip_compile=True)
    assert (p.lora.trainable_params, p.lora.total_params) == tuple(count)
    assert p.full.total_params == p.full.trainable_params == cfg.num_params()
    d, kv, ff, r = cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff, 4
    per_layer = r * ((d + d) * 2 + (d + kv) * 2 + (d + ff) * 3)  # q, o; k, v; gate, up, down
    assert p.lora.trainable_params == cfg.n_layers * per_layer
    assert p.lora.checkpoint_bytes == sum(
        n.a.nbytes + n.b.nbytes for n in jax.tree.leaves(delta, is_leaf=is_node) if is_node(n)
    )


# ------------------------------------------------------------- compiled memory plans


@functools.cache
def _tiny_plan() -> Plan:
    loss, params, tokens = _abstract_llama(LlamaConfig.tiny(), batch=2, seq=16)
    config = jaxlora.LoraConfig(rank=4, targets="attention")
    return plan(
        loss, params, config, batch=tokens, optimizer=ADAM, quantize="nf4", device_memory="2MB"
    )


@pytest.mark.slow
def test_compiled_plan_full_costs_more_than_lora():
    p = _tiny_plan()
    print(f"\n{p}")
    assert p.compiled and p.devices == 1
    assert p.full.peak_bytes > p.lora.peak_bytes > 0
    # full fine-tuning holds weights, gradients and two Adam moments of every parameter
    assert p.full.memory.argument >= 3 * p.full.base_bytes
    assert p.lora.memory.argument < 2 * p.lora.base_bytes
    assert p.full.fits is (p.full.peak_bytes <= 2_000_000)
    assert p.lora.fits is (p.lora.peak_bytes <= 2_000_000)
    assert p.lora.notes == () and p.full.notes == ()
    assert "peak training memory (1 device)" in str(p) and "fits in 2.0 MB" in str(p)


def test_compiled_plan_qlora_is_planned_or_says_why_not():
    q = _tiny_plan().qlora
    assert q is not None and q.method == "QLoRA (nf4)"
    assert q.trainable_params == _tiny_plan().lora.trainable_params
    if q.available:
        assert q.base_bytes < _tiny_plan().lora.base_bytes / 5  # ~4.1 bits of 32
        assert q.peak_bytes > 0
    else:
        assert q.unavailable and q.memory is None and q.fits is None
        assert f"QLoRA (nf4): not available: {q.unavailable}" in str(_tiny_plan())


def _mlp(layers=2, width=64):
    params = {
        f"dense_{i}": {"kernel": jax.ShapeDtypeStruct((width, width), jnp.float32)}
        for i in range(layers)
    }

    def loss(p, x):
        for i in range(layers):
            x = jnp.tanh(x @ p[f"dense_{i}"]["kernel"])
        return jnp.mean(x**2)

    return loss, params, jax.ShapeDtypeStruct((8, width), jnp.float32)


def test_qlora_that_cannot_train_is_reported_not_available(monkeypatch):
    loss, params, x = _mlp()
    real = _memory.lora_step

    def refusing(loss, optimizer):
        step = real(loss, optimizer)

        def checked(delta, state, base, batch):
            if any(is_quantized(w) for w in jax.tree.leaves(base, is_leaf=is_quantized)):
                raise NotImplementedError("lora_apply cannot read a quantized base yet\nmore")
            return step(delta, state, base, batch)

        return checked

    monkeypatch.setattr(_memory, "lora_step", refusing)
    config = jaxlora.LoraConfig(rank=2, targets="dense")
    p = plan(loss, params, config, batch=x, optimizer=ADAM, quantize="nf4")
    assert p.lora.available and p.lora.peak_bytes > 0
    assert not p.qlora.available and p.qlora.memory is None
    assert p.qlora.unavailable == "NotImplementedError: lora_apply cannot read a quantized base yet"
    assert "QLoRA (nf4): not available: NotImplementedError" in str(p)
    # a quantization that cannot be built is reported the same way, even without compiling
    bad = plan(loss, params, config, batch=x, optimizer=ADAM, quantize={"block_size": 6},
               skip_compile=True)  # fmt: skip
    assert bad.qlora.unavailable.startswith("ValueError") and bad.qlora.base_bytes is None


def test_engine_fallbacks_become_notes():
    params = {"w": jax.ShapeDtypeStruct((16, 16), jnp.float32)}

    def loss(p, x):  # an elementwise use of the weight: the engine merges it there
        return jnp.sum(jnp.sin(p["w"]) * x)

    p = plan(loss, params, jaxlora.LoraConfig(rank=2, targets="w"),
             batch=jax.ShapeDtypeStruct((16, 16), jnp.float32), optimizer=ADAM)  # fmt: skip
    assert p.full.notes == ()
    assert len(p.lora.notes) == 1 and p.lora.notes[0].startswith("merged at one use (")
    assert "'w'" not in p.lora.notes[0] and ": w" in p.lora.notes[0]
    assert f"LoRA: {p.lora.notes[0]}" in str(p)


def test_sharded_plan_reports_per_device_memory():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    loss, params, x = _mlp(layers=2, width=256)
    config = jaxlora.LoraConfig(rank=4, targets="dense")
    single = plan(loss, params, config, batch=x, optimizer=ADAM)
    fsdp_params = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, P("data"))),
        params,
    )
    fsdp = plan(loss, fsdp_params, config, batch=x, optimizer=ADAM, device_memory=10**9)
    replicated = plan(loss, params, config, batch=x, optimizer=ADAM, mesh=mesh)
    print(f"\none device:\n{single}\nFSDP over 8:\n{fsdp}\nreplicated over 8:\n{replicated}")
    assert fsdp.devices == replicated.devices == 8 and single.devices == 1
    assert "per device" in str(fsdp)
    # weights, gradients and Adam moments split 8 ways; the gathered weights stay whole
    assert fsdp.full.memory.argument < single.full.memory.argument / 6
    assert fsdp.full.peak_bytes < single.full.peak_bytes / 2
    assert fsdp.lora.memory.argument < single.lora.memory.argument / 4
    assert replicated.lora.memory.argument > fsdp.lora.memory.argument
    assert fsdp.full.fits and fsdp.lora.fits
    assert fsdp.lora.trainable_params == single.lora.trainable_params


# ------------------------------------------------------------------------ the CLI


@pytest.mark.slow
def test_cli_plans_a_preset(capsys):
    assert main(["plan", "tiny", "--seq", "16", "--quantize", "none", "--device-memory",
                 "80GB", "--targets", "q_proj,v_proj"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    print(out)
    assert "model: tiny: 2 layers, d_model 64, 4 heads, 2 KV heads" in out
    assert "LoRA rank 8 on q_proj,v_proj" in out
    assert "peak training memory (1 device)" in out
    assert "fits in 80.0 GB" in out and out.count("yes") == 2
    assert "QLoRA" not in out


def test_cli_size_flags_and_config_json(tmp_path, capsys):
    sizes = ["--d-model", "64", "--layers", "3", "--heads", "4", "--d-ff", "96", "--vocab", "100"]
    assert main(["plan", *sizes, "--skip-compile"]) == 0
    expected = LlamaConfig(vocab_size=100, d_model=64, n_layers=3, n_heads=4, d_ff=96)
    assert f"{expected.num_params():,}" in capsys.readouterr().out

    llama = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "vocab_size": 100,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(llama))
    cfg = llama_config_from_hf(path)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff) == (64, 3, 4, 2, 96)
    assert (cfg.max_len, cfg.norm_eps, cfg.rope_theta, cfg.tie_embeddings) == (64, 1e-5, 5e5, True)
    assert main(["plan", str(path), "--skip-compile", "--layers", "5"]) == 0
    out = capsys.readouterr().out
    assert f"{llama_config_from_hf(path, n_layers=5).num_params():,}" in out
    assert "5 layers" in out

    gpt = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100, "n_positions": 32}
    cfg = llama_config_from_hf(gpt)
    assert (cfg.d_ff, cfg.max_len, cfg.tie_embeddings, cfg.n_kv_heads) == (256, 32, True, 4)
    assert llama_config_from_hf({**gpt, "n_inner": 128}).d_ff == 128


def test_config_json_errors(tmp_path):
    with pytest.raises(ValueError, match="has no 'intermediate_size'"):
        llama_config_from_hf(
            {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 9}
        )
    with pytest.raises(ValueError, match="has no 'num_hidden_layers'"):
        llama_config_from_hf({"hidden_size": 8})
    with pytest.raises(ValueError, match="has no 'n_layer'"):
        llama_config_from_hf({"n_embd": 8})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        llama_config_from_hf(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list"):
        llama_config_from_hf(bad)
    with pytest.raises(FileNotFoundError):
        llama_config_from_hf(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["llama-3b"], "'llama-3b' is neither a preset"),
        (["--d-model", "64", "--layers", "2"], "missing --heads --d-ff --vocab"),
        (["tiny", "--heads", "3"], "not divisible by n_heads=3"),
        (["tiny", "--targets", "nothing_matches"], "matched no adaptable parameter"),
        (["tiny", "--quantize", "nf5"], "unknown format 'nf5'"),
    ],
)
def test_cli_errors_go_to_stderr(argv, message, capsys):
    assert main(["plan", *argv, "--skip-compile"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxlora plan: error: ") and message in err


@pytest.mark.parametrize(
    "argv",
    [["--layers", "0"], ["--rank", "-1"], ["--batch", "two"], ["--device-memory", "80XB"],
     ["--device-memory", "0GB"], ["--dtype", "float16"]],
)  # fmt: skip
def test_cli_rejects_bad_sizes(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "tiny", *argv])
    assert e.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_presets_are_known_to_the_parser():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for name in PRESETS:
        assert parser.parse_args([name]).model == name
    assert parser.parse_args([]).quantize == "nf4"


# ------------------------------------------------------------------------ errors


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("80 gib") == 80 * 2**30
    assert parse_bytes(" 2.5MB ") == 2_500_000
    assert parse_bytes("4096") == parse_bytes(4096) == 4096
    for bad in ("", "GB", "80XB", "-5GB", "0", "1e9", True, 1.5, None):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_plan_argument_errors():
    loss, params, x = _mlp()
    config = jaxlora.LoraConfig(rank=2, targets="dense")
    kwargs = dict(batch=x, optimizer=ADAM, skip_compile=True)
    with pytest.raises(TypeError, match=r"config must be a jaxlora\.LoraConfig"):
        plan(loss, params, {"rank": 2}, **kwargs)
    with pytest.raises(TypeError, match=r"optax\.GradientTransformation"):
        plan(loss, params, config, batch=x, optimizer=optax.adam, skip_compile=True)
    with pytest.raises(ValueError, match="cannot read 'lots' as a memory size"):
        plan(loss, params, config, device_memory="lots", **kwargs)
    with pytest.raises(ValueError, match="unknown format 'nf5'"):
        plan(loss, params, config, quantize="nf5", **kwargs)
    with pytest.raises(ValueError, match="matched no adaptable parameter"):
        plan(loss, params, jaxlora.LoraConfig(targets="attention"), **kwargs)


def test_method_plan_and_plan_table():
    full = MethodPlan("full fine-tuning", 100, 100, 400, 400, 200, None, None)
    lora = MethodPlan("LoRA", 110, 10, 400, 40, 20, None, None, unavailable="Oops: no")
    p = Plan(full=full, lora=lora, qlora=None, devices=1, device_memory=None, compiled=False)
    assert p.methods == (full, lora)
    text = str(p)
    assert "checkpoint reduction" in text and "10x" in text
    assert "LoRA: not available: Oops: no" in text and "fits in" not in text
    assert (
        not lora.available
        and full.available
        and lora.trainable_percent == pytest.approx(9.0909, 1e-3)
    )
