"""Loading a model to serve: a bundle's student (checked against its manifest) or an ONNX file."""

from __future__ import annotations

import logging
import os
from typing import Any

from nonn.artifacts import ArtifactError
from nonn.runtime.backends import DEFAULT_MAX_BATCH, OnnxBackend, TensorModel
from nonn.runtime.ort_capi import CApiModel, OrtLibraryError

__all__ = ["load_model", "student_backend"]

log = logging.getLogger(__name__)


def load_model(path: str | os.PathLike[str], *, threads: int = 1, expected_sha256: str | None = None) -> TensorModel:
    """A model to serve: through ONNX Runtime's C library (no numpy), else its Python binding.

    The fallback (with a warning) is for an onnxruntime build without the C library; a library
    named in NONN_ORT_LIBRARY that does not load is an error instead.
    """
    try:
        return CApiModel(path, threads=threads, expected_sha256=expected_sha256)
    except OrtLibraryError as exc:
        if os.environ.get("NONN_ORT_LIBRARY"):
            raise
        log.warning("%s; serving through ONNX Runtime's Python binding instead (more memory: it loads numpy)", exc)
    from nonn.runtime.onnx_model import OnnxModel

    return OnnxModel(path, threads=threads, expected_sha256=expected_sha256)


def student_backend(
    bundle: Any,
    student: str | int,
    *,
    threads: int = 1,
    max_batch: int = DEFAULT_MAX_BATCH,
    workers: int = 1,
) -> OnnxBackend:
    """Load one student of a bundle (a Bundle or its directory) for serving.

    The model's sha256 must match the manifest (ModelIntegrityError otherwise) and its input and
    output must be the ones the manifest declares (ArtifactError otherwise).
    """
    from nonn.runtime.bundle import Bundle

    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    try:
        entry = bundle.student(student)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    path = bundle.path_of(entry)
    model = load_model(path, threads=threads, expected_sha256=entry.sha256)
    declared = ([entry.input], [entry.output])
    if (model.inputs, model.outputs) != declared:
        raise ArtifactError(
            f"{path}: the model's inputs/outputs {[s.to_dict() for s in model.inputs + model.outputs]} "
            f"differ from the manifest's {[s.to_dict() for s in declared[0] + declared[1]]}"
        )
    return OnnxBackend(model, entry.name, max_batch=max_batch, workers=workers)
