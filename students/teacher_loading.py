"""Loading a teacher for inference: nonn's own checkpoint, or any nn.Module from a factory.

`load_teacher(path)` rebuilds a nonn checkpoint ("nonn.teacher/1", see nonn.students.teacher);
`load_teacher(factory="package.module:function", weights=...)` builds the user's module and
loads a plain state_dict (or a nonn checkpoint) into it. Either way the result is a
LoadedTeacher in eval mode with its fingerprint, and the input contract and data set a nonn
checkpoint recorded.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from nonn.artifacts import ArtifactError, sha256_file
from nonn.runtime.input_contract import InputContract
from nonn.students.checkpoint import load_checkpoint, load_torch_file
from nonn.students.models import count_parameters, create_model

__all__ = ["TEACHER_FORMAT", "LoadedTeacher", "load_teacher", "load_factory"]

TEACHER_FORMAT = "nonn.teacher/1"


@dataclass
class LoadedTeacher:
    """A teacher ready for inference (eval mode) and what is known about it.

    ``arch`` is set for nonn models (rebuild with ``create_model(**arch)``), ``factory`` for a
    bring-your-own module; ``feature_layer`` is the module whose output is the final conv
    feature map when the model declares it; ``fingerprint`` is the sha256 of the weights file;
    ``contract`` is the input contract a nonn checkpoint recorded (None for a plain state_dict).
    """

    model: nn.Module
    arch: dict[str, Any] | None
    factory: str | None
    feature_layer: str | None
    dataset: dict[str, Any] | None
    fingerprint: str
    metrics: dict[str, Any] | None = None
    contract: InputContract | None = None
    source: str = ""  # the checkpoint, weights file or factory it was loaded from (for messages)

    @property
    def params(self) -> int:
        return count_parameters(self.model)


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """Resolve ``package.module:function`` (or ``path/to/file.py:function``) to a callable."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"teacher factory must look like package.module:function, got {spec!r}")
    module_name, attr = spec.rsplit(":", 1)
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"teacher factory file {path} not found")
        name = "nonn_user_factory_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"teacher factory {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"teacher factory {spec!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a plain state_dict file, a nonn teacher checkpoint or {'state_dict': ...}."""
    if isinstance(obj, dict) and "format" in obj:
        if obj["format"] != TEACHER_FORMAT:
            raise ArtifactError(f"{path}: format is {obj['format']!r}, expected a state_dict or {TEACHER_FORMAT!r}")
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ArtifactError(f"{path}: expected a state_dict (parameter names -> tensors) or a {TEACHER_FORMAT} checkpoint")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} (e.g. {', '.join(result.missing_keys[:3])})")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} (e.g. {', '.join(result.unexpected_keys[:3])})")
    if problems:
        raise ArtifactError(f"{path}: weights do not fit the model: {'; '.join(problems)}")


def _state_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_teacher(
    path: str | os.PathLike[str] | None = None,
    *,
    factory: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    map_location: Any = "cpu",
) -> LoadedTeacher:
    """Load a teacher in eval mode: a nonn checkpoint (``path``), or bring your own module with
    ``factory="package.module:function"`` (called with no arguments) and ``weights`` (a plain
    state_dict file or a nonn checkpoint). Without weights, the factory's own weights are used
    and the fingerprint is a hash of its state_dict.
    """
    if factory is not None:
        if path is not None and weights is not None:
            raise ValueError("give the weights either as path or as weights, not both")
        weights = weights if weights is not None else path
        model = load_factory(factory)()
        if not isinstance(model, nn.Module):
            raise ValueError(f"teacher factory {factory!r} returned {type(model).__name__}, expected a torch.nn.Module")
        dataset = metrics = contract = None
        if weights is not None:
            weights = Path(weights)
            obj = load_torch_file(weights, map_location=map_location)
            if isinstance(obj, dict) and obj.get("format") == TEACHER_FORMAT:
                dataset, metrics, contract = obj.get("dataset"), obj.get("metrics"), _recorded_contract(obj, weights)
            _load_weights(model, _extract_state_dict(obj, weights), weights)
            fingerprint = sha256_file(weights)
        else:
            fingerprint = _state_fingerprint(model)
        model.to(map_location).eval()
        return LoadedTeacher(model, None, factory, getattr(model, "feature_layer", None), dataset, fingerprint, metrics, contract,
                             str(weights if weights is not None else factory))

    if weights is not None:
        raise ValueError("weights without a teacher factory: pass the nonn checkpoint as path, or add factory='package.module:function'")
    if path is None:
        raise ValueError("load_teacher needs a nonn teacher checkpoint path or a factory")
    path = Path(path)
    checkpoint = load_checkpoint(path, TEACHER_FORMAT, map_location=map_location)
    arch = checkpoint.get("arch")
    if not isinstance(arch, dict) or "name" not in arch:
        raise ArtifactError(f"{path}: checkpoint has no valid 'arch' entry")
    model = create_model(**arch)
    _load_weights(model, checkpoint["state_dict"], path)
    model.to(map_location).eval()
    return LoadedTeacher(
        model, arch, None, checkpoint.get("feature_layer", getattr(model, "feature_layer", None)),
        checkpoint.get("dataset"), sha256_file(path), checkpoint.get("metrics"), _recorded_contract(checkpoint, path), str(path),
    )


def _recorded_contract(checkpoint: dict[str, Any], path: Path) -> InputContract | None:
    """The input contract a teacher checkpoint recorded; one from before contracts were recorded
    was trained on images normalised by its data set's mean/std."""
    if checkpoint.get("input_contract") is not None:
        return InputContract.from_dict(checkpoint["input_contract"], str(path))
    meta = checkpoint.get("dataset") or {}
    if meta.get("mean") and meta.get("std") and meta.get("input_shape"):
        return InputContract.from_dataset_meta(meta, str(path))
    return None
