"""``load_adapter``: a checkpoint of :func:`save_adapter` back into a delta and its config."""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxlora import _paths
from jaxlora._checks import describe
from jaxlora._node import AdapterNode, Constant, is_delta_leaf, is_node, node_type
from jaxlora._placement import node_shardings
from jaxlora.io.checkpoint import _codec, _directory
from jaxlora.io.checkpoint._directory import ARRAYS, CONSTANTS, METADATA
from jaxlora.quant import is_quantized


def load_adapter(
    directory: str | os.PathLike[str],
    *,
    base: Any = None,
    step: int | None = None,
    shardings: Any = None,
) -> tuple[Any, Any]:
    """Loads a delta and its config saved by :func:`save_adapter`.

    Every array is checked against the SHA-256 checksum written at save time,
    so a damaged checkpoint never loads silently.

    Args:
        directory: a checkpoint directory, or a directory of ``step_<n>/``
            checkpoints.
        base: optional; the frozen tree the delta applies to (the first output of
            :func:`jaxlora.split`: a dict, Flax linen params or an ``nnx.State``,
            concrete or ``jax.ShapeDtypeStruct`` leaves). The delta then mirrors
            its structure, every stored path must exist in it with the stored
            weight shape, and each adapter is placed like its weight (the rule of
            :mod:`jaxlora.sharding`: ``a`` like the weight's input axes, ``b`` like
            its output axes, rank axes replicated).
        step: the step to load from a directory of steps; ``None`` loads the
            latest committed step (or the checkpoint at ``directory`` itself).
        shardings: optional; where to place the arrays, overriding ``base``: one
            ``jax.sharding.Sharding`` for every array, or a tree like the delta
            whose adapted leaves are nodes of shardings (for example
            ``jax.tree.map(lambda x: x.sharding, delta)``, or the output of
            :func:`jaxlora.adapter_shardings`) or single shardings. Without
            ``base`` and ``shardings`` arrays go to the default device.

    Returns:
        ``(delta, config)``. Without ``base`` the delta is nested dicts built
        from the stored key paths (holes included), so it equals the saved one
        for a dict or linen delta; pass ``base`` to get an ``nnx.State``. The
        config equals the saved one, except that a callable ``targets`` or
        ``exclude`` (which cannot be stored) comes back as ``targets`` = the
        adapted paths, each escaped as an anchored regex (``'^dense/kernel$'``),
        and ``exclude=None``: it selects the same weights.

    Raises:
        FileNotFoundError: if ``directory`` or the requested step is missing.
        ValueError: if the directory is not a jaxlora checkpoint, is an
            incomplete, temporary or damaged one (a checksum or a file that does
            not match, unreadable metadata or arrays: the message names the
            checkpoint and the array), has an unknown format version or an
            invalid stored config; if its metadata was edited (a missing
            checksum, a wrong type, kind, array name, dtype or static value, or
            a stored config that does not make the stored adapters: rank,
            scale, dropout, dtype, node type; the message names the checkpoint,
            says it is damaged or was edited, and names the entry with what was
            expected and found); if a stored path is missing from ``base`` or
            its weight has another shape there; if ``step`` is given for a single
            checkpoint, if ``shardings`` lacks a stored path, or if base's
            weight has a sharding that is neither a ``NamedSharding`` nor
            replicated (pass ``shardings``).
        TypeError: if ``step`` is not an int, or if ``base`` holds adapter
            nodes (a delta was passed as base).

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, jaxlora
        >>> from flax import nnx
        >>> _, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> config = jaxlora.LoraConfig(rank=2, targets="kernel")
        >>> base, delta = jaxlora.split(state, config, key=jax.random.key(0))
        >>> path = jaxlora.save_adapter(tempfile.mkdtemp() + "/adapter", delta, config=config)
        >>> restored, _ = jaxlora.load_adapter(path, base=base)
        >>> type(restored).__name__, restored["kernel"].b.shape, restored["bias"] is None
        ('State', (2, 3), True)
    """
    root = pathlib.Path(directory).expanduser().absolute()
    path = _directory.resolve(root, step)
    metadata = _checked_metadata(path)
    version = metadata["format_version"]
    if version == 1:
        metadata = _from_version_1(metadata, path)
    _codec.check_entries(metadata, version, path)
    entries = metadata["adapters"]
    config = _codec.decode_config(
        metadata["config"], [e["path"] for e in entries], str(path / METADATA)
    )
    constants = _read_constants(path, metadata.get("constants", {}))
    try:
        statics = {e["path"]: _codec.decode_constants(e["static"], constants) for e in entries}
    except (KeyError, TypeError) as e:
        raise _codec.damaged(path, f"a static field refers to no stored constant ({e!r})") from e
    weights: dict[str, Any] = {}
    if base is not None:
        treedef, base_paths, base_leaves = _flatten_base(base)
        weights = {p: _paths.unbox(leaf) for p, leaf in zip(base_paths, base_leaves, strict=True)}
        for entry in entries:
            _check_against_base(entry, statics[entry["path"]], weights, path)
    targets = {}
    for entry in entries:
        placement = _placement(entry, statics[entry["path"]], weights, shardings)
        targets[entry["key"]] = {
            name: jax.ShapeDtypeStruct(
                tuple(spec["shape"]), jnp.dtype(spec["dtype"]), sharding=placement[name]
            )
            for name, spec in _trainable_specs(entry).items()
        }
    restored = _orbax_restore(path, targets)
    nodes = {}
    for entry in entries:
        arrays = dict(restored[entry["key"]])
        for name, spec in _trainable_specs(entry).items():
            if "sha256" in spec and _codec.checksum(arrays[name]) != spec["sha256"]:  # format 2
                raise ValueError(
                    f"the checkpoint {str(path)!r} is damaged: the array {name!r} of the adapter "
                    f"at {entry['path']!r} does not match the checksum written when it was saved. "
                    "Restore the checkpoint from a copy, or load another step."
                )
        for name, ref in entry["arrays"].items():
            if "constant" in ref:
                arrays[name] = constants[ref["constant"]]
        node = _node(entry, arrays, statics[entry["path"]], path, config)
        weight = weights.get(entry["path"])
        nodes[entry["path"]] = node if weight is None else node.with_base(weight)
    if base is not None:
        return treedef.unflatten([nodes.get(p) for p in base_paths]), config
    return _nested_dict(entries, metadata["holes"], nodes), config


