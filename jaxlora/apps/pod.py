"""``python -m jaxlora pod-demo --processes N``: one LoRA training run on 1 or N processes.

The same program runs in every process, as on a TPU pod slice (every worker
runs the script) or under SLURM (one task per node or GPU):
``jax.distributed.initialize`` joins the processes, one ``(data, model)`` mesh
spans all their devices (8 simulated CPU devices in all, split between the
processes), the weights are column/row parallel, each process makes only its
own rows of every batch (``jax.make_array_from_process_local_data``), and the
adapter is saved and exported to PEFT by all processes together. The losses do
not depend on the number of processes.

Here the processes are started on this machine, on a free local port, with
gloo CPU collectives. On a cluster, run the equivalent of :func:`train` on
every host after ``jax.distributed.initialize()``, which reads the
coordinator, process count and id from the environment.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora.apps.progress import progress
from jaxlora.io import peft

_DEVICES = 8  # in all, so the mesh and the losses are the same for any number of processes
_D_IN, _D_HIDDEN, _BATCH = 32, 128, 64
CONFIG = jaxlora.LoraConfig(rank=4, targets="kernel")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", type=int, default=2, help="1, 2, 4 or 8 (default 2)")
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--out", default=None, help="where to save (default: a temporary dir)")
    parser.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.processes not in (1, 2, 4, 8):
        raise SystemExit(f"--processes must be 1, 2, 4 or 8; got {args.processes}")
    if args.steps < 1:
        raise SystemExit(f"--steps must be at least 1; got {args.steps}")
    out = args.out or tempfile.mkdtemp(prefix="jaxlora-pod-")
    if args.process_id is not None:  # a worker
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if args.processes > 1:
            jax.distributed.initialize(args.coordinator, args.processes, args.process_id)
        train(args.steps, out)
        if args.processes > 1:
            jax.distributed.shutdown()
        return 0
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={_DEVICES // args.processes}",
        "JAX_PLATFORMS": "cpu",
    }
    command = [sys.executable, "-m", "jaxlora", "pod-demo", "--out", out, "--steps"]
    command += [str(args.steps), "--processes", str(args.processes)]
    command += ["--coordinator", f"localhost:{port}"]
    workers = [
        subprocess.Popen([*command, "--process-id", str(i)], env=env) for i in range(args.processes)
    ]
    while any(w.poll() is None for w in workers):
        if any(w.poll() not in (None, 0) for w in workers):  # the others would wait at a barrier
            for w in workers:
                w.kill()
        time.sleep(0.1)
    codes = [w.returncode for w in workers]
    if any(codes):
        print(f"pod-demo: worker exit codes {codes}", file=sys.stderr)
        return 1
    return 0


def _global(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array of a value every process knows (each places its own shards)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _local_rows(mesh: jax.sharding.Mesh, rows: np.ndarray) -> jax.Array:
    """The global batch from this process's rows (as a per-host data loader yields them)."""
    return jaxlora.global_batch(jaxlora.process_rows(rows), NamedSharding(mesh, P("data")))


def _model(params: dict, x: jax.Array) -> jax.Array:
    return jax.nn.relu(x @ params["up"]["kernel"]) @ params["down"]["kernel"]


def train(steps: int, out: str) -> list[float]:
    """Trains a LoRA on a column/row-parallel MLP to match a teacher; saves it; the losses.

    Every process calls it; process 0 prints.
    """
    mesh = jax.make_mesh(
        (len(jax.devices()) // 2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2
    )
    rng = np.random.default_rng(0)
    up = (rng.normal(size=(_D_IN, _D_HIDDEN)) / np.sqrt(_D_IN)).astype(np.float32)
    down = (rng.normal(size=(_D_HIDDEN, _D_IN)) / np.sqrt(_D_HIDDEN)).astype(np.float32)
    change = rng.normal(size=(_D_IN, 4)) @ rng.normal(size=(4, _D_HIDDEN)) / (4 * np.sqrt(_D_IN))
    teacher = {"up": {"kernel": up + change.astype(np.float32)}, "down": {"kernel": down}}
    params = {
        "up": {"kernel": _global(up, NamedSharding(mesh, P(None, "model")))},
        "down": {"kernel": _global(down, NamedSharding(mesh, P("model", None)))},
    }
    split = jax.jit(lambda p: jaxlora.split(p, CONFIG, key=jax.random.key(0)))
    base, delta = split(params)
    tx = optax.adamw(1e-2, weight_decay=0.01)
    apply = jaxlora.lora_apply(_model)

    @jax.jit
    def step(delta, state, base, x, y):  # global arrays are arguments, never closed over
        loss_fn = lambda d: jnp.mean((apply(base, d, x) - y) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(delta)
        updates, state = tx.update(grads, state, delta)
        return optax.apply_updates(delta, updates), state, loss

    primary = jax.process_index() == 0
    if primary:
        print(
            f"pod-demo: {jax.process_count()} process(es), {len(jax.devices())} devices, "
            f"mesh {dict(mesh.shape)}, {jax.local_device_count()} devices per process",
            flush=True,
        )
    state, losses = tx.init(delta), []
    with progress(steps, "training", disable=not primary) as bar:
        for i in range(steps):
            rows = np.random.default_rng(100 + i).normal(size=(_BATCH, _D_IN)).astype(np.float32)
            targets = np.asarray(_model(teacher, rows))  # every host computes its labels alike
            x, y = _local_rows(mesh, rows), _local_rows(mesh, targets)
            delta, state, loss = step(delta, state, base, x, y)
            losses.append(float(loss))
            bar.update()
            if primary and (i % 10 == 0 or i == steps - 1):
                bar.write(f"step {i:3d}  loss {losses[-1]:.6f}", file=sys.stdout)
    path = jaxlora.save_adapter(os.path.join(out, "adapter"), delta, config=CONFIG)
    module = lambda path: path.split("/")[0]  # "up/kernel" -> the PEFT module "up"
    exported = peft.save_peft(os.path.join(out, "peft"), delta, config=CONFIG, key_map=module)
    if primary:
        print(f"saved {path} and the PEFT export {exported}", flush=True)
    return losses
