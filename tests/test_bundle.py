"""Bundle manifest: schema validation, loading, and tamper detection by verify_bundle.

The bundle here is written by hand with onnx.helper (tiny MatMul models), so these tests need
neither torch nor the exporter.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from nonn.artifacts import ArtifactError, sha256_file  # noqa: E402
from nonn.cli import main  # noqa: E402
from nonn.deploy.triton import model_repository_files, verify_model_repository  # noqa: E402
from nonn.deploy.writer import write_files  # noqa: E402
from nonn.runtime.bundle import (  # noqa: E402
    BUNDLE_FORMAT,
    Bundle,
    ModelEntry,
    StudentEntry,
    TensorSpec,
)
from nonn.runtime.bundle_check import verify_bundle  # noqa: E402
from nonn.runtime.input_contract import InputContract  # noqa: E402

INPUT_SHAPE = [1, 4, 4]


def _matmul_model(path: Path, in_name: str, in_shape: list, weight: np.ndarray, out_name: str, flatten: bool) -> None:
    nodes = []
    x = in_name
    if flatten:
        nodes.append(helper.make_node("Flatten", [in_name], ["flat"], axis=1))
        x = "flat"
    nodes.append(helper.make_node("MatMul", [x, "w"], [out_name]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["batch", *in_shape])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", weight.shape[1]])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_bundle(root: Path, groups=((0, 1, 2), (3, 4)), classes=3) -> Bundle:
    """Write a valid 2-student bundle into `root` and return it."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    students = []
    pixels = int(np.prod(INPUT_SHAPE))
    for k, group in enumerate(groups):
        file = f"student_{k}.onnx"
        _matmul_model(root / file, "image", INPUT_SHAPE, rng.normal(size=(pixels, len(group))), "features", True)
        entry = StudentEntry(
            name=f"student_{k}",
            file=file,
            sha256=sha256_file(root / file),
            input=TensorSpec("image", [-1, *INPUT_SHAPE]),
            output=TensorSpec("features", [-1, len(group)]),
            params=pixels * len(group),
            flops=2 * pixels * len(group),
            size_bytes=(root / file).stat().st_size,
            feature_size=len(group),
            group=list(group),
            index=k,
        )
        students.append(entry)
    total = sum(len(g) for g in groups)
    _matmul_model(root / "head.onnx", "features", [total], rng.normal(size=(total, classes)), "logits", False)
    head = ModelEntry(
        name="head",
        file="head.onnx",
        sha256=sha256_file(root / "head.onnx"),
        input=TensorSpec("features", [-1, total]),
        output=TensorSpec("logits", [-1, classes]),
        params=total * classes,
        flops=2 * total * classes,
        size_bytes=(root / "head.onnx").stat().st_size,
    )
    bundle = Bundle(
        students=students,
        head=head,
        input_contract=InputContract(INPUT_SHAPE, [0.5], [0.25], normalize="explicit"),
        class_names=[f"c{i}" for i in range(classes)],
        root=root,
    )
    write_files(root / "triton", model_repository_files(bundle))
    bundle.save()
    return bundle


@pytest.fixture()
def bundle_dir(tmp_path: Path) -> Path:
    make_bundle(tmp_path / "bundle")
    return tmp_path / "bundle"


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _write_manifest(root: Path, obj: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(obj))