def _checked_metadata(path: pathlib.Path) -> dict[str, Any]:
    metadata = _directory.read_json(path)
    file = path / METADATA
    if not isinstance(metadata, dict) or metadata.get("format") != _codec.FORMAT:
        raise ValueError(
            f"{str(file)!r} does not describe a jaxlora adapter (expected "
            f"format={_codec.FORMAT!r}); pass a directory written by save_adapter."
        )
    version = metadata.get("format_version")
    readable = list(_codec.READABLE_VERSIONS)
    if type(version) is not int:
        raise _codec.damaged(
            path,
            f"'format_version' should be an int (this jaxlora reads versions {readable}); "
            f"found {version!r}",
        )
    if version < min(readable):
        raise _codec.damaged(
            path, f"'format_version' is {version}, and jaxlora formats are versions {readable}"
        )
    if version not in _codec.READABLE_VERSIONS:
        raise ValueError(
            f"{str(path)!r} has adapter format version {version!r}, and this jaxlora reads "
            f"versions {list(_codec.READABLE_VERSIONS)}. Load it with the jaxlora that wrote it "
            "(a newer version reads newer formats)."
        )
    missing = [k for k in ("config", "adapters", "holes") if k not in metadata]
    if missing:
        raise ValueError(
            f"{str(file)!r} lacks {missing}; the checkpoint is damaged or was edited. Save the "
            "adapter again."
        )
    if not (path / ARRAYS).is_dir():
        raise ValueError(
            f"{str(path)!r} has {METADATA} but no {ARRAYS}/ directory; the checkpoint is "
            "damaged (files were removed after it was saved)."
        )
    return metadata


