"""Adapter checkpoints: a delta's arrays (Orbax) and what they mean (JSON), nothing of the base.

A checkpoint is a directory holding ``arrays/`` (an Orbax PyTree checkpoint of
``a``, ``b`` and ``scale`` per adapted path) and ``jaxlora_adapter.json``: the
format version, the :class:`~jaxlora.LoraConfig`, and per adapted path its key
path, layout, rank, dtypes and dropout. With ``step=``, a directory holds one
such checkpoint per step in ``step_<n>/`` subdirectories.

A save never leaves a checkpoint that loads as if complete: it writes into a
sibling ``<name>.jaxlora-tmp`` directory, writes the JSON metadata last (it is
the commit marker), and renames the directory into place. Loading refuses
temporary directories and directories without metadata; loading the latest step
skips steps that were never committed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import pathlib
import re
import shutil
from collections.abc import Mapping
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _paths
from jaxlora._config import LoraConfig
from jaxlora._delta import LoraNode, is_delta_leaf, is_node

_FORMAT = "jaxlora.adapter"
_FORMAT_VERSION = 1
_METADATA = "jaxlora_adapter.json"
_ARRAYS = "arrays"
_TMP_SUFFIX = ".jaxlora-tmp"
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_STEP = re.compile(r"^step_(\d+)$")
_CALLABLE_FIELDS = ("targets", "exclude")
_LAYOUT_FIELDS = ("stacked", "inputs", "outputs")


def save_adapter(
    directory: str | os.PathLike[str],
    delta: Any,
    *,
    config: LoraConfig,
    step: int | None = None,
) -> pathlib.Path:
    """Saves a delta (the adapters alone, no base weights) and its config.

    The save is atomic: everything is written to ``<target>.jaxlora-tmp`` next to
    the target, the JSON metadata last, and the directory is then renamed into
    place. A save killed part-way leaves only that temporary directory, which
    :func:`load_adapter` refuses (and the next save of the same target removes).
    Runs in one process (any number of local devices); sharded arrays are
    written shard by shard by Orbax.

    Args:
        directory: without ``step``, the checkpoint directory itself, which must
            not exist or be empty. With ``step``, a directory of checkpoints
            (created if needed) that receives ``step_<step>/``.
        delta: the second output of :func:`jaxlora.split` (a dict, Flax linen
            params or an ``nnx.State`` with :class:`~jaxlora.LoraNode` leaves and
            ``None`` holes), possibly trained and sharded.
        config: the config the delta was made with; stored in full. A callable
            ``targets`` or ``exclude`` cannot be stored: it is recorded as
            ``null`` and :func:`load_adapter` replaces it (see there).
        step: an int ``>= 0`` to keep numbered checkpoints in ``directory``.

    Returns:
        The absolute path of the written checkpoint (``directory`` or
        ``directory/step_<step>``).

    Raises:
        TypeError: if ``config`` is not a ``LoraConfig``, if ``delta`` holds
            anything but adapter nodes and ``None``, if an adapter's dtype is not
            ``config.dtype``, or if ``step`` is not an int.
        ValueError: if ``delta`` holds no adapter node, if an adapter's rank is not
            the one ``config`` gives its path, or if ``step`` is negative.
        FileExistsError: if the target checkpoint exists already.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, jaxlora
        >>> from jaxlora.io.checkpoint import load_adapter, save_adapter
        >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
        >>> config = jaxlora.LoraConfig(rank=2, targets="dense")
        >>> base, delta = jaxlora.split(params, config, key=jax.random.key(0))
        >>> root = tempfile.mkdtemp()
        >>> save_adapter(root, delta, config=config, step=100).name
        'step_100'
        >>> restored, restored_config = load_adapter(root)
        >>> restored_config == config, restored["dense"]["kernel"].a.shape
        (True, (4, 2))
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"config must be the jaxlora.LoraConfig the delta was made with; got "
            f"{type(config).__name__}. Call save_adapter(directory, delta, config=config)."
        )
    entries, holes, arrays = _flatten_delta(delta, config)
    root = pathlib.Path(directory).expanduser().absolute()
    if step is None:
        target = root
        if target.exists() and not target.is_dir():
            raise FileExistsError(f"{str(target)!r} is a file; pass a directory path.")
        if target.is_dir() and any(target.iterdir()):
            raise FileExistsError(
                f"{str(target)!r} exists and is not empty; save_adapter does not overwrite. "
                "Pass a new directory, remove this one, or pass step= to keep numbered "
                "checkpoints in it."
            )
    else:
        _check_step(step)
        if (root / _METADATA).exists():
            raise ValueError(
                f"{str(root)!r} is a single checkpoint (saved without step=), not a directory "
                "of steps. Save steps to another directory."
            )
        target = root / f"step_{step}"
        if target.exists():
            raise FileExistsError(
                f"step {step} exists already at {str(target)!r}; save_adapter does not "
                "overwrite. Save a new step or remove this one."
            )
    metadata = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "step": step,
        "config": _encode_config(config),
        "adapters": entries,
        "holes": holes,
    }
    tmp = target.with_name(target.name + _TMP_SUFFIX)
    target.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():  # left by an interrupted save of the same target
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _orbax_save(tmp / _ARRAYS, arrays)
        _write_json(tmp / _METADATA, metadata)  # the commit marker: written last
        _fsync_dir(tmp)
        if target.is_dir():
            target.rmdir()  # empty (checked above); rename cannot replace a directory
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    return target


