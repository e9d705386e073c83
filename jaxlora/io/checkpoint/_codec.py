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
import numbers
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlora._config import config_type
from jaxlora._hosts import to_host
from jaxlora._node import Constant

FORMAT = "jaxlora.adapter"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_CALLABLE_FIELDS = ("targets", "exclude")


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
