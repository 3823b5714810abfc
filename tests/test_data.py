"""Data sets read from tiny files written here, their errors, and the batch loader."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from nonn.students.data import AugmentSpec, DataError, ImageDataset, load_dataset
from nonn.students.dataset_files import read_idx
from nonn.students.loader import augment_batch, make_loader


def write_idx(path, array, compress=True):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def write_fashion_dir(root, n_train=12, n_test=5, compress=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress)
    return root


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_gz_or_raw(tmp_path, compress):
    write_fashion_dir(tmp_path, compress=compress)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.test_x.shape == (5, 1, 28, 28)
    assert ds.train_x.dtype == np.float32 and 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0
    assert ds.train_y.tolist() == [i % 10 for i in range(12)]
    assert ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top"
    assert ds.augment == AugmentSpec(pad=2, flip=True)
    assert ds.mean[0] == pytest.approx(float(ds.train_x.mean()), rel=1e-6)
    assert load_dataset("mnist", data_dir=tmp_path).augment.flip is False  # digits must not be mirrored


def test_corrupt_and_truncated_idx_files_name_the_path(tmp_path):
    write_fashion_dir(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz.*should be 9424 bytes, got 9414"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    images.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))  # labels' magic on the image file
    with pytest.raises(DataError, match="1 dimensions, expected 3"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    images.write_bytes(gzip.compress(raw)[:50])  # truncated gzip stream
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    images.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(images)
    images.unlink()
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "nope")


def write_cifar10(root, n=4, protocol=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return folder


@pytest.mark.parametrize("protocol", [2, 4, 5])  # 2: the format of the published batches
def test_cifar10_batches(tmp_path, protocol):
    folder = write_cifar10(tmp_path, protocol=protocol)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.class_names[-1] == "truck" and len(ds.mean) == 3
    first = pickle.loads((folder / "data_batch_1").read_bytes())[b"data"][0]
    np.testing.assert_allclose(ds.train_x[0], first.reshape(3, 32, 32) / 255.0, rtol=1e-6)
    assert ds.augment == AugmentSpec(pad=4, flip=True)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar_batches_refuse_code_and_bad_shapes(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Payload(), b"labels": []}))
    with pytest.raises(DataError, match="data_batch_3.*refusing to load builtins.print"):
        load_dataset("cifar10", data_dir=tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"data_batch_3.*\(N, 3072\)"):
        load_dataset("cifar10", data_dir=tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"pixels": 1}))
    with pytest.raises(DataError, match="needs keys 'data' and 'labels'"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_npz_layouts_split_and_errors(tmp_path):
    rng = np.random.default_rng(2)
    nhwc = rng.integers(0, 256, (30, 6, 6, 3), dtype=np.uint8)
    labels = np.arange(30) % 3
    np.savez(tmp_path / "toy.npz", x=nhwc, y=labels)
    ds = load_dataset(str(tmp_path / "toy.npz"))
    assert ds.name == "toy" and ds.input_shape == (3, 6, 6) and ds.num_classes == 3
    assert len(ds.train_x) + len(ds.test_x) == 30 and len(ds.test_x) == 6  # stratified 20 %
    again = load_dataset(str(tmp_path / "toy.npz"))
    np.testing.assert_array_equal(ds.test_y, again.test_y)  # deterministic split

    floats = rng.random((8, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "gray.npz", x=floats, y=np.arange(8) % 2, x_test=floats[:3], y_test=np.array([0, 1, 1]))
    gray = load_dataset(str(tmp_path / "gray.npz"))
    assert gray.input_shape == (1, 5, 5) and len(gray.test_x) == 3
    np.testing.assert_array_equal(gray.train_x[:, 0], floats)

    np.savez(tmp_path / "bad.npz", x=floats * 10, y=np.arange(8))
    with pytest.raises(DataError, match=r"bad.npz.*\[0, 1\]"):
        load_dataset(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "nolabels.npz", images=floats)
    with pytest.raises(DataError, match="must contain arrays 'x' and 'y'"):
        load_dataset(str(tmp_path / "nolabels.npz"))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="broken.npz: not a readable .npz"):
        load_dataset(str(tmp_path / "broken.npz"))
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def test_digits_split_is_deterministic_and_normalize_uses_train_stats():
    ds = load_dataset("digits")
    assert ds.input_shape == (1, 8, 8) and len(ds.train_x) + len(ds.test_x) == 1797
    assert np.array_equal(ds.test_y, load_dataset("digits").test_y)
    z = ds.normalize(ds.train_x)
    assert z.dtype == np.float32
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1.0) < 1e-3
    assert ds.meta()["input_shape"] == [1, 8, 8]


def tiny_dataset(n=10, c=2, h=5, w=4, pad=1, flip=True):
    x = np.random.default_rng(3).random((n, c, h, w)).astype(np.float32)
    y = np.arange(n) % 3
    return ImageDataset("tiny", x, y, x[:4], y[:4], 3, ["a", "b", "c"], augment=AugmentSpec(pad=pad, flip=flip))


def test_augment_batch_matches_a_per_image_reference():
    x = torch.rand(6, 2, 5, 4)
    spec = AugmentSpec(pad=2, flip=True)
    out = augment_batch(x, spec, torch.Generator().manual_seed(7))
    # Replay the same random draws and crop/flip each image by hand.
    g = torch.Generator().manual_seed(7)
    dy = torch.randint(0, 5, (6,), generator=g)
    dx = torch.randint(0, 5, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        ref = padded[i, :, dy[i] : dy[i] + 5, dx[i] : dx[i] + 4]
        torch.testing.assert_close(out[i], ref.flip(-1) if flip[i] else ref, rtol=0, atol=0)
    assert flip.any() and (dy != 2).any()  # the draw above really exercised crops and flips


def test_loader_normalises_shuffles_and_resumes_exactly():
    ds = tiny_dataset()
    test = make_loader(ds, split="test", batch_size=3)
    assert len(test) == 2 and not test.train
    xs, ys = zip(*test)
    torch.testing.assert_close(torch.cat(xs), torch.from_numpy(ds.normalize(ds.test_x)))
    assert torch.cat(ys).tolist() == ds.test_y.tolist()

    train = make_loader(ds, batch_size=4, seed=5)
    first_pass = [y.tolist() for _, y in train]
    assert sorted(sum(first_pass, [])) == sorted(ds.train_y.tolist()) and len(first_pass) == 3
    state = train.state_dict()
    second = [(x.clone(), y.clone()) for x, y in train]
    resumed = make_loader(ds, batch_size=4, seed=123)
    resumed.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(second, resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert make_loader(ds, batch_size=4, limit=5, drop_last=True).__len__() == 1
    with pytest.raises(ValueError, match="batch size"):
        make_loader(ds, batch_size=0)