def load_adapter(
    directory: str | os.PathLike[str],
    *,
    base: Any = None,
    step: int | None = None,
    shardings: Any = None,
) -> tuple[Any, LoraConfig]:
    """Loads a delta and its config saved by :func:`save_adapter`.

    Args:
        directory: a checkpoint directory, or a directory of ``step_<n>/``
            checkpoints.
        base: optional; the frozen tree the delta applies to (the first output of
            :func:`jaxlora.split`: a dict, Flax linen params or an ``nnx.State``,
            concrete or ``jax.ShapeDtypeStruct`` leaves). The delta then mirrors
            its structure, every stored path must exist in it with the stored
            weight shape, and each adapter is placed like its weight: ``a``
            sharded like the weight's input axes, ``b`` like its output axes, the
            rank axis and the scale replicated.
        step: the step to load from a directory of steps; ``None`` loads the
            latest committed step (or the checkpoint at ``directory`` itself).
        shardings: optional; where to place the arrays, overriding ``base``: one
            ``jax.sharding.Sharding`` for every array, or a tree like the delta
            whose adapted leaves are ``LoraNode`` s of shardings (for example
            ``jax.tree.map(lambda x: x.sharding, delta)``) or single shardings.
            Without ``base`` and ``shardings`` arrays go to the default device.

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
            incomplete or temporary one, has an unknown format version or an
            invalid stored config; if a stored path is missing from ``base`` or
            its weight has another shape there; if ``step`` is given for a single
            checkpoint, if ``shardings`` lacks a stored path, or if base's
            weight has a sharding that is neither a ``NamedSharding`` nor
            replicated (pass ``shardings``).
        TypeError: if ``step`` is not an int, or if ``base`` holds adapter
            nodes (a delta was passed as base).

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, jaxlora
        >>> from flax import nnx
        >>> from jaxlora.io.checkpoint import load_adapter, save_adapter
        >>> _, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> config = jaxlora.LoraConfig(rank=2, targets="kernel")
        >>> base, delta = jaxlora.split(state, config, key=jax.random.key(0))
        >>> path = save_adapter(tempfile.mkdtemp() + "/adapter", delta, config=config)
        >>> restored, _ = load_adapter(path, base=base)
        >>> type(restored).__name__, restored["kernel"].b.shape, restored["bias"] is None
        ('State', (2, 3), True)
    """
    if step is not None:
        _check_step(step)
    root = pathlib.Path(directory).expanduser().absolute()
    path = _resolve_checkpoint(root, step)
    metadata = _read_metadata(path)
    entries = metadata["adapters"]
    config = _decode_config(metadata["config"], entries, path)
    weights: dict[str, Any] = {}
    if base is not None:
        treedef, base_paths, base_leaves = _flatten_base(base)
        weights = {p: _paths.unbox(leaf) for p, leaf in zip(base_paths, base_leaves, strict=True)}
        for entry in entries:
            _check_against_base(entry, weights, path)
    placements = _placements(entries, weights, shardings)
    targets = {
        entry["key"]: {
            name: jax.ShapeDtypeStruct(shape, jnp.dtype(entry["dtypes"][name]), sharding=where)
            for (name, shape), where in zip(
                _array_shapes(entry).items(), placements[entry["path"]], strict=True
            )
        }
        for entry in entries
    }
    restored = _orbax_restore(path / _ARRAYS, targets)
    nodes = {}
    for entry in entries:
        arrays = restored[entry["key"]]
        layout = _paths.Layout(*(tuple(entry["layout"][k]) for k in _LAYOUT_FIELDS))
        nodes[entry["path"]] = LoraNode(
            arrays["a"], arrays["b"], arrays["scale"], layout=layout, dropout=entry["dropout"]
        )
    if base is not None:
        return treedef.unflatten([nodes.get(p) for p in base_paths]), config
    return _nested_dict(entries, metadata["holes"], nodes), config


