"""A Triton model repository that serves a bundle's whole ensemble on one server.

    <student>/config.pbtxt, <student>/1/model.onnx   each student, as in the bundle
    features/config.pbtxt, features/1/model.onnx     concatenates the students' features
    head/config.pbtxt, head/1/model.onnx             the head, as in the bundle
    ensemble/config.pbtxt, ensemble/1/               image -> every student -> features -> head -> logits

Batching is on (max_batch_size, dynamic batching) for every model whose tensors all have a
dynamic batch dimension, which the bundle's models do; the ensemble batches as its members do.
The configs are built as Triton's own ModelConfig messages (tritonclient's `model_config_pb2`)
and written in protobuf text format, so they parse as Triton parses them. The one model not in
the bundle, the concatenation, is a single ONNX Concat node (written with the `onnx` package).
The ensemble's name, inputs and outputs are those of `nonn serve --aggregate`, so a client can
switch between the two servers.

`nonn export` writes this repository into every bundle; `nonn deploy triton` writes it anew from
a bundle; `verify_model_repository` checks one against its bundle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from nonn.artifacts import sha256_file
from nonn.deploy.writer import write_tree
from nonn.runtime.bundle import Bundle, ModelEntry, TensorSpec

__all__ = [
    "ENSEMBLE_NAME",
    "FEATURES_MODEL",
    "DEFAULT_MAX_BATCH",
    "model_configs",
    "model_repository_files",
    "write_model_repository",
    "verify_model_repository",
    "parse_config",
]

ENSEMBLE_NAME = "ensemble"  # the name `nonn serve --aggregate` serves the ensemble under
FEATURES_MODEL = "features"
DEFAULT_MAX_BATCH = 64
_ONNX_PLATFORM = "onnxruntime_onnx"


def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _batched(*specs: TensorSpec) -> bool:
    return all(s.shape and s.shape[0] == -1 for s in specs)


def _add_tensor(field: Any, spec: TensorSpec, batched: bool, name: str | None = None) -> None:
    tensor = field.add()
    tensor.name = name or spec.name
    tensor.data_type = _pb().DataType.Value(f"TYPE_{spec.datatype}")
    tensor.dims.extend(spec.shape[1:] if batched else spec.shape)


def _onnx_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch: int) -> Any:
    batched = max_batch > 0 and _batched(*inputs, *outputs)
    config = _pb().ModelConfig(name=name, platform=_ONNX_PLATFORM, max_batch_size=max_batch if batched else 0)
    for spec in inputs:
        _add_tensor(config.input, spec, batched)
    for spec in outputs:
        _add_tensor(config.output, spec, batched)
    if batched:
        config.dynamic_batching.SetInParent()
    return config


def _feature_inputs(bundle: Bundle) -> list[TensorSpec]:
    return [TensorSpec(f"features_{k}", list(s.output.shape), s.output.datatype) for k, s in enumerate(bundle.students)]


def _ensemble_input(bundle: Bundle) -> TensorSpec:
    first = bundle.students[0].input
    for s in bundle.students[1:]:
        if (s.input.shape, s.input.datatype) != (first.shape, first.datatype):
            raise ValueError(f"{s.name} takes {s.input.datatype} {s.input.shape}, {bundle.students[0].name} {first.datatype} {first.shape}: one ensemble input cannot feed both")
    return first


def model_configs(bundle: Bundle, max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, Any]:
    """Model name -> its ModelConfig message (students, features, head, ensemble)."""
    if max_batch < 0:
        raise ValueError(f"max batch {max_batch}: expected >= 0 (0 turns batching off)")
    pb = _pb()
    head = bundle.head
    features = _feature_inputs(bundle)
    configs: dict[str, Any] = {s.name: _onnx_config(s.name, [s.input], [s.output], max_batch) for s in bundle.students}
    configs[FEATURES_MODEL] = _onnx_config(FEATURES_MODEL, features, [head.input], max_batch)
    configs[head.name] = _onnx_config(head.name, [head.input], [head.output], max_batch)
    for entry in (*bundle.students, head):  # reported by Triton's ModelConfig: an aggregator confirms the model
        configs[entry.name].parameters["sha256"].string_value = entry.sha256
    clash = {ENSEMBLE_NAME, FEATURES_MODEL} & ({s.name for s in bundle.students} | {head.name})
    if clash:
        raise ValueError(f"model name(s) {sorted(clash)} of the bundle clash with the repository's own {ENSEMBLE_NAME!r}/{FEATURES_MODEL!r}")

    image = _ensemble_input(bundle)
    batched = all(c.max_batch_size > 0 for c in configs.values())
    ensemble = pb.ModelConfig(name=ENSEMBLE_NAME, platform="ensemble", max_batch_size=max_batch if batched else 0)
    _add_tensor(ensemble.input, image, batched)
    _add_tensor(ensemble.output, head.output, batched)
    for k, s in enumerate(bundle.students):
        step = ensemble.ensemble_scheduling.step.add(model_name=s.name, model_version=-1)
        step.input_map[s.input.name] = image.name
        step.output_map[s.output.name] = features[k].name
    step = ensemble.ensemble_scheduling.step.add(model_name=FEATURES_MODEL, model_version=-1)
    for spec in features:
        step.input_map[spec.name] = spec.name
    concatenated = f"{head.input.name}_concatenated"
    step.output_map[head.input.name] = concatenated
    step = ensemble.ensemble_scheduling.step.add(model_name=head.name, model_version=-1)
    step.input_map[head.input.name] = concatenated
    step.output_map[head.output.name] = head.output.name
    configs[ENSEMBLE_NAME] = ensemble
    return configs


def _concat_model(bundle: Bundle) -> bytes:
    """An ONNX model: the students' feature tensors -> one (N, sum F_k) tensor, the head's input."""
    import onnx
    from onnx import helper

    elem = {"FP32": onnx.TensorProto.FLOAT, "FP16": onnx.TensorProto.FLOAT16, "FP64": onnx.TensorProto.DOUBLE}
    head = bundle.head
    if head.input.datatype not in elem or any(s.output.datatype != head.input.datatype for s in bundle.students):
        raise ValueError(f"the students' features and the head's input must share one float type, got "
                         f"{[s.output.datatype for s in bundle.students]} and {head.input.datatype}")  # fmt: skip
    dtype = elem[head.input.datatype]

    def dims(shape: list[int]) -> list[Any]:
        return ["batch" if d == -1 else d for d in shape]

    inputs = [helper.make_tensor_value_info(s.name, dtype, dims(s.shape)) for s in _feature_inputs(bundle)]
    output = helper.make_tensor_value_info(head.input.name, dtype, dims(head.input.shape))
    node = helper.make_node("Concat", [i.name for i in inputs], [head.input.name], axis=1)
    model = helper.make_model(helper.make_graph([node], FEATURES_MODEL, inputs, [output]), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7  # readable by every ONNX Runtime Triton has shipped since 2021
    model.producer_name = "nonn"
    onnx.checker.check_model(model)
    return model.SerializeToString()


def model_repository_files(bundle: Bundle, max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, str | bytes | Path]:
    """Relative path -> content (text, bytes, or a bundle file to copy) of the whole repository."""
    from google.protobuf import text_format

    files: dict[str, str | bytes | Path] = {}
    for name, config in model_configs(bundle, max_batch).items():
        files[f"{name}/config.pbtxt"] = text_format.MessageToString(config)
    for entry in [*bundle.students, bundle.head]:
        files[f"{entry.name}/1/model.onnx"] = bundle.path_of(entry)
    files[f"{FEATURES_MODEL}/1/model.onnx"] = _concat_model(bundle)
    files[f"{ENSEMBLE_NAME}/1/.keep"] = ""  # an ensemble's version directory holds no model, but must exist
    return files


def write_model_repository(bundle: Bundle, out: str | Path, *, max_batch: int = DEFAULT_MAX_BATCH, overwrite: bool = False) -> list[Path]:
    """Write the repository into `out` (atomically); returns the files."""
    return write_tree(out, model_repository_files(bundle, max_batch), overwrite=overwrite)


def parse_config(path: str | Path) -> Any:
    """A config.pbtxt parsed as Triton does (ModelConfig in protobuf text format); ValueError naming the file."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(Path(path).read_text(encoding="utf-8"), _pb().ModelConfig())
    except text_format.ParseError as exc:
        raise ValueError(f"{path}: not a Triton model config ({exc})") from exc


