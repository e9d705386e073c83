"""What the planner reports: :class:`MethodPlan` per method and :class:`Plan`, and memory sizes."""

from __future__ import annotations

import dataclasses
import re

from jaxlora.memory import MemoryReport

__all__ = ["MethodPlan", "Plan", "parse_bytes"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


@dataclasses.dataclass(frozen=True)
class MethodPlan:
    """What one fine-tuning method costs; one column of a :class:`Plan`.

    Attributes:
        method: ``"full fine-tuning"``, ``"LoRA"`` or ``"QLoRA (<format>)"``.
        total_params: parameters of the model being trained, adapters included.
        trainable_params: parameters that receive gradients and optimizer state.
        base_bytes: bytes of the weights as held in memory (quantized for
            QLoRA); ``None`` if they could not be built.
        checkpoint_bytes: bytes of the saved result in float32: the whole model
            for full fine-tuning, the adapters ``a`` and ``b`` otherwise.
        checkpoint_bytes_16: the same in float16 / bfloat16.
        memory: XLA's memory plan of one training step, per device; ``None``
            when not compiled or not available.
        fits: whether ``memory.peak`` fits the planned device memory; ``None``
            when there is no device memory to compare with or no plan.
        unavailable: why this method could not be planned, or ``None``.
        notes: what the use-site engine warned about while compiling the step
            (a :class:`jaxlora.FallbackWarning` means a weight was merged at
            one use, which the peak then includes).

    Example:
        >>> from jaxlora.plan import MethodPlan
        >>> m = MethodPlan("LoRA", 1000, 10, 4000, 40, 20, None, None)
        >>> m.peak_bytes, m.trainable_percent, m.available
        (None, 1.0, True)
    """

    method: str
    total_params: int
    trainable_params: int
    base_bytes: int | None
    checkpoint_bytes: int
    checkpoint_bytes_16: int
    memory: MemoryReport | None
    fits: bool | None
    unavailable: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def peak_bytes(self) -> int | None:
        """The peak training memory per device, ``memory.peak``, or ``None``."""
        return None if self.memory is None else self.memory.peak

    @property
    def trainable_percent(self) -> float:
        """The trainable share of ``total_params``, in percent."""
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    @property
    def available(self) -> bool:
        """Whether the method could be planned (``unavailable is None``)."""
        return self.unavailable is None


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planner's answer: one :class:`MethodPlan` per method; ``str()`` is a table.

    Attributes:
        full: full fine-tuning (every parameter trains, optimizer state for all).
        lora: LoRA on the frozen base.
        qlora: LoRA on the quantized base, or ``None`` if not requested.
        devices: devices one step runs on (the mesh size, or 1).
        device_memory: the memory of one device in bytes, or ``None``.
        compiled: whether the steps were compiled (``False``: counts only).

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxlora
        >>> from jaxlora.plan import plan
        >>> params = {"dense": {"kernel": jax.ShapeDtypeStruct((512, 512), jnp.float32)}}
        >>> batch = jax.ShapeDtypeStruct((8, 512), jnp.float32)
        >>> p = plan(lambda p, x: jnp.mean((x @ p["dense"]["kernel"]) ** 2), params,
        ...          jaxlora.LoraConfig(rank=4, targets="dense"), batch=batch,
        ...          optimizer=optax.adam(1e-3), device_memory="4MB")
        >>> [m.method for m in p.methods], p.devices
        (['full fine-tuning', 'LoRA'], 1)
        >>> p.lora.trainable_params, p.lora.checkpoint_bytes_16
        (4096, 8192)
        >>> p.full.fits, p.lora.fits, p.full.peak_bytes > p.lora.peak_bytes
        (False, True, True)
        >>> print(str(p).splitlines()[-1])
        fits in 4.0 MB                      no  yes
    """

    full: MethodPlan
    lora: MethodPlan
    qlora: MethodPlan | None
    devices: int
    device_memory: int | None
    compiled: bool

    @property
    def methods(self) -> tuple[MethodPlan, ...]:
        """The planned methods, in column order."""
        return tuple(m for m in (self.full, self.lora, self.qlora) if m is not None)

    def __str__(self) -> str:
        methods = self.methods
        per = "per device" if self.devices > 1 else "(1 device)"
        rows: list[tuple[str, ...]] = [("", *(m.method for m in methods))]
        rows.append(("parameters", *(f"{m.total_params:,}" for m in methods)))
        rows.append(("trainable", *(f"{m.trainable_params:,}" for m in methods)))
        rows.append(("trainable %", *(f"{m.trainable_percent:.4g}%" for m in methods)))
        rows.append(("weights (total)", *(_size(m.base_bytes) for m in methods)))
        rows.append(("checkpoint float32", *(_size(m.checkpoint_bytes) for m in methods)))
        rows.append(("checkpoint 16-bit", *(_size(m.checkpoint_bytes_16) for m in methods)))
        rows.append(
            (
                "checkpoint reduction",
                *(f"{self.full.checkpoint_bytes / m.checkpoint_bytes:,.0f}x" for m in methods),
            )
        )
        if self.compiled:
            rows.append((f"peak training memory {per}", *(_peak(m) for m in methods)))
            if self.device_memory is not None:
                gib, rest = divmod(self.device_memory, 2**30)
                label = (
                    f"fits in {gib} GiB"
                    if gib and not rest
                    else f"fits in {_size(self.device_memory)}"
                )
                rows.append((label, *(_yes_no(m) for m in methods)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]
        if not self.compiled:
            lines.append("memory: not compiled (counts only)")
        for m in methods:
            if m.unavailable is not None:
                lines.append(f"{m.method}: not available: {m.unavailable}")
            lines.extend(f"{m.method}: {note}" for note in m.notes)
        return "\n".join(line.rstrip() for line in lines)


def parse_bytes(text: int | str) -> int:
    """Reads a memory size: an int of bytes, or text such as ``"80GB"`` or ``"16 GiB"``.

    Decimal units (``kB``, ``MB``, ``GB``, ``TB``) are powers of 1000, binary ones
    (``KiB``, ``MiB``, ``GiB``, ``TiB``) powers of 1024; case does not matter.

    Args:
        text: the size.

    Returns:
        The size in bytes, a positive int.

    Raises:
        ValueError: if ``text`` is not a positive size in a known unit.

    Example:
        >>> from jaxlora.plan import parse_bytes
        >>> parse_bytes("80GB"), parse_bytes("16 GiB"), parse_bytes("1.5kB"), parse_bytes(512)
        (80000000000, 17179869184, 1500, 512)
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ValueError(f"a memory size must be an int of bytes or text like '80GB'; got {text!r}")
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"cannot read {text!r} as a memory size; write a number and a unit such as "
                "'80GB', '16GiB' or '512MB' (units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        value, unit = float(m.group(1)), m.group(2).lower()
    size = round(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a memory size must be positive; got {text!r}")
    return size


def _size(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _peak(m: MethodPlan) -> str:
    return "n/a" if m.memory is None else _size(m.memory.peak)


def _yes_no(m: MethodPlan) -> str:
    return "n/a" if m.fits is None else "yes" if m.fits else "no"