# ----------------------------------------------------------------------------- saving


def _flatten_delta(
    delta: Any, config: LoraConfig
) -> tuple[list[dict[str, Any]], list[list[Any]], dict[str, dict[str, Any]]]:
    """Metadata entries, hole key paths and the array tree for Orbax; validates the delta."""
    flat = jax.tree_util.tree_flatten_with_path(delta, is_leaf=is_delta_leaf)[0]
    entries: list[dict[str, Any]] = []
    holes: list[list[Any]] = []
    arrays: dict[str, dict[str, Any]] = {}
    for key_path, leaf in flat:
        path = _paths.path_str(key_path)
        keys = [_key_component(k) for k in key_path]
        if leaf is None:
            holes.append(keys)
            continue
        if is_node(leaf) and type(leaf) is not LoraNode:
            raise TypeError(
                f"save_adapter supports plain LoRA adapters; {path!r} holds a "
                f"{type(leaf).__name__} (DoRA, VeRA and AdaLoRA checkpoints are not supported "
                "yet; for AdaLoRA save jaxlora.variants.to_lora(delta))"
            )
        if not is_node(leaf):
            raise TypeError(
                f"delta holds {_describe(leaf)} at {jax.tree_util.keystr(key_path)}; a delta has "
                "jaxlora.LoraNode leaves and None holes. Pass the second output of "
                "jaxlora.split (base, delta = jaxlora.split(params, config, key=key))."
            )
        _check_node(path, leaf, config)
        key = str(len(entries))
        leaves = {
            "a": _as_array(leaf.a, config.dtype),
            "b": _as_array(leaf.b, config.dtype),
            "scale": _as_array(leaf.scale, np.float32),
        }
        arrays[key] = leaves
        entries.append(
            {
                "path": path,
                "keys": keys,
                "key": key,
                "layout": {k: list(getattr(leaf.layout, k)) for k in _LAYOUT_FIELDS},
                "rank": int(leaf.rank),
                "dtypes": {name: np.dtype(x.dtype).name for name, x in leaves.items()},
                "dropout": float(leaf.dropout),
            }
        )
    if not entries:
        raise ValueError(
            f"delta holds no jaxlora.LoraNode ({len(flat)} leaves, all None); there is no "
            "adapter to save. Pass the second output of jaxlora.split, not its first."
        )
    return entries, holes, arrays


def _check_node(path: str, node: LoraNode, config: LoraConfig) -> None:
    layout = node.layout
    want_a = (*layout.stacked, layout.n_in, node.rank)
    want_b = (*layout.stacked, node.rank, layout.n_out)
    if tuple(node.a.shape) != want_a or tuple(node.b.shape) != want_b:
        raise ValueError(
            f"the adapter at {path!r} has a: {tuple(node.a.shape)}, b: {tuple(node.b.shape)}, "
            f"but its layout {layout} needs a: {want_a}, b: {want_b}. Save the delta that "
            "jaxlora.split made (or keep a and b in its shapes)."
        )
    if node.rank != config.rank_for(path):
        raise ValueError(
            f"the adapter at {path!r} has rank {node.rank}, but config gives that path rank "
            f"{config.rank_for(path)}. Pass the config the delta was made with."
        )
    want = jnp.dtype(config.dtype)
    for name in ("a", "b"):
        found = jnp.dtype(getattr(node, name).dtype)
        if found != want:
            raise TypeError(
                f"the adapter at {path!r} has {name} of dtype {found.name}, but "
                f"config.dtype is {want.name}. Pass the config the delta was made with, or "
                f"dataclasses.replace(config, dtype=jnp.{found.name}) if you cast the delta."
            )


