"""Adapter checkpoints: ``save_adapter`` and ``load_adapter`` (Orbax arrays, JSON metadata).

* :mod:`._directory`: where a checkpoint goes and how a save commits atomically;
* :mod:`._codec`: configs, adapter entries, constants and checksums as JSON;
* :mod:`._adapter`: the two functions, which go through the node protocol.
"""

from jaxlora.io.checkpoint._adapter import load_adapter as load_adapter
from jaxlora.io.checkpoint._adapter import save_adapter as save_adapter

__all__ = ["load_adapter", "save_adapter"]
