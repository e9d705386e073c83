"""The JSON side of adapter checkpoints: configs, adapter entries, constants and checksums.

Every adapter node is written through the node protocol
(:mod:`jaxlora._node`): its ``kind``, its static metadata as JSON and the
shapes, dtypes and SHA-256 checksums of its arrays. Frozen constants
(:class:`jaxlora._node.Constant`) are written once per checkpoint, however
many nodes share them, and referred to by digest. Configs are written by
their registered ``kind`` and dataclass fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlora._config import config_type
from jaxlora._hosts import to_host
from jaxlora._node import Constant, node_type

FORMAT = "jaxlora.adapter"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_CALLABLE_FIELDS = ("targets", "exclude")
_ENTRY_FIELDS = ("path", "keys", "key", "kind", "static", "arrays")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_KEY = re.compile(r"[A-Za-z0-9_]+")
_FIX = re.compile(r"\s*Pass the config the delta was made with.*$", re.DOTALL)


def checksum(array: Any) -> str:
    """SHA-256 of an array's dtype, shape and C-order bytes (on the host, gathered if sharded
    across processes: every process then computes it, in the same order)."""
    host = np.ascontiguousarray(to_host(array))
    digest = hashlib.sha256(f"{host.dtype.str}{host.shape}".encode())
    digest.update(host.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- constants


class Constants:
    """The constants of one checkpoint, by digest, with their Orbax keys."""

    def __init__(self) -> None:
        self.by_digest: dict[str, Constant] = {}

    def ref(self, constant: Constant) -> dict[str, str]:
        self.by_digest.setdefault(constant.digest, constant)
        return {"constant": constant.digest}

    def encode(self, value: Any) -> Any:
        """``value`` with every constant replaced by a reference (JSON-ready otherwise)."""
        if isinstance(value, Constant):
            return self.ref(value)
        if isinstance(value, Mapping):
            return {str(k): self.encode(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [self.encode(v) for v in value]
        return value

    def keys(self) -> dict[str, str]:
        return {digest: f"c{i}" for i, digest in enumerate(self.by_digest)}


def decode_constants(value: Any, constants: Mapping[str, Constant]) -> Any:
    """The inverse of :meth:`Constants.encode`."""
    if isinstance(value, dict) and set(value) == {"constant"}:
        return constants[value["constant"]]
    if isinstance(value, dict):
        return {k: decode_constants(v, constants) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_constants(v, constants) for v in value]
    return value


# ----------------------------------------------------------------------------- configs


def encode_config(config: Any) -> dict[str, Any]:
    """A config as JSON: its kind and fields; callable ``targets``/``exclude`` are dropped."""
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
    return {"kind": config.kind, "fields": fields, "callables": dropped}


def decode_config(stored: Mapping[str, Any], adapted_paths: list[str], where: str) -> Any:
    """The config of :func:`encode_config`; a ``ValueError`` naming ``where`` if it is invalid."""
    try:
        cls = config_type(stored.get("kind", "lora"))  # format 1 stored LoraConfigs only
        known = {f.name for f in dataclasses.fields(cls)}
        fields = dict(stored["fields"])
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown fields {unknown}")
        kwargs = {
            k: _decode_dtype(v) if k == "dtype" else _decode_value(v) for k, v in fields.items()
        }
        if stored.get("callables"):
            kwargs["targets"] = tuple(f"^{re.escape(p)}$" for p in adapted_paths)
            kwargs["exclude"] = None
        return cls(**kwargs)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(
            f"the config stored in {where!r} is invalid: {type(e).__name__}: {e}. The "
            "checkpoint is damaged, was edited, or was written by an incompatible jaxlora; "
            "save the adapter again."
        ) from None


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
        "JSON. Use the value types the config documents."
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


# ----------------------------------------------------------------------------- damaged metadata


def damaged(path: Any, detail: str) -> ValueError:
    """The one error of a checkpoint whose metadata is damaged or was edited.

    Args:
        path: the checkpoint directory.
        detail: what is wrong: the entry or array, what was expected and what was found.

    Returns:
        The ``ValueError`` to raise (chained to the error that found it, if any).
    """
    return ValueError(
        f"the checkpoint {str(path)!r} is damaged or was edited: {detail}. Restore it from a "
        "copy, or save the adapter again."
    )


def check_node(config: Any, path: str, node: Any) -> None:
    """Raises unless ``config`` makes ``node`` at ``path``: ``config.check_node`` and the dropout.

    ``save_adapter`` calls it before writing and ``load_adapter`` after reading,
    so a stored config never disagrees with the stored adapters.
    """
    config.check_node(path, node)
    want = getattr(config, "dropout", None)
    if want is not None and float(node.dropout) != float(want):
        raise ValueError(
            f"the adapter at {path!r} has dropout {float(node.dropout)!r}, but config has "
            f"dropout {float(want)!r}. Pass the config the delta was made with."
        )


def check_against_config(config: Any, where: str, node: Any, path: Any) -> None:
    """:func:`check_node` at load: a disagreement is a :func:`damaged` checkpoint."""
    try:
        check_node(config, where, node)
    except (TypeError, ValueError) as e:
        found = _FIX.sub("", str(e))
        raise damaged(
            path, f"its stored config does not make the adapter at {where!r}: {found}"
        ) from e


def check_entries(metadata: Mapping[str, Any], version: int, path: Any) -> None:
    """Raises :func:`damaged` unless the adapter entries, holes and constants are well formed.

    Checks what a save writes (fields, types, array names of the node kind,
    shapes, dtype names, checksums, constant references, static values);
    whether the nodes fit the stored config is checked once they are built
    (:func:`check_against_config`).

    Args:
        metadata: the checkpoint's metadata, format 1 entries already converted.
        version: its format version (format 1 wrote no checksums and a scale array).
        path: the checkpoint directory, for the message.
    """
    constants = metadata.get("constants", {})
    if not isinstance(constants, dict):
        raise damaged(path, f"'constants' should map digests to files; found {_short(constants)}")
    for digest, spec in constants.items():
        key = spec.get("key") if isinstance(spec, dict) else None
        if not isinstance(key, str) or not _FILE_KEY.fullmatch(key):
            raise damaged(
                path, f"the constant {digest!r} should name its file ('key': 'c0'); found {spec!r}"
            )
    entries, holes = metadata["adapters"], metadata["holes"]
    if not isinstance(entries, list) or not entries:
        raise damaged(
            path, f"'adapters' should be a non-empty list of entries; found {_short(entries)}"
        )
    if not isinstance(holes, list) or not all(_is_keys(h) for h in holes):
        raise damaged(
            path, f"'holes' should be a list of key paths (lists of names); found {_short(holes)}"
        )
    seen: set[Any] = set()
    for entry in entries:
        _check_entry(entry, version, constants, path)
        if entry["path"] in seen or ("key", entry["key"]) in seen:
            raise damaged(
                path,
                f"two adapter entries have the path {entry['path']!r} or the key {entry['key']!r}",
            )
        seen.update((entry["path"], ("key", entry["key"])))


def _check_entry(entry: Any, version: int, constants: Mapping[str, Any], path: Any) -> None:
    if not isinstance(entry, dict):
        raise damaged(path, f"an adapter entry should be an object; found {_short(entry)}")
    where = entry.get("path")
    missing = [f for f in _ENTRY_FIELDS if f not in entry]
    if missing:
        raise damaged(path, f"the adapter entry at {where!r} lacks {missing}")
    keys = entry["keys"]
    if not isinstance(where, str) or not _is_keys(keys) or where != "/".join(map(str, keys)):
        raise damaged(
            path,
            f"the adapter entry at {where!r} should have its keys {_short(keys)} joined with '/' "
            "as its path",
        )
    if not isinstance(entry["key"], str):
        raise damaged(
            path, f"the adapter at {where!r} has the array key {entry['key']!r}, not a string"
        )
    try:
        cls = node_type(entry["kind"])
    except (TypeError, ValueError) as e:
        raise damaged(path, f"the adapter at {where!r} has kind {entry['kind']!r}: {e}") from e
    arrays = entry["arrays"]
    if not isinstance(arrays, dict):
        raise damaged(
            path, f"the adapter at {where!r} should list its arrays; found {_short(arrays)}"
        )
    _check_array_names(cls, where, arrays, version, path)
    for name, spec in arrays.items():
        what = f"the array {name!r} of the adapter at {where!r}"
        if "constant" in spec:
            if (
                set(spec) != {"constant"}
                or not isinstance(spec["constant"], str)
                or (spec["constant"] not in constants)
            ):
                raise damaged(
                    path,
                    f"{what} refers to the constant {spec.get('constant')!r}, which the "
                    "checkpoint's 'constants' do not list",
                )
            continue
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(_is_size(n) for n in shape):
            raise damaged(
                path, f"{what} should have a shape (a list of sizes >= 0); found {shape!r}"
            )
        if not _is_dtype_name(spec.get("dtype")):
            raise damaged(
                path,
                f"{what} has dtype {spec.get('dtype')!r}, which is not a dtype name (such as "
                "'float32' or 'bfloat16')",
            )
        checksum_ = spec.get("sha256")
        if version >= 2 and not (isinstance(checksum_, str) and _SHA256.fullmatch(checksum_)):
            raise damaged(
                path,
                f"{what} should have its SHA-256 checksum ('sha256', 64 hex digits: format "
                f"{version} writes one for every array); found {checksum_!r}",
            )
    _check_static(cls, entry, version, path)


def _check_array_names(
    cls: type, where: str, arrays: Mapping[str, Any], version: int, path: Any
) -> None:
    """The trainable arrays are the node kind's, constants (optional) only its constant fields."""
    if not all(isinstance(spec, dict) for spec in arrays.values()):
        raise damaged(
            path,
            f"the adapter at {where!r} should describe each array by an object; found "
            f"{_short(arrays)}",
        )
    trainable = sorted(cls.trainable_fields() + (("scale",) if version == 1 else ()))
    stored = sorted(n for n, spec in arrays.items() if "constant" not in spec)
    refs = sorted(n for n, spec in arrays.items() if "constant" in spec)
    if stored != trainable or not set(refs) <= set(cls.constant_fields()):
        optional = (
            f" and optionally the constants {list(cls.constant_fields())}"
            if cls.constant_fields()
            else ""
        )
        raise damaged(
            path,
            f"the adapter at {where!r} is a {cls.kind!r} adapter, which stores the arrays "
            f"{trainable}{optional}; the entry has {sorted(arrays)}",
        )


