"""A two-host pod on this machine: 2 processes x 4 CPU devices joined by ``jax.distributed``.

Every process runs the same program (``tests/_multihost_programs.py``), as on a
TPU pod slice or a SLURM job; the reference is the same program in this one
process on its 8 devices (same mesh shape, same data).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

import jaxlora
from tests import _multihost_programs as programs
from tests._multihost import launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pod_run(tmp_path_factory):
    """``(directory, results)``: the two-process training run, its checkpoint and export."""
    directory = tmp_path_factory.mktemp("pod")
    return directory, launch("train_and_save", str(directory), [4, 2])


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("single")
    return directory, programs.train_and_save(str(directory), [4, 2])


def test_training_equals_one_process(pod_run, one_process_run):
    (_, results), (_, single) = pod_run, one_process_run
    assert [r["processes"] for r in results] == [2, 2] and single["processes"] == 1
    for r in results:
        np.testing.assert_allclose(r["losses"], single["losses"], rtol=1e-6)
        np.testing.assert_allclose(r["merged_up"], single["merged_up"], rtol=1e-6, atol=1e-7)
    assert single["losses"][-1] < 0.8 * single["losses"][0]  # it trains


def _leaves(delta):
    return {
        name: {"a": np.asarray(delta[name]["kernel"].a), "b": np.asarray(delta[name]["kernel"].b)}
        for name in ("up", "down")
    }


def test_checkpoint_saved_by_two_processes_loads_anywhere(pod_run, one_process_run):
    """Saved on 2 x 4 devices; restored in one process on 1 device and on its 8-device mesh."""
    (pod, _), (single, _) = pod_run, one_process_run
    reference, _ = jaxlora.load_adapter(single / "adapter")  # saved by one process
    on_one, config = jaxlora.load_adapter(pod / "adapter")
    assert config == programs.CONFIG
    _, params = programs._base([4, 2])
    base, _ = jaxlora.split(params, programs.CONFIG, key=jax.random.key(0))
    on_mesh, _ = jaxlora.load_adapter(pod / "adapter", base=base)
    assert on_mesh["up"]["kernel"].b.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    two = jax.make_mesh((1, 2), ("data", "model"), devices=jax.devices()[:2])
    on_two, _ = jaxlora.load_adapter(
        pod / "adapter", shardings=jax.sharding.NamedSharding(two, jax.sharding.PartitionSpec())
    )
    assert len(on_two["down"]["kernel"].a.sharding.device_set) == 2
    for restored in (on_one, on_mesh, on_two):
        for name, arrays in _leaves(restored).items():
            for k, value in arrays.items():
                np.testing.assert_allclose(value, _leaves(reference)[name][k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mesh", [[4, 2], [2, 4]])
@pytest.mark.parametrize("saved_on", ["8 devices", "1 device"])
def test_pod_restores_what_one_process_saved(one_process_run, tmp_path, mesh, saved_on):
    """Saved by one process (8 or 1 devices); restored by both onto a (4, 2) and a (2, 4) mesh."""
    single, _ = one_process_run
    delta, config = jaxlora.load_adapter(single / "adapter")  # on one device
    want = _leaves(delta)
    path = single / "adapter"
    if saved_on == "1 device":
        path = jaxlora.save_adapter(tmp_path / "one-device", delta, config=config)
    for result in launch("load", str(path), mesh):
        assert result["config_rank"] == programs.CONFIG.rank
        assert result["up"]["b_spec"] == str(jax.sharding.PartitionSpec(None, "model"))
        assert not result["up"]["b_fully_addressable"]  # it spans both processes' devices
        for name in ("up", "down"):
            for k in ("a", "b"):
                np.testing.assert_array_equal(result[name][k], want[name][k])


def test_peft_export_written_once(pod_run, one_process_run):
    (pod, _), (single, _) = pod_run, one_process_run
    got = safetensors.numpy.load_file(pod / "peft" / "adapter_model.safetensors")
    want = safetensors.numpy.load_file(single / "peft" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want) and len(got) == 4
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7)
    settings = json.loads((pod / "peft" / "adapter_config.json").read_text())
    assert settings["r"] == programs.CONFIG.rank
    assert not list((pod / "peft").glob("*.partial"))


def test_a_process_killed_during_a_save_leaves_nothing_that_loads(tmp_path):
    with pytest.raises(RuntimeError, match="process 1 failed"):
        launch("save_and_die", str(tmp_path), [4, 2])
    assert not (tmp_path / "adapter").exists()
    # process 0 either still waited at the commit barrier when it was stopped (the temporary
    # directory remains, without metadata) or saw its peer die and removed it
    assert not list(tmp_path.rglob("jaxlora_adapter.json"))
    with pytest.raises(FileNotFoundError, match="no adapter checkpoint"):
        jaxlora.load_adapter(tmp_path / "adapter")


def _pod_demo(processes: int, out) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    command = ["pod-demo", "--processes", str(processes), "--steps", "12", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "jaxlora", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [line for line in done.stdout.splitlines() if line.startswith("step")]


def test_pod_demo_prints_the_same_losses_on_one_and_two_processes(tmp_path):
    one, two = _pod_demo(1, tmp_path / "one"), _pod_demo(2, tmp_path / "two")
    assert len(one) == 3 and one == two, (one, two)
    first, last = (float(line.split()[-1]) for line in (one[0], one[-1]))
    assert last < 0.8 * first  # it trains
    for name in ("up", "down"):
        a = jaxlora.load_adapter(tmp_path / "one" / "adapter")[0][name]["kernel"]
        b = jaxlora.load_adapter(tmp_path / "two" / "adapter")[0][name]["kernel"]
        np.testing.assert_allclose(np.asarray(a.b), np.asarray(b.b), rtol=1e-5, atol=1e-7)


def test_every_public_function_works_on_arrays_that_span_processes(tmp_path):
    """split (plain, DoRA, VeRA, PiSSA), merge/unmerge, lora_apply, counts, quantize, the
    many-adapter tools, AdaLoRA, rank allocation, the planner and every writer and reader,
    called by both processes on global arrays, give the one-process values."""
    pod = launch("public_api", str(tmp_path / "pod"), [4, 2], timeout=240)
    single = programs.public_api(str(tmp_path / "single"), [4, 2])
    assert len(single) >= 25 and all("value" in r for r in single.values()), single
    for result in pod:
        assert result.keys() == single.keys()
        for name, want in single.items():
            assert "value" in result[name], (name, result[name])
            np.testing.assert_allclose(
                result[name]["value"], want["value"], rtol=1e-5, err_msg=name
            )
