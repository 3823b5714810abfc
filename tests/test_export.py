"""ONNX export: parity with PyTorch, dynamic batch, atomic writes, int8 accuracy, FLOP counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from nonn.artifacts import sha256_file  # noqa: E402
from nonn.runtime.bundle import Bundle  # noqa: E402
from nonn.runtime.bundle_check import verify_bundle  # noqa: E402
from nonn.students.ensemble import build_ensemble  # noqa: E402
from nonn.students.export import PARITY_TOLERANCE, ExportError, export_bundle  # noqa: E402
from nonn.students.model_profile import profile_model  # noqa: E402
from nonn.students.onnx_tools import onnx_session  # noqa: E402
from nonn.students.models import create_model  # noqa: E402

torch.set_num_threads(1)

SHAPE = (1, 8, 8)
GROUPS = [[0, 2, 5], [1, 3]]
CLASSES = 3


def tiny_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes of 8x8 images: a bright band in the top, middle or bottom rows, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.random((n, *SHAPE), dtype=np.float32) * 0.3
    for i, label in enumerate(y):
        x[i, 0, 3 * label : 3 * label + 2, :] += 0.7
    return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64)


def meta(x: np.ndarray) -> dict:
    return {
        "name": "bands",
        "input_shape": list(SHAPE),
        "num_classes": CLASSES,
        "class_names": ["top", "middle", "bottom"],
        "mean": [float(x.mean())],
        "std": [float(x.std())],
    }


def make_ensemble(seed: int = 0):
    torch.manual_seed(seed)
    return build_ensemble([("cnn-small", {"width": 4})] * 2, GROUPS, CLASSES, 1, (4, 4))


def train_briefly(ensemble, x: np.ndarray, y: np.ndarray, m: dict, steps: int = 60):
    xs = torch.from_numpy((x - m["mean"][0]) / m["std"][0])
    ys = torch.from_numpy(y)
    opt = torch.optim.Adam(ensemble.parameters(), lr=0.02)
    ensemble.train()
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % len(xs)
        loss = torch.nn.functional.cross_entropy(ensemble(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ensemble.eval()


@pytest.fixture(scope="module")
def data():
    return tiny_data(256, seed=1), tiny_data(128, seed=2)


@pytest.mark.slow
def test_fp32_export_matches_pytorch_with_dynamic_batch(tmp_path: Path, data) -> None:
    (train_x, _), (test_x, test_y) = data
    m = meta(train_x)
    ensemble = make_ensemble()
    # Non-trivial BN statistics, so the exported graph must carry them.
    train_briefly(ensemble, train_x, np.zeros(len(train_x), np.int64), m, steps=5)
    teacher = create_model("wrn-10-1", num_classes=CLASSES, in_channels=1, width=8)
    bundle = export_bundle(
        ensemble, tmp_path / "b", dataset_meta=m, parity_images=test_x[:16], eval_data=(test_x, test_y), teacher=teacher,
        input_type="fp32",
    )
    assert verify_bundle(tmp_path / "b") == []
    loaded = Bundle.load(tmp_path / "b")
    assert loaded == bundle and loaded.root == tmp_path / "b"
    assert [s.group for s in loaded.students] == GROUPS
    for entry in [*loaded.students, loaded.head]:
        assert entry.parity_max_abs_diff is not None and entry.parity_max_abs_diff < PARITY_TOLERANCE
        assert entry.sha256 == sha256_file(loaded.path_of(entry))
    assert loaded.students[0].params == sum(p.numel() for p in ensemble.students[0].parameters())
    assert loaded.head.flops == 2 * 5 * CLASSES + CLASSES

    # The whole ONNX pipeline on a batch size never seen at export gives the ensemble's logits.
    x = ((test_x[:7] - m["mean"][0]) / m["std"][0]).astype(np.float32)
    feats = [onnx_session(loaded.path_of(s)).run(None, {"image": x})[0] for s in loaded.students]
    assert [f.shape for f in feats] == [(7, 3), (7, 2)]
    logits = onnx_session(loaded.path_of("head")).run(None, {"features": np.concatenate(feats, 1)})[0]
    with torch.no_grad():
        expected = ensemble(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(logits - expected)) < PARITY_TOLERANCE
    assert loaded.metrics["onnx_accuracy"] == pytest.approx(loaded.metrics["torch_accuracy"], abs=1 / len(test_y))

    # Teacher summary for the planner, Triton repository beside the plain files.
    assert loaded.teacher is not None and loaded.teacher.input_shape == list(SHAPE)
    assert loaded.teacher.flops == sum(layer.flops for layer in loaded.teacher.layers) > 0
    from nonn.deploy.triton import parse_config, verify_model_repository

    config = parse_config(tmp_path / "b" / "triton" / "student_1" / "config.pbtxt")
    assert config.name == "student_1" and list(config.output[0].dims) == [2] and config.max_batch_size == 64
    assert verify_model_repository(loaded) == []  # students, features, head and the ensemble


@pytest.mark.slow
def test_raw_uint8_students_normalise_inside_the_graph(tmp_path: Path, data) -> None:
    """The default bundle takes pixels as stored: uint8 in, the same logits as PyTorch on the
    normalised images, for a quarter of the input bytes."""
    (train_x, train_y), (test_x, test_y) = data
    m = meta(train_x)
    ensemble = train_briefly(make_ensemble(), train_x, train_y, m, steps=20)
    pixels = np.rint(test_x * 255).astype(np.uint8)
    bundle = export_bundle(ensemble, tmp_path / "b", dataset_meta=m, parity_images=pixels[:16], eval_data=(pixels, test_y))
    assert verify_bundle(tmp_path / "b") == []
    contract = bundle.input_contract
    assert contract.datatype == "UINT8" and contract.mean == (m["mean"][0],) and contract.normalize == "dataset"
    assert [s.input.datatype for s in bundle.students] == ["UINT8", "UINT8"]
    assert 'data_type: TYPE_UINT8' in (tmp_path / "b" / "triton" / "student_0" / "config.pbtxt").read_text()
    feats = [onnx_session(bundle.path_of(s)).run(None, {"image": pixels[:7]})[0] for s in bundle.students]
    logits = onnx_session(bundle.path_of("head")).run(None, {"features": np.concatenate(feats, 1)})[0]
    with torch.no_grad():
        expected = ensemble(torch.from_numpy(((pixels[:7] / np.float32(255) - m["mean"][0]) / m["std"][0]).astype(np.float32))).numpy()
    assert np.max(np.abs(logits - expected)) < PARITY_TOLERANCE
    assert bundle.metrics["onnx_accuracy"] == bundle.metrics["torch_accuracy"]
    # Float images in [0, 1] are accepted too (rounded to the pixels they came from).
    again = export_bundle(ensemble, tmp_path / "c", dataset_meta=m, parity_images=pixels[:16] / np.float32(255))
    assert again.students[0].parity_max_abs_diff < PARITY_TOLERANCE
    q = export_bundle(ensemble, tmp_path / "q", dataset_meta=m, calibration_images=np.rint(train_x[:64] * 255).astype(np.uint8),
                      quantize="int8", eval_data=(pixels, test_y))
    assert q.quantization["int8_accuracy"] >= q.quantization["fp32_accuracy"] - 0.05
    assert verify_bundle(tmp_path / "q") == []


@pytest.mark.slow
def test_failed_parity_writes_nothing_and_keeps_previous_bundle(tmp_path: Path, data) -> None:
    (train_x, _), (test_x, _) = data
    m = meta(train_x)
    out = tmp_path / "b"
    export_bundle(make_ensemble(), out, dataset_meta=m, parity_images=test_x[:8])
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ExportError, match="student_0: ONNX Runtime differs from PyTorch"):
        # A tolerance of 0 cannot be met by any float computation done in another order.
        export_bundle(make_ensemble(seed=1), out, dataset_meta=m, parity_images=test_x[:8], tolerance=0.0)
    assert (out / "manifest.json").read_bytes() == before
    assert verify_bundle(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary directory left behind


def test_bad_inputs_are_rejected(tmp_path: Path, data) -> None:
    (train_x, _), _ = data
    m = meta(train_x)
    with pytest.raises(ExportError, match="parity check needs real images"):
        export_bundle(make_ensemble(), tmp_path / "b", dataset_meta=m)
    with pytest.raises(ExportError, match="int8 needs calibration images"):
        export_bundle(make_ensemble(), tmp_path / "b", dataset_meta=m, parity_images=train_x[:4], quantize="int8")
    with pytest.raises(ExportError, match=r"parity images: images have shape \[4, 3, 8, 8\]; expected \(N, 1, 8, 8\)"):
        export_bundle(make_ensemble(), tmp_path / "b", dataset_meta=m, parity_images=np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(ExportError, match="3 class names but the head has 4 outputs"):
        bad = build_ensemble([("cnn-small", {"width": 4})] * 2, GROUPS, 4, 1, (4, 4))
        export_bundle(bad, tmp_path / "b", dataset_meta=m, parity_images=train_x[:4])
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_int8_accuracy_within_tolerance_and_smaller(tmp_path: Path, data) -> None:
    (train_x, train_y), (test_x, test_y) = data
    m = meta(train_x)
    ensemble = train_briefly(make_ensemble(), train_x, train_y, m)
    bundle = export_bundle(
        ensemble, tmp_path / "q", dataset_meta=m, calibration_images=train_x[:128], quantize="int8", eval_data=(test_x, test_y)
    )
    q = bundle.quantization
    assert q is not None and all(s.precision == "int8" for s in bundle.students)
    assert bundle.head.precision == "fp32"
    assert q["fp32_accuracy"] > 0.9, "the tiny ensemble should learn the bands"
    # Stated tolerance: int8 loses at most 5 points of accuracy on this data.
    assert q["int8_accuracy"] >= q["fp32_accuracy"] - 0.05
    assert q["int8_bytes"] < q["fp32_bytes"]
    assert verify_bundle(tmp_path / "q") == []
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["quantization"]["calibration_images"] == 128
    # The served model really is quantized: it holds QuantizeLinear nodes.
    import onnx

    ops = {n.op_type for n in onnx.load(str(bundle.path_of("student_0"))).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_profile_counts_match_torch_flop_counter() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model("wrn-16-1", num_classes=10, in_channels=3).eval()
    prof = profile_model(model, (3, 32, 32))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    # FlopCounterMode counts 2 per multiply-accumulate and ignores the classifier's bias add.
    assert prof.flops == counter.get_total_flops() + 10
    assert prof.params == 175_066
    assert prof.layers[0].name == "conv1" and prof.layers[0].output_shape == [16, 32, 32]
    assert prof.layers[-1].name == "fc" and prof.layers[-1].output_shape == [10]
    assert prof.activation_bytes >= 2 * 16 * 32 * 32 * 4


@pytest.mark.slow
def test_cli_export_verify_plan_from_a_trained_checkpoint(tmp_path: Path, capsys) -> None:
    from nonn.cli import main
    from nonn.students.train import StudentsConfig, train_students

    from students_testing import make_npz, make_partition, make_teacher

    data = make_npz(tmp_path / "bars.npz")
    teacher = make_teacher(tmp_path / "teacher.pt", data)
    partition = make_partition(tmp_path / "partition.json", teacher)
    ckpt = tmp_path / "students.pt"
    train_students(
        StudentsConfig(
            partition=str(partition), out=str(ckpt), teacher=str(teacher), dataset=str(data), arch="cnn-small:width=4",
            epochs=1, batch_size=16, lr=0.05, beta=10.0, device="cpu", progress=False,
        )
    )
    out = tmp_path / "bundle"
    assert main(["export", "--students", str(ckpt), "--out", str(out), "--quantize", "int8", "--calibration-images", "32"]) == 0
    printed = capsys.readouterr().out
    assert "int8: students" in printed and "parity student_1" in printed
    bundle = Bundle.load(out)
    assert [s.group for s in bundle.students] == [[0, 2, 5], [1, 3, 4, 6, 7]]
    assert bundle.teacher is not None and bundle.teacher.arch["name"] == "cnn-small"
    assert bundle.quantization["calibration_images"] == 32 and bundle.quantization["eval_images"] == 48
    assert main(["bundle", "verify", str(out)]) == 0
    assert main(["plan", "--bundle", str(out), "--fleet", "rpi3b+:2"]) == 0
    assert "model-parallel/NoNN" in capsys.readouterr().out
    # Bad input: the error names the value and what was expected.
    assert main(["export", "--students", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_requested_opset_is_honoured(tmp_path: Path, data) -> None:
    import onnx

    (train_x, _), (test_x, _) = data
    bundle = export_bundle(make_ensemble(), tmp_path / "b", dataset_meta=meta(train_x), parity_images=test_x[:8], opset=17)
    for entry in [*bundle.students, bundle.head]:
        model = onnx.load(str(bundle.path_of(entry)))
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
        assert entry.parity_max_abs_diff < PARITY_TOLERANCE
    with pytest.raises(ExportError, match="--opset 6: ONNX Runtime needs opset 7"):
        export_bundle(make_ensemble(), tmp_path / "c", dataset_meta=meta(train_x), parity_images=test_x[:8], opset=6)
