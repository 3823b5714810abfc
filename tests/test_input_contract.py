"""The input contract: parsing --normalize, preparing images, range checks, and choosing one for a teacher."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from nonn.artifacts import ArtifactError
from nonn.runtime.input_contract import InputContract, NormalizeSpec, contract_for, normalization_candidates, parse_normalize
from nonn.students.data import load_dataset
from nonn.students.normalization import Recorded, near_chance_threshold, resolve_contract

from byo_testing import read_image_folder, toy_resnet, train_as_stored, write_image_folder


def test_parse_normalize():
    assert parse_normalize("auto") == NormalizeSpec("auto")
    assert parse_normalize(" ImageNet ") == NormalizeSpec("imagenet")
    spec = parse_normalize("0.5,0.4:0.25,0.2")
    assert spec == NormalizeSpec("explicit", (0.5, 0.4), (0.25, 0.2)) and str(spec) == "0.5,0.4:0.25,0.2"
    for bad, message in [("0.5", "expected auto, dataset"), ("a,b:c", "expected auto"), ("0.5,0.5:0.2", "2 mean value"),
                         ("0.5:0", "every std must be positive"), ("nan:1", "expected auto")]:
        with pytest.raises(ValueError, match=message):
            parse_normalize(bad)
    with pytest.raises(ValueError, match="imagenet: the ImageNet constants are for 3 channels, the images have 1"):
        contract_for(NormalizeSpec("imagenet"), (1, 8, 8), (0.1,), (0.2,))
    with pytest.raises(ValueError, match="1 mean and 1 std value\\(s\\), but the images have 3 channels"):
        contract_for(parse_normalize("0.5:0.5"), (3, 8, 8), (0.1,) * 3, (0.2,) * 3)
    assert [c.normalize for c in normalization_candidates((3, 4, 4), (0.1,) * 3, (0.2,) * 3)] == ["dataset", "none", "imagenet"]
    assert [c.normalize for c in normalization_candidates((1, 4, 4), (0.1,), (0.2,))] == ["dataset", "none"]


def test_prepare_gives_what_the_models_take():
    fp32 = InputContract((3, 2, 2), (0.5, 0.25, 0.0), (0.5, 0.25, 1.0), normalize="explicit")
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3) * 10  # NHWC, as stored
    unit = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255
    expected = (unit - np.array([0.5, 0.25, 0.0], np.float32).reshape(3, 1, 1)) / np.array([0.5, 0.25, 1.0], np.float32).reshape(3, 1, 1)
    np.testing.assert_allclose(fp32.prepare(pixels), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fp32.prepare(unit), expected, rtol=0, atol=1e-6)
    a, b = fp32.scale_shift()
    np.testing.assert_allclose(pixels.transpose(0, 3, 1, 2) * a + b, expected, rtol=0, atol=1e-6)
    raw = fp32.with_datatype("UINT8")
    assert raw.prepare(pixels).dtype == np.uint8 and np.array_equal(raw.prepare(pixels), pixels.transpose(0, 3, 1, 2))
    assert np.array_equal(raw.prepare(unit), pixels.transpose(0, 3, 1, 2))  # floats in [0, 1] are rounded to pixels
    with pytest.raises(ValueError, match=r"images have shape \[2, 3, 3, 3\]; expected \(N, 3, 2, 2\)"):
        fp32.prepare(np.zeros((2, 3, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="dtype int32"):
        fp32.prepare(np.zeros((1, 3, 2, 2), np.int32))


def test_values_outside_the_declared_range_warn_or_fail(caplog):
    contract = InputContract((1, 2, 2), (0.0,), (1.0,), normalize="none")
    hot = np.full((1, 1, 2, 2), 300.0, np.float32)
    with pytest.raises(ValueError, match=r"float images must hold pixels in \[0, 1\], found 300..300 \(pixels 0..255\? send them as uint8"):
        contract.prepare(hot)
    with pytest.raises(ValueError, match="NaN or infinite"):
        contract.prepare(np.full((1, 1, 2, 2), np.nan, np.float32))
    lenient = InputContract((1, 2, 2), (0.0,), (1.0,), normalize="none", out_of_range="warn")
    with caplog.at_level(logging.WARNING, logger="nonn"):
        assert lenient.prepare(hot).max() == 1.0
        assert lenient.with_datatype("UINT8").prepare(hot).max() == 255
    assert "clipping to [0, 1]" in caplog.text


def test_contract_round_trips_and_bad_records_are_artifact_errors():
    contract = InputContract((3, 4, 5), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), normalize="dataset", datatype="UINT8")
    assert InputContract.from_dict(contract.to_dict()) == contract
    with pytest.raises(ArtifactError, match="manifest.json: input_contract is missing std"):
        InputContract.from_dict({"input_shape": [1, 2, 2], "mean": [0]}, "manifest.json")
    with pytest.raises(ArtifactError, match=r"p.json: invalid input contract: mean/std need one value per channel \(3\), got 1/1"):
        InputContract.from_dict({"input_shape": [3, 2, 2], "mean": [0], "std": [1]}, "p.json")
    with pytest.raises(ArtifactError, match="datatype must be one of FP32, UINT8"):
        InputContract.from_dict({**contract.to_dict(), "datatype": "FP16"})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("bars"), 60, 16, split="train")
    write_image_folder(root, 15, 16, split="val", seed=1)
    return root


@pytest.fixture(scope="module")
def stored_teacher(folder):
    """The toy ResNet trained by plain PyTorch on the images as stored, floats in [0, 1]."""
    x, y = read_image_folder(folder / "train")
    return train_as_stored(toy_resnet(), x, y)


def test_auto_finds_the_normalisation_a_teacher_was_trained_with(folder, stored_teacher, caplog):
    data = load_dataset(str(folder))
    with caplog.at_level(logging.INFO, logger="nonn"):
        chosen = resolve_contract("auto", data, stored_teacher)
    assert chosen.normalize == "none"
    lines = caplog.text.splitlines()
    scores = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert set(scores) == {"dataset", "none", "imagenet"}
    assert scores["none"].endswith("<- chosen") and "100.0%" in scores["none"]
    assert "accuracy on 60 training images of" in caplog.text
    # Without --normalize, a recorded contract is used as it is, and said; an explicit one overrides it with a warning.
    recorded = Recorded(data.contract("imagenet"), "partition.json")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nonn"):
        assert resolve_contract(None, data, stored_teacher, [recorded]).normalize == "imagenet"
        assert resolve_contract(NormalizeSpec("none"), data, stored_teacher, [recorded]).normalize == "none"
    assert "as recorded in partition.json" in caplog.text
    assert "--normalize none overrides the input normalisation imagenet" in caplog.text


def test_a_teacher_near_chance_under_every_normalisation_is_refused(folder, stored_teacher):
    import copy

    data = load_dataset(str(folder))
    shuffled = copy.deepcopy(stored_teacher)
    with torch.no_grad():  # the class order the user's teacher was trained with is not the folder's
        shuffled.fc.weight.copy_(stored_teacher.fc.weight[[1, 2, 0]])
        shuffled.fc.bias.copy_(stored_teacher.fc.bias[[1, 2, 0]])
    with pytest.raises(ValueError) as info:
        resolve_contract(None, data, shuffled, what="teacher w.pt")
    message = str(info.value)
    assert "teacher w.pt is near chance on 60 training images of" in message
    assert "dataset " in message and "none " in message and "imagenet " in message and "chance is 33.3%" in message
    assert "--weights" in message and "class order (bar, column, diagonal)" in message and "\n" not in message
    assert near_chance_threshold(10, 512) == pytest.approx(0.15)
