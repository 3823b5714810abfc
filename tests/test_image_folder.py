"""Image-folder data sets written here: layouts, splits, resizing, errors, and the batch loader."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from nonn.cli import main
from nonn.runtime.input_contract import InputContract
from nonn.students.data import DataError, DataSpec, load_dataset, resolve_data
from nonn.students.image_folder import ImageFolderDataset
from nonn.students.loader import make_loader

from byo_testing import bar_images, write_image_folder


def test_class_folders_get_a_seeded_stratified_split(tmp_path):
    write_image_folder(tmp_path, 30, 16)
    data = load_dataset(str(tmp_path))
    assert isinstance(data, ImageFolderDataset)
    assert data.class_names == ["bar", "column", "diagonal"] and data.num_classes == 3
    assert data.input_shape == (3, 16, 16)
    assert data.split_size("train") == 24 and data.split_size("test") == 6
    assert np.bincount(data.labels("test")).tolist() == [2, 2, 2]
    again = load_dataset(str(tmp_path))
    assert again.files == data.files
    # Pixels come back exactly as stored: uint8, (n, C, H, W).
    first = data.files["train"][0]
    stored = np.asarray(Image.open(first)).transpose(2, 0, 1)
    assert np.array_equal(data.read("train", [0])[0], stored)
    assert data.meta()["spec"] == DataSpec(str(tmp_path.resolve())).to_dict()
    mean = np.mean([data.read("train", [i]).mean(axis=(0, 2, 3)) for i in range(24)], axis=0) / 255
    assert data.mean == pytest.approx(tuple(mean), abs=1e-6)


def test_train_and_val_folders_are_the_splits(tmp_path):
    write_image_folder(tmp_path, 12, 8, channels=1, split="train")
    write_image_folder(tmp_path, 6, 8, channels=1, split="val", classes=("bar", "column", "diagonal"))
    data = load_dataset(str(tmp_path))
    assert data.split_size("train") == 12 and data.split_size("test") == 6
    assert data.input_shape == (1, 8, 8)  # grayscale PNGs stay one channel
    assert "val/" in data.layout
    (tmp_path / "val" / "zebra").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "val" / "zebra" / "0.png")
    with pytest.raises(DataError, match=r"class folder\(s\) zebra do not exist in the training split"):
        load_dataset(str(tmp_path))


def test_image_size_resizes_and_colour_wins(tmp_path):
    write_image_folder(tmp_path, 9, 20)
    Image.fromarray(np.full((30, 10), 128, np.uint8)).save(tmp_path / "bar" / "gray-and-tall.png")
    with pytest.raises(DataError, match=r"2 different sizes: 20x20 \(9 images.*10x30 \(1 image,.*gray-and-tall.png.*--image-size"):
        load_dataset(str(tmp_path))
    data = load_dataset(str(tmp_path), image_size=(12, 14))
    assert data.input_shape == (3, 12, 14)  # one colour image makes the set RGB
    x = data.read("train", np.arange(data.split_size("train")))
    assert x.shape == (data.split_size("train"), 3, 12, 14) and x.dtype == np.uint8


def test_empty_class_folder_and_unreadable_image(tmp_path):
    write_image_folder(tmp_path, 6, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: class folder 'empty' holds no images"):
        load_dataset(str(tmp_path))
    (tmp_path / "empty").rmdir()
    (tmp_path / "bar" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"bar/broken.png: not a readable image"):
        load_dataset(str(tmp_path))


@pytest.mark.parametrize(
    "setup, args, message",
    [
        ("empty", [], r"^nonn: error: \S+/empty: class folder 'empty' holds no images"),
        ("broken", [], r"^nonn: error: \S+/bar/broken.png: not a readable image"),
        ("mixed", [], r"^nonn: error: \S+: images have 2 different sizes: .* pass --image-size H\[,W\] to resize them all"),
        ("none", ["--normalize", "0.5,0.5:0.2,0.2"],
         r"^nonn: error: --normalize 0.5,0.5:0.2,0.2: 2 mean and 2 std value\(s\), but the images have 3 channels"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, setup, args, message):
    data = write_image_folder(tmp_path / "images", 9, 8)
    if setup == "empty":
        (data / "empty").mkdir()
    elif setup == "broken":
        (data / "bar" / "broken.png").write_bytes(b"not an image")
    elif setup == "mixed":
        Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(data / "bar" / "odd.png")
    code = main(["train-teacher", "--dataset", str(data), "--arch", "cnn-small", "--epochs", "1", "--out",
                 str(tmp_path / "t.pt"), "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert __import__("re").match(message, err), err


def folder_and_arrays(tmp_path, n=40, size=12):
    """A folder of PNGs and the same images as a float array in [0, 1], in the folder's order."""
    write_image_folder(tmp_path, n, size)
    data = load_dataset(str(tmp_path))
    x = {split: data.read(split, np.arange(data.split_size(split))).astype(np.float32) / 255 for split in ("train", "test")}
    return data, x