def test_roundtrip_and_access(bundle_dir: Path) -> None:
    bundle = Bundle.load(bundle_dir)
    assert _manifest(bundle_dir)["format"] == BUNDLE_FORMAT
    assert bundle.num_students == 2 and bundle.feature_sizes == [3, 2]
    assert bundle.student("student_1").group == [3, 4]
    assert bundle.student(0).name == "student_0"
    assert bundle.student("1").name == "student_1"
    assert bundle.path_of(bundle.head) == bundle_dir / "head.onnx"
    assert bundle.triton_repository == bundle_dir / "triton"
    assert Bundle.load(bundle_dir / "manifest.json") == bundle
    with pytest.raises(KeyError, match="student_0, student_1"):
        bundle.student("student_9")
    assert verify_bundle(bundle_dir) == []


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.update(format="nonn.bundle/2"), "expected 'nonn.bundle/1'"),
        (lambda m: m.pop("students"), "students: missing required field"),
        (lambda m: m["students"][1].pop("sha256"), r"students\[1\].sha256: missing"),
        (lambda m: m["students"][0].update(sha256="abc"), r"students\[0\].sha256"),
        (lambda m: m["students"][0]["input"].update(datatype="FLOAT"), "not a KServe datatype"),
        (lambda m: m["students"][0].update(file="../evil.onnx"), "relative to the bundle"),
        (lambda m: m["students"][1].update(group=[2, 3]), "also in student_0"),
        (lambda m: m["students"][1].update(feature_size=5), "group has 2 filters"),
        (lambda m: m["head"]["input"].update(shape=[-1, 4]), r"expected \[-1, 5\]"),
        (lambda m: m["input_contract"].update(mean=[0.1, 0.2]), "one value per channel"),
        (lambda m: m["input_contract"].update(datatype="UINT8"), r"student_0\): input datatype FP32, but the input contract says the students take UINT8"),
        (lambda m: m["students"][0]["input"].update(shape=[-1, 3, 4, 4]), "does not match the input contract's"),
        (lambda m: m["students"][1].update(name="student_0"), "unique"),
    ],
)
def test_schema_errors_name_the_field(bundle_dir: Path, mutate, message: str) -> None:
    manifest = copy.deepcopy(_manifest(bundle_dir))
    mutate(manifest)
    _write_manifest(bundle_dir, manifest)
    with pytest.raises(ArtifactError, match=message) as exc:
        Bundle.load(bundle_dir)
    assert "manifest.json" in str(exc.value)
    problems = verify_bundle(bundle_dir)
    assert len(problems) == 1 and "manifest.json" in problems[0]


def test_a_manifest_from_before_the_input_contract_still_loads(bundle_dir: Path) -> None:
    manifest = _manifest(bundle_dir)
    contract = manifest.pop("input_contract")
    manifest["preprocessing"] = {k: contract[k] for k in ("mean", "std", "input_shape", "layout", "pixel_scale")}
    _write_manifest(bundle_dir, manifest)
    loaded = Bundle.load(bundle_dir).input_contract
    assert loaded.datatype == "FP32" and loaded.normalize == "dataset" and loaded.mean == (0.5,)


def test_missing_or_corrupt_manifest(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        Bundle.load(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Bundle.load(tmp_path)


def test_verify_detects_tampered_model(bundle_dir: Path) -> None:
    path = bundle_dir / "student_1.onnx"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = verify_bundle(bundle_dir)
    assert any("student_1" in p and "sha256" in p for p in problems), problems


def test_verify_detects_missing_file_and_triton_drift(bundle_dir: Path) -> None:
    (bundle_dir / "head.onnx").unlink()
    (bundle_dir / "triton" / "student_0" / "1" / "model.onnx").write_bytes(b"x")
    problems = verify_bundle(bundle_dir)
    assert any("head" in p and "missing" in p for p in problems), problems
    assert main(["bundle", "verify", str(bundle_dir)]) == 1  # the CLI checks the Triton repository too
    assert any("Triton" in p and "student_0" in p for p in verify_model_repository(Bundle.load(bundle_dir))), problems


def test_verify_detects_shape_mismatch_with_matching_hash(bundle_dir: Path) -> None:
    # A model whose real output width differs from the manifest, re-hashed so only the shape check can catch it.
    manifest = _manifest(bundle_dir)
    _matmul_model(bundle_dir / "student_0.onnx", "image", INPUT_SHAPE, np.ones((16, 4)), "features", True)
    manifest["students"][0]["sha256"] = sha256_file(bundle_dir / "student_0.onnx")
    manifest["students"][0]["size_bytes"] = (bundle_dir / "student_0.onnx").stat().st_size
    _write_manifest(bundle_dir, manifest)
    problems = verify_bundle(bundle_dir)
    assert any("student_0: output shape is [-1, 4] in the model, [-1, 3]" in p for p in problems), problems


def test_cli_bundle_verify_exit_codes(bundle_dir: Path, capsys) -> None:
    assert main(["bundle", "verify", str(bundle_dir)]) == 0
    assert "ok" in capsys.readouterr().out
    (bundle_dir / "student_0.onnx").write_bytes(b"tampered")
    assert main(["bundle", "verify", str(bundle_dir)]) == 1
    err = capsys.readouterr().err
    assert "student_0" in err and "sha256" in err
