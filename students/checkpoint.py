"""Checkpoint files: atomic torch.save, and a safe, validating load.

A checkpoint is a dict with a ``"format"`` field (e.g. ``"nonn.teacher/1"``) holding only
tensors, numbers, strings, lists and dicts, so it loads with ``torch.load(weights_only=True)``
and a file can never run code when opened.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from nonn.artifacts import ArtifactError, atomic_path

__all__ = ["cpu_state_dict", "save_checkpoint", "load_checkpoint", "load_torch_file", "saved_config"]


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of `module`'s state, safe to save while training goes on."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` with torch.save to a temporary file, then rename it over ``path``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("format"), str):
        raise ValueError("a checkpoint must be a dict with a 'format' string")
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_torch_file(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ArtifactError(
            f"{path}: refused to load: the file contains pickled Python objects other than tensors and "
            f"plain containers (it could run code); save a state_dict instead ({str(exc).splitlines()[0]})"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{path}: not a readable torch file: truncated or corrupt ({first_line})") from exc


def load_checkpoint(path: str | os.PathLike[str], expected_format: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint and check its ``"format"``; any problem is an ArtifactError naming ``path``."""
    obj = load_torch_file(path, map_location=map_location)
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: expected a {expected_format} checkpoint (a dict), got {type(obj).__name__}")
    found = obj.get("format")
    if found != expected_format:
        hint = " (a plain state_dict? load it into its model with a factory, e.g. --teacher-factory)" if found is None else ""
        raise ArtifactError(f"{path}: format is {found!r}{hint}, expected {expected_format!r}")
    return obj


def saved_config(config_type: type, saved: dict[str, Any] | None) -> dict[str, Any]:
    """The settings a checkpoint was trained with, for comparing with a resumed run's.

    A setting newer than the checkpoint is missing from its saved config: it was trained the way
    that setting's default trains (each new setting's default keeps the old behaviour), so the
    dataclass `config_type`'s defaults fill what is missing.
    """
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(config_type):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return {**defaults, **(saved or {})}
