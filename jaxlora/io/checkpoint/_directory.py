"""The atomic directory layer of adapter checkpoints: where a checkpoint goes, how it commits.

A save writes everything into a sibling ``<name>.jaxlora-tmp`` directory,
writes the JSON metadata last (it is the commit marker), and renames the
directory into place. Loading refuses temporary directories and directories
without metadata; loading the latest step skips steps that were never
committed. Nothing here knows what the files hold.

Under ``jax.distributed`` every process calls the save: the primary process
creates the temporary directory, every process writes its part of the arrays,
and after a barrier that all pass the primary writes the metadata and renames;
a last barrier keeps every process from returning before the commit.
"""

from __future__ import annotations

import json
import numbers
import os
import pathlib
import re
import shutil
from collections.abc import Callable
from typing import Any, NoReturn

from jaxlora._hosts import is_primary, sync

METADATA = "jaxlora_adapter.json"
ARRAYS = "arrays"
CONSTANTS = "constants"
TMP_SUFFIX = ".jaxlora-tmp"
_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_STEP = re.compile(r"^step_(\d+)$")


def check_step(step: Any) -> None:
    """Raises unless ``step`` is an int ``>= 0``."""
    if not isinstance(step, numbers.Integral) or isinstance(step, bool):
        raise TypeError(f"step must be an int or None; got {step!r} ({type(step).__name__})")
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")


def save_target(root: pathlib.Path, step: int | None) -> pathlib.Path:
    """The directory a save writes: ``root``, or ``root/step_<step>``; checks it is free."""
    if step is None:
        if root.exists() and not root.is_dir():
            raise FileExistsError(f"{str(root)!r} is a file; pass a directory path.")
        if root.is_dir() and any(root.iterdir()):
            raise FileExistsError(
                f"{str(root)!r} exists and is not empty; save_adapter does not overwrite. "
                "Pass a new directory, remove this one, or pass step= to keep numbered "
                "checkpoints in it."
            )
        return root
    check_step(step)
    if (root / METADATA).exists():
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
    return target


def write_atomically(
    target: pathlib.Path, write_arrays: Callable[[pathlib.Path], None], metadata: Any
) -> None:
    """Writes ``target`` through a temporary sibling: arrays, then metadata (the commit marker).

    ``write_arrays(tmp)`` writes the array data into ``tmp`` (in every process:
    each writes its own part); the metadata is written last, then the directory
    is renamed into place, both by the primary process after every process has
    written its arrays. A failure (or a kill) at any point leaves only the
    temporary directory. Every process returns after the rename, or raises.
    """
    tmp = target.with_name(target.name + TMP_SUFFIX)
    name = f"jaxlora.save {target}"
    if is_primary():
        target.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by an interrupted save of the same target
            shutil.rmtree(tmp)
        tmp.mkdir()
    sync(f"{name}: started")
    try:
        write_arrays(tmp)
        sync(f"{name}: arrays written")
        if is_primary():
            write_json(tmp / METADATA, metadata)
            _fsync_dir(tmp)
            if target.is_dir():
                target.rmdir()  # empty (checked by save_target); rename cannot replace a directory
            os.rename(tmp, target)
            _fsync_dir(target.parent)
    except BaseException:
        if is_primary():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    sync(f"{name}: committed")


def write_json(path: pathlib.Path, data: Any) -> None:
    """Writes JSON durably: to ``<path>.partial``, fsynced, then renamed over ``path``."""
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


def _is_tmp(path: pathlib.Path) -> bool:
    return TMP_SUFFIX in path.name or _ORBAX_TMP_SUFFIX in path.name


def resolve(root: pathlib.Path, step: int | None) -> pathlib.Path:
    """The committed checkpoint to load at ``root`` (``step``, or the latest step)."""
    if step is not None:
        check_step(step)
    if _is_tmp(root):
        raise ValueError(
            f"{str(root)!r} is the temporary directory of a save that did not finish; it "
            "may be incomplete and is never loaded. Load the checkpoint it was meant to "
            "become, or an earlier step, and delete it."
        )
    if not root.exists():
        tmp = root.with_name(root.name + TMP_SUFFIX)
        hint = (
            f" (only {str(tmp)!r} exists: a save that was interrupted before it completed)"
            if tmp.exists()
            else ""
        )
        raise FileNotFoundError(f"no adapter checkpoint at {str(root)!r}{hint}.")
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is a file, not an adapter checkpoint directory.")
    if (root / METADATA).exists():
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
        if target.with_name(target.name + TMP_SUFFIX).exists():
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
        if match and (child / METADATA).is_file():
            steps.add(int(match.group(1)))
    return steps


def _not_a_checkpoint(path: pathlib.Path) -> NoReturn:
    has_arrays = (path / ARRAYS).exists()
    reason = (
        f"it has {ARRAYS}/ but no {METADATA}: an incomplete save (the metadata is written last)"
        if has_arrays
        else f"it has neither {METADATA} nor step_<n>/ subdirectories"
    )
    raise ValueError(
        f"{str(path)!r} is not a jaxlora adapter checkpoint: {reason}. Pass a directory "
        "written by jaxlora.save_adapter."
    )


def read_json(path: pathlib.Path) -> Any:
    """The checkpoint's metadata, or a ``ValueError`` that says it cannot be read."""
    file = path / METADATA
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{str(file)!r} cannot be read as JSON ({e}); the checkpoint {str(path)!r} is "
            "damaged or is not a jaxlora adapter checkpoint."
        ) from None