def _from_version_1(metadata: dict[str, Any], path: pathlib.Path) -> dict[str, Any]:
    """Format 1 (LoRA only, the scale an array): entries in format 2's shape.

    The scale array becomes static metadata once restored; it is marked here
    with ``"scale": None`` and filled by :func:`_node`.
    """
    entries = []
    try:
        for e in metadata["adapters"]:
            layout = e["layout"]
            stacked, rank = list(layout["stacked"]), e["rank"]
            shapes = {
                "a": [*stacked, math.prod(layout["inputs"]), rank],
                "b": [*stacked, rank, math.prod(layout["outputs"])],
                "scale": [],
            }
            arrays = {n: {"shape": s, "dtype": e["dtypes"][n]} for n, s in shapes.items()}
            static = {"layout": layout, "dropout": e["dropout"], "scale": None}
            entries.append({**e, "kind": "lora", "static": static, "arrays": arrays})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _codec.damaged(
            path,
            "its metadata says format version 1, but its adapter entries are not version 1's "
            f"({type(e).__name__}: {e})",
        ) from e
    return {**metadata, "adapters": entries}


def _trainable_specs(entry: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {name: spec for name, spec in entry["arrays"].items() if "constant" not in spec}


def _read_constants(path: pathlib.Path, stored: Mapping[str, Any]) -> dict[str, Constant]:
    out = {}
    for digest, spec in stored.items():
        file = path / CONSTANTS / f"{spec['key']}.npy"
        try:
            value = np.load(file, allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"the checkpoint {str(path)!r} is damaged: its constant {str(file)!r} cannot be "
                f"read ({e}). Restore the checkpoint from a copy."
            ) from None
        constant = Constant(value)
        if constant.digest != digest:
            raise ValueError(
                f"the checkpoint {str(path)!r} is damaged: the constant {str(file)!r} does not "
                "match the checksum written when it was saved. Restore it from a copy."
            )
        out[digest] = constant
    return out


def _node(
    entry: Mapping[str, Any],
    arrays: dict[str, Any],
    static: dict[str, Any],
    path: pathlib.Path,
    config: Any,
) -> AdapterNode:
    """The entry's node, checked against its shapes and against the stored config."""
    where = entry["path"]
    if static.get("scale", 0.0) is None:  # format 1: a float32 array, of the config's scale
        scale = float(np.asarray(arrays.pop("scale")))
        exact = getattr(config, "scale_for", lambda _: scale)(where)
        static = {**static, "scale": exact if np.float32(exact) == np.float32(scale) else scale}
    try:
        node = node_type(entry["kind"]).from_saved(arrays, static)
        node.check_shapes(where)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"the checkpoint {str(path)!r} is damaged or was edited: the adapter at "
            f"{where!r} cannot be rebuilt ({type(e).__name__}: {e}). Save it again."
        ) from e
    _codec.check_against_config(config, where, node, path)
    return node


def _flatten_base(base: Any) -> tuple[Any, list[str], list[Any]]:
    is_leaf = lambda x: _paths.is_box(x) or is_quantized(x) or is_node(x)
    flat, treedef = jax.tree_util.tree_flatten_with_path(base, is_leaf=is_leaf)
    for key_path, leaf in flat:
        if is_node(leaf):
            raise TypeError(
                f"base holds an adapter node at {jax.tree_util.keystr(key_path)}: it is a "
                "delta. Pass the frozen tree, the first output of jaxlora.split "
                "(base, delta = jaxlora.split(...)), as base."
            )
    return treedef, [_paths.path_str(p) for p, _ in flat], [leaf for _, leaf in flat]


