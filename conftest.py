"""Root test configuration, loaded by pytest before any test module or doctest.

The whole suite (``tests/`` and the doctests in ``jaxlora/``) runs on 8
simulated CPU devices, with XLA's memory-minimizing CPU scheduler, so that
sharding tests can build real meshes on one machine. XLA reads ``XLA_FLAGS``
when JAX starts its backend, so the flag is set here, before anything imports
JAX; flags already in the environment are kept.
"""

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_N_DEVICES = 8

if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        f for f in (os.environ.get("XLA_FLAGS", ""), f"{_DEVICE_FLAG}={_N_DEVICES}") if f
    )

# Memory plans read in tests should be the memory-minimizing ones that GPU and
# TPU backends produce, not the CPU backend's concurrency-first schedule (see
# jaxlora.memory). Set here, before JAX starts its backend.
_MEMORY_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if _MEMORY_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_MEMORY_FLAG}".strip()

# Fixtures and references shared by several test modules (tests/fixtures.py).
pytest_plugins = ["tests.fixtures"]
