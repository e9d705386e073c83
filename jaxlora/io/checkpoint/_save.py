"""``save_adapter``: a delta's arrays (Orbax) and what they mean (JSON), nothing of the base.

A checkpoint is a directory holding ``arrays/`` (an Orbax PyTree checkpoint
of every adapter's trainable arrays), ``constants/`` (the frozen arrays some
variants keep, such as DoRA's base column norms, one ``.npy`` file each, shared
ones once) and ``jaxlora_adapter.json``: the format version, the config (by
its registered kind), and per adapted path its node kind, static metadata and
the shape, dtype and SHA-256 checksum of each array. With ``step=``, a
directory holds one such checkpoint per step in ``step_<n>/`` subdirectories.
Every node type goes through the node protocol (:mod:`jaxlora._node`), so
LoRA, rsLoRA, PiSSA, OLoRA, DoRA, VeRA and AdaLoRA deltas all save and load
bit for bit. Saves are atomic (:mod:`._directory`).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlora import _paths
from jaxlora._checks import delta_items
from jaxlora._hosts import is_primary
from jaxlora._node import Constant, is_delta_leaf
from jaxlora.io.checkpoint import _codec, _directory
from jaxlora.io.checkpoint._directory import ARRAYS, CONSTANTS


def save_adapter(
    directory: str | os.PathLike[str],
    delta: Any,
    *,
    config: Any,
    step: int | None = None,
) -> pathlib.Path:
    """Saves a delta (the adapters alone, no base weights) and its config.

    The save is atomic: everything is written to ``<target>.jaxlora-tmp`` next to
    the target, the JSON metadata last, and the directory is then renamed into
    place. A save killed part-way leaves only that temporary directory, which
    :func:`load_adapter` refuses (and the next save of the same target removes).
    Sharded arrays are written shard by shard by Orbax. Under
    ``jax.distributed`` every process calls ``save_adapter`` with the same
    arguments (as SPMD code does): each writes the shards it holds, process 0
    writes the metadata and commits the rename after a barrier, and no process
    returns before the checkpoint is committed.

    Args:
        directory: without ``step``, the checkpoint directory itself, which must
            not exist or be empty. With ``step``, a directory of checkpoints
            (created if needed) that receives ``step_<step>/``.
        delta: the second output of :func:`jaxlora.split` (a dict, Flax linen
            params or an ``nnx.State`` with adapter nodes of any type and ``None``
            holes), possibly trained and sharded.
        config: the config the delta was made with (:class:`jaxlora.LoraConfig`,
            :class:`jaxlora.variants.VeraConfig`, :class:`jaxlora.variants.AdaLoraConfig`);
            stored in full, after checking that it makes exactly these adapters
            (node type, rank, scale, dropout, dtype). A callable ``targets`` or ``exclude``
            cannot be stored: it is recorded as ``null`` and :func:`load_adapter`
            replaces it (see there).
        step: an int ``>= 0`` to keep numbered checkpoints in ``directory``.

    Returns:
        The absolute path of the written checkpoint (``directory`` or
        ``directory/step_<step>``).

    Raises:
        TypeError: if ``config`` is not an adapter config, if ``delta`` holds
            anything but adapter nodes and ``None`` (or stacked nodes: save each
            adapter), if an adapter's dtype is not ``config.dtype``, or if
            ``step`` is not an int.
        ValueError: if ``delta`` holds no adapter node, if an adapter is not the
            one ``config`` makes at its path (type, rank, scale, dropout) or its arrays do
            not fit its layout, or if ``step`` is negative.
        FileExistsError: if the target checkpoint exists already.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, jaxlora
        >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
        >>> config = jaxlora.LoraConfig(rank=2, targets="dense", use_dora=True)
        >>> base, delta = jaxlora.split(params, config, key=jax.random.key(0))
        >>> root = tempfile.mkdtemp()
        >>> jaxlora.save_adapter(root, delta, config=config, step=100).name
        'step_100'
        >>> restored, restored_config = jaxlora.load_adapter(root)
        >>> restored_config == config, type(restored["dense"]["kernel"]).__name__
        (True, 'DoraNode')
    """
    if not callable(getattr(config, "check_node", None)) or not hasattr(config, "kind"):
        raise TypeError(
            f"config must be the adapter config the delta was made with (jaxlora.LoraConfig or "
            f"a jaxlora.variants config); got {type(config).__name__}. Call "
            "save_adapter(directory, delta, config=config)."
        )
    constants = _codec.Constants()
    entries, holes, arrays = _entries(delta, config, constants)
    target = _directory.save_target(pathlib.Path(directory).expanduser().absolute(), step)
    keys = constants.keys()
    metadata = {
        "format": _codec.FORMAT,
        "format_version": _codec.FORMAT_VERSION,
        "step": step,
        "config": _codec.encode_config(config),
        "adapters": entries,
        "holes": holes,
        "constants": {
            digest: {"key": keys[digest], "shape": list(c.shape), "dtype": c.dtype.name}
            for digest, c in constants.by_digest.items()
        },
    }

    def write_arrays(tmp: pathlib.Path) -> None:
        _orbax_save(tmp / ARRAYS, arrays)  # every process writes the shards it holds
        if not is_primary():
            return
        (tmp / CONSTANTS).mkdir()
        for digest, constant in constants.by_digest.items():
            np.save(tmp / CONSTANTS / f"{keys[digest]}.npy", constant.value, allow_pickle=False)

    _directory.write_atomically(target, write_arrays, metadata)
    return target


def _entries(
    delta: Any, config: Any, constants: _codec.Constants
) -> tuple[list[dict[str, Any]], list[list[Any]], dict[str, dict[str, Any]]]:
    """Metadata entries, hole key paths and the array tree for Orbax; validates the delta."""
    delta_items(delta, "save_adapter")  # every leaf a node or a hole
    flat = jax.tree_util.tree_flatten_with_path(delta, is_leaf=is_delta_leaf)[0]
    entries: list[dict[str, Any]] = []
    holes: list[list[Any]] = []
    arrays: dict[str, dict[str, Any]] = {}
    for key_path, node in flat:
        path = _paths.path_str(key_path)
        keys = [_key_component(k) for k in key_path]
        if node is None:
            holes.append(keys)
            continue
        if node.n_adapters is not None:
            raise TypeError(
                f"delta holds a stack of {node.n_adapters} adapters at {path!r}; save each "
                "adapter on its own (jaxlora.multi.unstack(stacked) gives them back at their own "
                "ranks)."
            )
        node.check_shapes(path)
        _codec.check_node(config, path, node)  # load_adapter repeats it
        if callable(getattr(config, "check_targets", None)):
            config.check_targets(path)
        key = str(len(entries))
        stored: dict[str, Any] = {}
        arrays[key] = {}
        for name, value in node.arrays().items():
            if isinstance(value, Constant):
                stored[name] = constants.ref(value)
                continue
            arrays[key][name] = value
            stored[name] = {
                "shape": list(value.shape),
                "dtype": np.dtype(value.dtype).name,
                "sha256": _codec.checksum(value),
            }
        entries.append(
            {
                "path": path,
                "keys": keys,
                "key": key,
                "kind": node.kind,
                "static": constants.encode(node.static_metadata()),
                "arrays": stored,
            }
        )
    if not entries:
        raise ValueError(
            f"delta holds no adapter node ({len(flat)} leaves, all None); there is no "
            "adapter to save. Pass the second output of jaxlora.split, not its first."
        )
    return entries, holes, arrays


def _key_component(key: Any) -> int | str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            value = getattr(key, attr)
            return value if isinstance(value, int | str) else str(value)
    return str(key)


def _orbax_save(path: pathlib.Path, tree: Any) -> None:
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        checkpointer.save(path, args=ocp.args.StandardSave(tree))
    finally:
        checkpointer.close()