def _check_against_base(
    entry: Mapping[str, Any], static: Mapping[str, Any], weights: Mapping[str, Any], path: Any
) -> None:
    where = entry["path"]
    expected = tuple(_layout(static).shape)
    if where not in weights:
        near = [p for p in weights if p.rsplit("/", 1)[-1] == where.rsplit("/", 1)[-1]][:3]
        raise ValueError(
            f"the checkpoint {str(path)!r} has an adapter at {where!r} for a weight of shape "
            f"{expected}, but base has no such path (paths there look like "
            f"{near or list(weights)[:3]}). Pass the base of the model this adapter was "
            "trained on, or load without base and rename the paths."
        )
    weight = weights[where]
    found = tuple(weight.shape) if hasattr(weight, "shape") else describe(weight)
    if found != expected:
        raise ValueError(
            f"the checkpoint {str(path)!r} has an adapter at {where!r} for a weight of shape "
            f"{expected}, but base holds {found} there. Pass the base of the model this adapter "
            "was trained on (same sizes), or load without base."
        )


def _layout(static: Mapping[str, Any]) -> _paths.Layout:
    return _paths.Layout(*(tuple(static["layout"][k]) for k in ("stacked", "inputs", "outputs")))


def _placement(
    entry: Mapping[str, Any], static: Mapping[str, Any], weights: Mapping[str, Any], shardings: Any
) -> dict[str, Any]:
    """``array name -> sharding``: from ``shardings=``, else like base's weight, else one device."""
    names = list(_trainable_specs(entry))
    where = entry["path"]
    if isinstance(shardings, jax.sharding.Sharding):
        return dict.fromkeys(names, shardings)
    if shardings is not None:
        given = _shardings_by_path(shardings)
        if where not in given:
            raise ValueError(
                f"shardings has no sharding for the stored adapter at {where!r}. Pass a tree "
                "like the delta (e.g. jax.tree.map(lambda x: x.sharding, delta)) or one "
                "jax.sharding.Sharding."
            )
        leaf = given[where]
        if isinstance(leaf, jax.sharding.Sharding):
            return dict.fromkeys(names, leaf)
        return {name: getattr(leaf, name) for name in names}
    sharding = getattr(weights.get(where), "sharding", None)
    if sharding is None:
        return dict.fromkeys(names, _default_sharding())
    if isinstance(sharding, jax.sharding.NamedSharding):
        skeleton = node_type(entry["kind"]).from_saved(
            {
                n: jax.ShapeDtypeStruct(tuple(s["shape"]), jnp.dtype(s["dtype"]))
                for n, s in _trainable_specs(entry).items()
            },
            static,
        )
        placed = node_shardings(skeleton, sharding)
        return {name: getattr(placed, name) for name in names}
    if sharding.is_fully_replicated:
        return dict.fromkeys(names, sharding)
    raise ValueError(
        f"cannot place the adapter at {where!r} like its weight: base's weight there has a "
        f"{type(sharding).__name__}, and adapter shardings are derived from NamedSharding "
        "only. Pass shardings= (a tree like the delta of shardings)."
    )


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's own


def _shardings_by_path(shardings: Any) -> dict[str, Any]:
    """``path -> node of shardings or one sharding`` from a delta-like tree of shardings."""
    is_leaf = lambda x: is_delta_leaf(x) or isinstance(x, jax.sharding.Sharding)
    by_path = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(shardings, is_leaf=is_leaf)[0]:
        if leaf is not None:
            by_path[_paths.path_str(key_path)] = leaf
    return by_path


def _nested_dict(entries: list[dict[str, Any]], holes: list[list[Any]], nodes: dict) -> Any:
    items = [(e["keys"], nodes[e["path"]]) for e in entries] + [(k, None) for k in holes]
    if len(items) == 1 and not items[0][0]:
        return items[0][1]  # the delta was a single node
    tree: dict[Any, Any] = {}
    for keys, value in items:
        here = tree
        for k in keys[:-1]:
            here = here.setdefault(k, {})
        here[keys[-1]] = value
    return tree


def _orbax_restore(path: pathlib.Path, targets: Any) -> Any:
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        return checkpointer.restore(path / ARRAYS, args=ocp.args.StandardRestore(targets))
    except Exception as e:  # tensorstore/orbax errors: corrupted or truncated data files
        raise ValueError(
            f"the checkpoint {str(path)!r} is damaged: Orbax cannot read its arrays "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}). Restore "
            "the checkpoint from a copy, or load another step."
        ) from None
    finally:
        checkpointer.close()
