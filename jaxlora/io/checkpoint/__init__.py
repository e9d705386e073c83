"""Adapter checkpoints: ``save_adapter`` and ``load_adapter`` (Orbax arrays, JSON metadata).

* :mod:`._directory`: where a checkpoint goes and how a save commits atomically;
* :mod:`._codec`: configs, adapter entries, constants and checksums as JSON;
* :mod:`._save` and :mod:`._load`: the two functions, which go through the node protocol.
"""

from jaxlora.io.checkpoint._load import load_adapter as load_adapter
from jaxlora.io.checkpoint._save import save_adapter as save_adapter

__all__ = ["load_adapter", "save_adapter"]