def _check_static(cls: type, entry: Mapping[str, Any], version: int, path: Any) -> None:
    """The static fields are the node kind's; layout, scale and dropout have their types."""
    where, static = entry["path"], entry["static"]
    fields = sorted(
        f.name
        for f in dataclasses.fields(cls)
        if f.metadata.get("static") and f.name not in cls.axes
    )
    if not isinstance(static, dict) or sorted(static) != fields:
        found = sorted(static) if isinstance(static, dict) else _short(static)
        raise damaged(
            path,
            f"the adapter at {where!r} (kind {cls.kind!r}) should have the static fields "
            f"{fields}; found {found}",
        )

    def bad(name: str, expected: str) -> ValueError:
        return damaged(
            path,
            f"the static {name!r} of the adapter at {where!r} should be {expected}; found "
            f"{static[name]!r}",
        )

    layout = static.get("layout")
    if "layout" in static and not (
        isinstance(layout, dict)
        and sorted(layout) == ["inputs", "outputs", "stacked"]
        and all(isinstance(v, list) and all(_is_size(n) for n in v) for v in layout.values())
    ):
        raise bad("layout", "{'stacked': [...], 'inputs': [...], 'outputs': [...]} of sizes")
    scale = static.get("scale")
    if "scale" in static and not (version == 1 and scale is None) and not _is_finite(scale):
        raise bad("scale", "a finite number")
    dropout = static.get("dropout")
    if "dropout" in static and not (_is_finite(dropout) and 0.0 <= dropout < 1.0):
        raise bad("dropout", "a number in [0, 1)")


def _is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_keys(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(k, str | int) and not isinstance(k, bool) for k in value
    )


def _is_dtype_name(value: Any) -> bool:
    try:
        return isinstance(value, str) and jnp.dtype(value).name == value
    except (TypeError, ValueError):
        return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