def _as_array(x: Any, dtype: Any) -> Any:
    """``x`` itself if it is an array; a Python number becomes a ``dtype`` array."""
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x, dtype)


def _key_component(key: Any) -> int | str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            value = getattr(key, attr)
            return value if isinstance(value, int | str) else str(value)
    return str(key)


def _check_step(step: Any) -> None:
    if not isinstance(step, numbers.Integral) or isinstance(step, bool):
        raise TypeError(f"step must be an int or None; got {step!r} ({type(step).__name__})")
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")


def _write_json(path: pathlib.Path, data: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _fsync_dir(path: pathlib.Path) -> None:
    """Makes a rename in ``path`` durable (POSIX; elsewhere directories cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- config


def _encode_config(config: LoraConfig) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    dropped = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in _CALLABLE_FIELDS and callable(value):
            fields[field.name] = None
            dropped.append(field.name)
        elif field.name == "dtype":
            fields[field.name] = _encode_dtype(value)
        else:
            fields[field.name] = _encode_value(field.name, value)
    return {"fields": fields, "callables": dropped}


def _encode_value(name: str, value: Any) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        return {"mapping": [[str(k), _encode_value(name, v)] for k, v in value.items()]}
    if isinstance(value, tuple | list):
        return {"tuple": [_encode_value(name, v) for v in value]}
    raise TypeError(
        f"config.{name} holds {value!r} ({type(value).__name__}), which cannot be stored as "
        "JSON. Use the value types LoraConfig documents."
    )


def _encode_dtype(value: Any) -> dict[str, str]:
    if isinstance(value, str):
        kind = "str"
    elif isinstance(value, np.dtype):
        kind = "numpy"
    elif type(value).__module__.startswith("jax"):
        kind = "jax"  # jnp.float32 and friends, the default
    else:
        kind = "type"  # np.float32, ml_dtypes.bfloat16
    return {"dtype": jnp.dtype(value).name, "kind": kind}


def _decode_dtype(value: Mapping[str, str]) -> Any:
    dtype = jnp.dtype(value["dtype"])
    return {
        "str": value["dtype"],
        "numpy": dtype,
        "jax": getattr(jnp, dtype.name, dtype),
        "type": dtype.type,
    }[value["kind"]]


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict) and "mapping" in value:
        return {k: _decode_value(v) for k, v in value["mapping"]}
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_decode_value(v) for v in value["tuple"])
    return value


def _decode_config(
    stored: Mapping[str, Any], entries: list[dict[str, Any]], path: pathlib.Path
) -> LoraConfig:
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    try:
        fields = dict(stored["fields"])
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown fields {unknown}")
        kwargs = {
            k: _decode_dtype(v) if k == "dtype" else _decode_value(v) for k, v in fields.items()
        }
        if stored.get("callables"):
            kwargs["targets"] = tuple(f"^{re.escape(e['path'])}$" for e in entries)
            kwargs["exclude"] = None
        return LoraConfig(**kwargs)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(
            f"the config stored in {str(path / _METADATA)!r} is invalid: "
            f"{type(e).__name__}: {e}. The file was edited or written by an incompatible "
            "jaxlora; save the adapter again."
        ) from None


# ----------------------------------------------------------------------------- loading


def _is_tmp(path: pathlib.Path) -> bool:
    return _TMP_SUFFIX in path.name or _ORBAX_TMP_SUFFIX in path.name


def _resolve_checkpoint(root: pathlib.Path, step: int | None) -> pathlib.Path:
    if _is_tmp(root):
        raise ValueError(
            f"{str(root)!r} is the temporary directory of a save that did not finish; it "
            "may be incomplete and is never loaded. Load the checkpoint it was meant to "
            "become, or an earlier step, and delete it."
        )
    if not root.exists():
        tmp = root.with_name(root.name + _TMP_SUFFIX)
        hint = (
            f" (only {str(tmp)!r} exists: a save that was interrupted before it completed)"
            if tmp.exists()
            else ""
        )
        raise FileNotFoundError(f"no adapter checkpoint at {str(root)!r}{hint}.")
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is a file, not an adapter checkpoint directory.")
    if (root / _METADATA).exists():
        if step is not None:
            raise ValueError(
                f"{str(root)!r} is a single checkpoint (saved without step=); load it with "
                "step=None."
            )
        return root
    steps = _committed_steps(root)
    if step is not None:
        target = root / f"step_{step}"
        if step in steps:
            return target
        if target.with_name(target.name + _TMP_SUFFIX).exists():
            raise ValueError(
                f"step {step} in {str(root)!r} is incomplete: its save was interrupted before "
                f"it committed. Committed steps: {sorted(steps) or 'none'}."
            )
        if target.exists():
            _not_a_checkpoint(target)
        raise FileNotFoundError(
            f"no step {step} in {str(root)!r}; committed steps: {sorted(steps) or 'none'}."
        )
    if steps:
        return root / f"step_{max(steps)}"
    pending = sorted(p.name for p in root.iterdir() if _is_tmp(p))
    if pending:
        raise ValueError(
            f"{str(root)!r} holds no complete adapter checkpoint, only the temporary "
            f"directories {pending} of saves that were interrupted before they committed."
        )
    _not_a_checkpoint(root)


def _committed_steps(root: pathlib.Path) -> set[int]:
    steps = set()
    for child in root.iterdir():
        match = _STEP.match(child.name)
        if match and (child / _METADATA).is_file():
            steps.add(int(match.group(1)))
    return steps


def _not_a_checkpoint(path: pathlib.Path) -> NoReturn:
    has_arrays = (path / _ARRAYS).exists()
    reason = (
        f"it has {_ARRAYS}/ but no {_METADATA}: an incomplete save (the metadata is written last)"
        if has_arrays
        else f"it has neither {_METADATA} nor step_<n>/ subdirectories"
    )
    raise ValueError(
        f"{str(path)!r} is not a jaxlora adapter checkpoint: {reason}. Pass a directory "
        "written by jaxlora.io.checkpoint.save_adapter."
    )


def _read_metadata(path: pathlib.Path) -> dict[str, Any]:
    file = path / _METADATA
    try:
        metadata = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{str(file)!r} cannot be read as JSON ({e}); it is not a jaxlora adapter checkpoint."
        ) from None
    if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT:
        raise ValueError(
            f"{str(file)!r} does not describe a jaxlora adapter (expected "
            f"format={_FORMAT!r}); pass a directory written by save_adapter."
        )
    version = metadata.get("format_version")
    if version != _FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has adapter format version {version!r}, and this jaxlora reads "
            f"version {_FORMAT_VERSION}. Load it with the jaxlora that wrote it (a newer "
            "version reads newer formats)."
        )
    missing = [k for k in ("config", "adapters", "holes") if k not in metadata]
    if missing:
        raise ValueError(
            f"{str(file)!r} lacks {missing}; the checkpoint is damaged or was edited. Save the "
            "adapter again."
        )
    if not (path / _ARRAYS).is_dir():
        raise ValueError(
            f"{str(path)!r} has {_METADATA} but no {_ARRAYS}/ directory; the checkpoint is "
            "damaged (files were removed after it was saved)."
        )
    return metadata


def _array_shapes(entry: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    layout = entry["layout"]
    stacked, rank = tuple(layout["stacked"]), entry["rank"]
    return {
        "a": (*stacked, math.prod(layout["inputs"]), rank),
        "b": (*stacked, rank, math.prod(layout["outputs"])),
        "scale": (),
    }


def _flatten_base(base: Any) -> tuple[Any, list[str], list[Any]]:
    from jaxlora.quant import is_quantized

    is_leaf = lambda x: _paths.is_box(x) or is_quantized(x) or is_node(x)
    flat, treedef = jax.tree_util.tree_flatten_with_path(base, is_leaf=is_leaf)
    for key_path, leaf in flat:
        if is_node(leaf):
            raise TypeError(
                f"base holds a jaxlora.LoraNode at {jax.tree_util.keystr(key_path)}: it is a "
                "delta. Pass the frozen tree, the first output of jaxlora.split "
                "(base, delta = jaxlora.split(...)), as base."
            )
    return treedef, [_paths.path_str(p) for p, _ in flat], [leaf for _, leaf in flat]


def _check_against_base(
    entry: Mapping[str, Any], weights: Mapping[str, Any], path: pathlib.Path
) -> None:
    where = entry["path"]
    expected = tuple(d for k in _LAYOUT_FIELDS for d in entry["layout"][k])
    if where not in weights:
        near = [p for p in weights if p.rsplit("/", 1)[-1] == where.rsplit("/", 1)[-1]][:3]
        raise ValueError(
            f"the checkpoint {str(path)!r} has an adapter at {where!r} for a weight of shape "
            f"{expected}, but base has no such path (paths there look like "
            f"{near or list(weights)[:3]}). Pass the base of the model this adapter was "
            "trained on, or load without base and rename the paths."
        )
    weight = weights[where]
    found = tuple(weight.shape) if hasattr(weight, "shape") else _describe(weight)
    if found != expected:
        raise ValueError(
            f"the checkpoint {str(path)!r} has an adapter at {where!r} for a weight of shape "
            f"{expected}, but base holds {found} there. Pass the base of the model this adapter "
            "was trained on (same sizes), or load without base."
        )


def _placements(
    entries: list[dict[str, Any]], weights: Mapping[str, Any], shardings: Any
) -> dict[str, tuple[Any, Any, Any]]:
    """``path -> (a, b, scale)`` shardings: ``shardings=``, else like base, else one device."""
    if isinstance(shardings, jax.sharding.Sharding):
        return {e["path"]: (shardings,) * 3 for e in entries}
    if shardings is not None:
        given = _shardings_by_path(shardings)
        for entry in entries:
            if entry["path"] not in given:
                raise ValueError(
                    f"shardings has no sharding for the stored adapter at {entry['path']!r}. "
                    "Pass a tree like the delta (e.g. jax.tree.map(lambda x: x.sharding, delta)) "
                    "or one jax.sharding.Sharding."
                )
        return given
    if weights:
        return {
            e["path"]: _shardings_like(getattr(weights[e["path"]], "sharding", None), e)
            for e in entries
        }
    return {e["path"]: (_default_sharding(),) * 3 for e in entries}


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _shardings_like(sharding: Any, entry: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """``(a, b, scale)`` shardings from the base weight's (the rule of :mod:`jaxlora.sharding`)."""
    from jaxlora.sharding import factor_specs

    if sharding is None:
        return (_default_sharding(),) * 3
    if isinstance(sharding, jax.sharding.NamedSharding):
        layout = _paths.Layout(*(tuple(entry["layout"][k]) for k in _LAYOUT_FIELDS))
        a_spec, b_spec = factor_specs(sharding.spec, layout, dict(sharding.mesh.shape))
        make = lambda spec: jax.sharding.NamedSharding(
            sharding.mesh, spec, memory_kind=sharding.memory_kind
        )
        return make(a_spec), make(b_spec), make(jax.sharding.PartitionSpec())
    if sharding.is_fully_replicated:
        return (sharding,) * 3
    raise ValueError(
        f"cannot place the adapter at {entry['path']!r} like its weight: base's weight there "
        f"has a {type(sharding).__name__}, and adapter shardings are derived from "
        "NamedSharding only. Pass shardings= (a tree like the delta of shardings)."
    )


def _shardings_by_path(shardings: Any) -> dict[str, tuple[Any, Any, Any]]:
    """``path -> (a, b, scale)`` shardings from a delta-like tree of shardings."""
    is_leaf = lambda x: is_delta_leaf(x) or isinstance(x, jax.sharding.Sharding)
    by_path = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(shardings, is_leaf=is_leaf)[0]:
        if isinstance(leaf, jax.sharding.Sharding):
            by_path[_paths.path_str(key_path)] = (leaf,) * 3
        elif is_node(leaf):
            by_path[_paths.path_str(key_path)] = (leaf.a, leaf.b, leaf.scale)
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


def _describe(x: Any) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"an array of dtype {x.dtype} and shape {tuple(x.shape)}"
    return f"a {type(x).__name__} ({x!r:.40})"


# ----------------------------------------------------------------------------- orbax


def _orbax_save(path: pathlib.Path, tree: Any) -> None:
    import orbax.checkpoint as ocp

    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        checkpointer.save(path, args=ocp.args.StandardSave(tree))
    finally:
        checkpointer.close()


def _orbax_restore(path: pathlib.Path, targets: Any) -> Any:
    import orbax.checkpoint as ocp

    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        return checkpointer.restore(path, args=ocp.args.StandardRestore(targets))
    finally:
        checkpointer.close()
