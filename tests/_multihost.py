"""A two-host pod on one machine: N local processes joined by ``jax.distributed``.

``launch(program, *args, processes=2, devices=4)`` starts ``processes`` Python
processes, each with ``devices`` simulated CPU devices and gloo collectives,
joins them with ``jax.distributed.initialize`` on a free local port, runs
``program(*args)`` (a function of ``tests/_multihost_programs.py``) in every
one and returns each process's JSON-encoded return value, by process index.
If any process fails, the others are killed (as a cluster scheduler would)
and the error says which failed and what it printed.

Run as a script, this module is the worker: ``python tests/_multihost.py
<program> <process id> <processes> <port> <json args>``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

_RESULT = "MULTIHOST-RESULT "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(
    program: str, *args: object, processes: int = 2, devices: int = 4, timeout: float = 120
) -> list[object]:
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), *sys.path]
        ),
    }
    encoded = json.dumps(args)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, program, str(i), str(processes), str(port), encoded],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                outputs = [p.communicate()[0] for p in procs]
                which = f"process {failed[0]}" if failed else f"the run (past {timeout} s)"
                raise RuntimeError(
                    f"{program}: {which} failed; outputs:\n"
                    + "\n".join(f"--- process {i}:\n{out[-3000:]}" for i, out in enumerate(outputs))
                )
            time.sleep(0.05)
        outputs = [p.communicate()[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for i, out in enumerate(outputs):
        lines = [line for line in out.splitlines() if line.startswith(_RESULT)]
        if procs[i].returncode != 0 or not lines:
            raise RuntimeError(f"{program}: process {i} returned no result:\n{out[-3000:]}")
        results.append(json.loads(lines[-1][len(_RESULT) :]))
    return results


def _worker() -> None:
    program, process_id, processes, port, args = sys.argv[1:]
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=int(processes),
        process_id=int(process_id),
    )
    from tests import _multihost_programs

    result = getattr(_multihost_programs, program)(*json.loads(args))
    print(_RESULT + json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    _worker()