def test_loader_over_a_folder_gives_the_in_memory_batches(tmp_path):
    from nonn.students.data import ImageDataset

    data, x = folder_and_arrays(tmp_path)
    memory = ImageDataset("same", x["train"], data.labels("train"), x["test"], data.labels("test"), 3, data.class_names,
                          augment=data.augment)
    contract = InputContract(data.input_shape, (0.2, 0.3, 0.4), (0.5, 0.6, 0.7), normalize="explicit")
    for workers in (0, 2):
        from_disk = make_loader(data, "train", batch_size=7, seed=3, contract=contract, workers=workers)
        in_memory = make_loader(memory, "train", batch_size=7, seed=3, contract=contract)
        for _ in range(2):  # two passes: the order and the augmentation follow the same generator
            pairs = list(zip(from_disk, in_memory))
            assert len(pairs) == len(in_memory) == 5
            for (xa, ya), (xb, yb) in pairs:
                assert torch.equal(ya, yb)
                assert torch.allclose(xa, xb, atol=1e-6)
        assert torch.equal(from_disk.state_dict()["generator"], in_memory.state_dict()["generator"])


def test_a_bad_file_found_by_a_worker_is_one_error(tmp_path):
    data, _ = folder_and_arrays(tmp_path, n=12)
    data.files["train"][5].write_bytes(b"truncated")
    loader = make_loader(data, "train", batch_size=4, train=False, workers=2, contract=data.contract("none"))
    with pytest.raises(DataError, match=r"^\S+\.png: not a readable image \(") as info:
        list(loader)
    assert "Traceback" not in str(info.value)


def test_reading_a_folder_holds_one_batch_not_the_data_set(tmp_path):
    """numpy buffers are traced by tracemalloc: a pass over 300 images in batches of 10 must
    never hold more than a few batches of pixels."""
    write_image_folder(tmp_path, 300, 32)
    data = load_dataset(str(tmp_path))
    loader = make_loader(data, "train", batch_size=10, train=False, contract=data.contract("none"))
    data_set_bytes = data.split_size("train") * 3 * 32 * 32  # as uint8; float32 would be 4x this
    tracemalloc.start()
    try:
        seen = sum(len(y) for _, y in loader)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == 240
    assert peak < data_set_bytes / 4, f"peak {peak} bytes while reading {data_set_bytes} bytes of images"


def test_recorded_data_spec_is_reused_and_said(tmp_path, caplog):
    write_image_folder(tmp_path / "imgs", 9, 10)
    spec = DataSpec.of(str(tmp_path / "imgs"), image_size=(6, 6))
    with caplog.at_level("INFO", logger="nonn"):
        data = resolve_data(None, recorded=[(None, "first.json"), ({"spec": spec.to_dict()}, "students.pt")])
    assert data.input_shape == (3, 6, 6)
    assert "data set: " + str((tmp_path / "imgs").resolve()) + ", images resized to 6x6, as recorded in students.pt" in caplog.text
    with pytest.raises(DataError, match="--dataset is required: a.json record"):
        resolve_data(None, recorded=[({}, "a.json")])
    assert resolve_data("digits", recorded=[({"spec": spec.to_dict()}, "x")]).name == "digits"


def test_image_size_resizes_named_sets_too():
    data = load_dataset("digits", image_size=16)
    assert data.input_shape == (1, 16, 16) and data.train_x.max() <= 1.0
    assert data.augment.pad == 2


def test_teacher_on_a_folder_resumes_exactly_with_workers(tmp_path, monkeypatch):
    """Workers only decode; every random draw stays in the main process, so a run stopped after
    its first checkpoint and resumed (with another number of workers) ends with the same weights."""
    import nonn.students.teacher as teacher_module
    from nonn.students.teacher import TeacherConfig, train_teacher

    write_image_folder(tmp_path / "imgs", 30, 8, channels=1)
    base = dict(dataset=str(tmp_path / "imgs"), arch="cnn-small", arch_kwargs={"width": 4}, epochs=2, batch_size=8,
                lr=0.05, seed=1, device="cpu", progress=False, normalize="none", threads=1)
    straight = train_teacher(TeacherConfig(**base, out=str(tmp_path / "a.pt"), workers=2))
    assert straight["input_contract"]["normalize"] == "none"

    real_save = teacher_module.save_checkpoint

    def save_then_stop(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(teacher_module, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(TeacherConfig(**base, out=str(tmp_path / "b.pt"), workers=2))
    monkeypatch.setattr(teacher_module, "save_checkpoint", real_save)
    resumed = train_teacher(TeacherConfig(**base, out=str(tmp_path / "b.pt"), workers=0, resume=True))
    assert resumed["epoch"] == 2
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