def _io(config: Any) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    return {t.name: t for t in config.input}, {t.name: t for t in config.output}


def verify_model_repository(bundle: Bundle, repository: str | Path | None = None) -> list[str]:
    """Every problem of a bundle's model repository (empty when it is good).

    Each config parses as a ModelConfig and names its own directory; each ONNX model's file
    exists and (students, head) matches the bundle's sha256; the tensors match the manifest; the
    ensemble's steps name models of the repository and tensors those models have.
    """
    repo = Path(repository) if repository is not None else bundle.triton_repository
    if repo is None:
        return []
    if not repo.is_dir():
        return [f"Triton repository {repo} is missing"]
    problems: list[str] = []
    try:
        expected = model_configs(bundle, max_batch=DEFAULT_MAX_BATCH)
    except ValueError as exc:
        return [f"Triton repository {repo}: {exc}"]
    found: dict[str, Any] = {}
    for name in expected:
        path = repo / name / "config.pbtxt"
        if not path.is_file():
            problems.append(f"Triton repository: {path} is missing")
            continue
        try:
            config = parse_config(path)
        except ValueError as exc:
            problems.append(f"Triton repository: {exc}")
            continue
        if config.name != name:
            problems.append(f"Triton repository: {path} names model {config.name!r}, expected {name!r}")
        found[name] = config
        if config.platform != "ensemble":
            model = repo / name / "1" / "model.onnx"
            if not model.is_file():
                problems.append(f"Triton repository: {name}: model file {model} is missing")
        elif not (repo / name / "1").is_dir():
            problems.append(f"Triton repository: {name}: version directory {repo / name / '1'} is missing")
    entries: list[ModelEntry] = [*bundle.students, bundle.head]
    for entry in entries:
        model = repo / entry.name / "1" / "model.onnx"
        if model.is_file() and sha256_file(model) != entry.sha256:
            problems.append(f"Triton repository: {entry.name}: {model} differs from {entry.file} (sha256 mismatch)")
        config = found.get(entry.name)
        if config is not None:
            inputs, outputs = _io(config)
            if set(inputs) != {entry.input.name} or set(outputs) != {entry.output.name}:
                problems.append(f"Triton repository: {entry.name}: config tensors {sorted(inputs)} -> {sorted(outputs)}, manifest {entry.input.name} -> {entry.output.name}")
    ensemble = found.get(ENSEMBLE_NAME)
    if ensemble is not None:
        for i, step in enumerate(ensemble.ensemble_scheduling.step):
            member = found.get(step.model_name)
            if member is None:
                problems.append(f"Triton repository: ensemble step {i} names model {step.model_name!r}, which the repository lacks")
                continue
            inputs, outputs = _io(member)
            for kind, names, known in (("input", step.input_map, inputs), ("output", step.output_map, outputs)):
                for tensor in names:
                    if tensor not in known:
                        problems.append(f"Triton repository: ensemble step {i} maps {kind} {tensor!r}, which {step.model_name} does not have ({sorted(known)})")
    return problems
