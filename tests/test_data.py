"""Dataset loaders: digits for real, the others against tiny fixtures in each dataset's real on-disk layout."""
import copy
import gzip
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from poisongrid import data
from poisongrid.data import DATASETS, load_dataset
from poisongrid.errors import ConfigError, DatasetError

# ---- digits -------------------------------------------------------------------------------------


def test_digits_shapes_values_and_split():
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.classes == [str(i) for i in range(10)] and ds.num_classes == 10
    assert ds.image_shape == (3, 32, 32)
    n = len(ds.train.labels) + len(ds.test.labels)
    assert n == 1797 and len(ds.test.labels) == math.ceil(0.2 * 1797)
    for s in (ds.train, ds.test):
        assert s.images.dtype == np.uint8 and s.images.shape == (len(s.labels), 3, 32, 32)
        assert s.labels.dtype == np.int64 and set(np.unique(s.labels)) == set(range(10))  # stratified
        assert np.array_equal(s.images[:, 0], s.images[:, 1]) and np.array_equal(s.images[:, 0], s.images[:, 2])
    assert ds.train.images.min() == 0 and ds.train.images.max() == 255
    # Class proportions in test follow the full set (stratification), within one image per class.
    full = np.bincount(np.concatenate([ds.train.labels, ds.test.labels]))
    assert np.all(np.abs(np.bincount(ds.test.labels) - full * 0.2) <= 1)


def test_digits_pixels_match_sklearn_and_split_is_disjoint():
    from sklearn.datasets import load_digits

    raw = load_digits()
    ds = load_dataset("digits", image_size=8)
    expect = np.rint(raw.images * 255 / 16).astype(np.uint8)
    # train + test is exactly a partition of the sklearn (image, label) pairs: nothing shared, nothing lost.
    want = sorted((im.tobytes(), int(y)) for im, y in zip(expect, raw.target))
    got = sorted((im[0].tobytes(), int(y)) for s in (ds.train, ds.test) for im, y in zip(s.images, s.labels))
    assert got == want


def test_digits_deterministic_and_options():
    a, b = load_dataset("digits", image_size=16), load_dataset("digits", image_size=16)
    for s in ("train", "test"):
        assert np.array_equal(getattr(a, s).images, getattr(b, s).images)
        assert np.array_equal(getattr(a, s).labels, getattr(b, s).labels)
    assert a.image_shape == (3, 16, 16)
    small = load_dataset("digits", image_size=8)
    # Nearest-neighbour 8 -> 16 is a 2x2 block repeat of the 8x8 image.
    assert np.array_equal(a.train.images, small.train.images.repeat(2, axis=2).repeat(2, axis=3))
    c = load_dataset("digits", test_fraction=0.5, split_seed=3)
    assert len(c.test.labels) == math.ceil(0.5 * 1797)
    d = load_dataset("digits", split_seed=1)
    assert not np.array_equal(d.test.images, load_dataset("digits").test.images)


def test_bad_names_and_options():
    with pytest.raises(ConfigError, match="digits") as e:
        load_dataset("mnist")
    assert e.value.key == "dataset" and e.value.value == "mnist"
    with pytest.raises(ConfigError, match="split_seed") as e:
        load_dataset("digits", test_frac=0.1)
    assert "test_frac" in str(e.value) and "test_fraction" in str(e.value)
    with pytest.raises(ConfigError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.5)
    with pytest.raises(ConfigError, match="variant"):
        load_dataset("cifar10", variant="full")
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("digits", image_size=0)
    assert DATASETS.names() == ["cifar10", "digits", "fashion_mnist", "folder", "gtsrb", "imagenet", "imagenette", "npz"]


# ---- cifar10 ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fixture_checksums(monkeypatch):
    """The fixtures are not the real batches: accept the md5 of whatever _write_cifar wrote."""
    real = dict(data.cifar10.CIFAR_MD5)
    written = {}
    monkeypatch.setattr(data.cifar10, "CIFAR_MD5", written)
    yield real, written


def _write_cifar(root, per_batch=4, checksums=True):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        # The official files are Python 2 pickles; mix str and bytes keys to cover both readings.
        keys = ("data", "labels") if name.endswith("1") else (b"data", b"labels")
        with open(folder / name, "wb") as fh:
            pickle.dump({keys[0]: x, keys[1]: y, b"batch_label": name.encode()}, fh, protocol=2)
        batches[name] = (x, y)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, fh, protocol=2)
    if checksums:
        for f in folder.iterdir():
            data.cifar10.CIFAR_MD5[f.name] = data.cifar10._md5(f)
    return batches


def test_cifar10_round_trip(tmp_path):
    batches = _write_cifar(tmp_path)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.classes[0] == "airplane" and ds.num_classes == 10 and ds.image_shape == (3, 32, 32)
    x = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert ds.train.images.dtype == np.uint8 and ds.train.images.shape == (20, 3, 32, 32)
    assert np.array_equal(ds.train.images, x.reshape(-1, 3, 32, 32))
    # Pixel (row 5, col 7) of the green plane sits at 1024 + 5*32 + 7 in the flat CIFAR row.
    assert ds.train.images[3, 1, 5, 7] == x[3, 1024 + 5 * 32 + 7]
    assert ds.train.labels.dtype == np.int64
    assert ds.train.labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert np.array_equal(ds.test.images.reshape(4, -1), batches["test_batch"][0])
    big = load_dataset("cifar10", data_dir=tmp_path, image_size=48)
    assert big.image_shape == (3, 48, 48) and big.test.images.dtype == np.uint8
    assert np.array_equal(big.test.labels, ds.test.labels)


def test_cifar10_corrupt_batch(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02}q\x00")  # truncated pickle
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar10_is_unpickled_only_after_its_published_checksum(tmp_path, monkeypatch, _fixture_checksums):
    real, _ = _fixture_checksums
    _write_cifar(tmp_path, checksums=False)
    monkeypatch.setattr(data.cifar10, "CIFAR_MD5", real)  # the published md5s: the fixture matches none
    loaded = []
    monkeypatch.setattr(data.cifar10.pickle, "load", lambda *a, **k: loaded.append(a) or {})
    with pytest.raises(DatasetError, match=r"not the published .*\(a pickle can run code\)"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not loaded  # nothing was unpickled
    assert real["data_batch_1"] == "c99cafc152244af753f735de768cd75f" and len(real) == 7


def test_resize_is_shorter_side_then_centre_crop():
    # 64 wide x 32 high, leftmost quarter white: a centre crop of the 32x32 middle drops it, a squash would not.
    wide = np.zeros((32, 64), np.uint8)
    wide[:, :16] = 255
    out = data.base.resize_square(Image.fromarray(wide, "L"), 16)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8
    assert np.all(out[:, :, 2:] == 0) and out[0, 0, 0] < 255
    tall = Image.fromarray(np.ascontiguousarray(wide.T), "L")  # same for a tall image, vertically
    out = data.base.resize_square(tall, 16)
    assert np.all(out[:, 2:, :] == 0) and np.all(out[:, :, 0] == out[:, :, 5])


# ---- gtsrb --------------------------------------------------------------------------------------


def _write_gtsrb(root):
    base = root / "gtsrb"
    rng = np.random.default_rng(1)
    for c in range(43):
        d = base / "GTSRB" / "Training" / f"{c:05d}"
        d.mkdir(parents=True)
        (d / f"GT-{c:05d}.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n")
        for k, (w, h) in enumerate([(30 + c % 7, 34), (52, 45 + c % 5)]):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"00000_{k:05d}.ppm")
    test = base / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows, ids = [], [7, 0, 42, 13]
    for i, c in enumerate(ids):
        w, h = 25 + 9 * i, 40 - 3 * i
        Image.fromarray(np.full((h, w, 3), 10 * i, np.uint8)).save(test / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;{w};{h};5;5;{w - 5};{h - 5};{c}")
    (base / "GT-final_test.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n" + "\n".join(rows) + "\n")
    return ids


def test_gtsrb_resize_labels_and_cache(tmp_path, monkeypatch):
    ids = _write_gtsrb(tmp_path)
    ds = load_dataset("gtsrb", data_dir=tmp_path)
    assert ds.num_classes == 43 and ds.image_shape == (3, 32, 32)
    assert ds.train.images.dtype == np.uint8 and ds.train.images.shape == (86, 3, 32, 32)
    assert ds.train.labels.dtype == np.int64 and ds.train.labels.tolist() == [c for c in range(43) for _ in range(2)]
    assert ds.test.labels.tolist() == ids
    assert np.all(ds.test.images[2] == 20)  # a flat image stays flat through resize + crop
    # The resize matches the documented recipe (shorter side -> 32 bilinear, centre crop).
    first = Image.open(tmp_path / "gtsrb/GTSRB/Training/00000/00000_00001.ppm")
    assert np.array_equal(ds.train.images[1], data.base.resize_square(first, 32))

    cache = tmp_path / ".poisongrid-cache"
    assert (cache / "gtsrb-32px-train-images.npy").exists()

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data.base, "resize_square", boom)
    again = load_dataset("gtsrb", data_dir=tmp_path)
    assert isinstance(again.train.images, np.memmap)
    assert np.array_equal(again.train.images, ds.train.images) and np.array_equal(again.test.labels, ds.test.labels)
    assert again.classes == ds.classes
    # Another size never reuses the 32 px cache: it must decode, which now fails.
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("gtsrb", data_dir=tmp_path, image_size=24)
    assert not (cache / "gtsrb-24px-meta.json").exists()
    monkeypatch.undo()
    small = load_dataset("gtsrb", data_dir=tmp_path, image_size=24, cache_dir=tmp_path / "c2")
    assert small.image_shape == (3, 24, 24) and (tmp_path / "c2" / "gtsrb-24px-test-labels.npy").exists()


def test_gtsrb_incomplete_class_folders(tmp_path):
    _write_gtsrb(tmp_path)
    for f in (tmp_path / "gtsrb/GTSRB/Training/00042").iterdir():
        f.unlink()
    (tmp_path / "gtsrb/GTSRB/Training/00042").rmdir()
    with pytest.raises(DatasetError, match="Training"):
        load_dataset("gtsrb", data_dir=tmp_path)


# ---- imagenette / imagenet ----------------------------------------------------------------------


def _write_folder(root, classes, sizes, ext=".JPEG"):
    for ci, c in enumerate(classes):
        d = root / c
        d.mkdir(parents=True)
        for k, (w, h) in enumerate(sizes):
            Image.fromarray(np.full((h, w, 3), 40 * ci + k, np.uint8)).save(d / f"{c}_{k}{ext}", quality=100)


def test_imagenette(tmp_path):
    root = tmp_path / "imagenette2-160"
    wnids = ["n03888257", "n01440764"]  # parachute, tench: sorted order puts tench first
    _write_folder(root / "train", wnids, [(40, 30), (30, 50), (64, 64)])
    _write_folder(root / "val", wnids, [(50, 20)])
    ds = load_dataset("imagenette", data_dir=tmp_path, image_size=16, variant="160px")
    assert ds.classes == ["tench", "parachute"]
    assert ds.train.images.shape == (6, 3, 16, 16) and ds.test.images.shape == (2, 3, 16, 16)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.test.labels.tolist() == [0, 1]
    # tench images were written with values 40*1 + k (JPEG at quality 100 keeps flat colours near-exact).
    assert abs(int(ds.train.images[0].mean()) - 40) <= 1 and abs(int(ds.train.images[3].mean()) - 0) <= 1
    with pytest.raises(DatasetError, match="imagenette2"):  # the full variant is not there
        load_dataset("imagenette", data_dir=tmp_path, image_size=16)


def test_imagenet_imagefolder(tmp_path):
    _write_folder(tmp_path / "train", ["zebra", "apple"], [(20, 30), (33, 17)], ext=".png")
    _write_folder(tmp_path / "val", ["zebra", "apple"], [(10, 10)], ext=".png")
    ds = load_dataset("imagenet", data_dir=tmp_path, image_size=12)
    assert ds.classes == ["apple", "zebra"] and ds.image_shape == (3, 12, 12)
    assert ds.train.labels.tolist() == [0, 0, 1, 1] and ds.test.labels.tolist() == [0, 1]
    assert np.all(ds.train.images[2] == 0) and np.all(ds.train.images[1] == 41)  # PNG is lossless
    (tmp_path / "val" / "zebra" / "zebra_0.png").unlink()
    (tmp_path / "val" / "zebra").rmdir()
    with pytest.raises(DatasetError, match="different class folders"):
        load_dataset("imagenet", data_dir=tmp_path, image_size=16)


# ---- missing data -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, looked_for", [
    ("cifar10", "cifar-10-batches-py"),
    ("gtsrb", "gtsrb/GTSRB/Training"),
    ("imagenette", "imagenette2/train"),
    ("imagenet", "train"),
    ("fashion_mnist", "fashion-mnist/train-images-idx3-ubyte"),
])
def test_missing_dataset_names_path(tmp_path, monkeypatch, name, looked_for):
    monkeypatch.setattr(data.fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-copy")
    with pytest.raises(DatasetError) as e:
        load_dataset(name, data_dir=tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / looked_for) in msg
    assert "download: true" in msg and "layout" in msg.lower()


def test_torchvision_not_found_becomes_dataset_error(tmp_path, monkeypatch):
    # A layout that passes our checks but that torchvision rejects still surfaces as DatasetError.
    _write_gtsrb(tmp_path)
    import torchvision.datasets as tvd

    def not_found(*a, **k):
        raise RuntimeError("Dataset not found. You can use download=True to download it")

    monkeypatch.setattr(tvd, "GTSRB", not_found)
    with pytest.raises(DatasetError, match="Dataset not found") as e:
        load_dataset("gtsrb", data_dir=tmp_path)
    assert str(tmp_path / "gtsrb") in str(e.value)


# ---- fashion_mnist ------------------------------------------------------------------------------


def _write_idx(path, magic, arr, gz):
    body = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(body))
    else:
        path.write_bytes(body)
    return path


def _write_fashion(folder, n_train=5, n_test=3, seed=0):
    """Tiny Fashion-MNIST: train files gzipped (as Debian ships them), test files not."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    arrays = {}
    for split, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(folder / f"{split}-images-idx3-ubyte", 0x803, x, gz)
        _write_idx(folder / f"{split}-labels-idx1-ubyte", 0x801, y, gz)
        arrays[split] = (x, y)
    return arrays


@pytest.fixture
def no_system_fashion(tmp_path, monkeypatch):
    """Hide a system-wide Fashion-MNIST (Debian's package) so that only the fixtures are seen."""
    monkeypatch.setattr(data.fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    return tmp_path / "system"


def test_fashion_mnist_round_trip(tmp_path, no_system_fashion):
    arrays = _write_fashion(tmp_path / "fashion-mnist")
    ds = load_dataset("fashion_mnist", data_dir=tmp_path)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[-1] == "Ankle boot" and ds.num_classes == 10
    assert ds.train.images.dtype == np.uint8 and ds.train.images.shape == (5, 3, 28, 28)
    assert ds.test.images.shape == (3, 3, 28, 28) and ds.test.labels.dtype == np.int64
    for split, s in (("train", ds.train), ("t10k", ds.test)):
        x, y = arrays[split]
        assert all(np.array_equal(s.images[:, c], x) for c in range(3)) and s.labels.tolist() == y.tolist()
    padded = load_dataset("fashion_mnist", data_dir=tmp_path, image_size=32)
    assert padded.image_shape == (3, 32, 32) and np.array_equal(padded.train.images[:, :, 2:30, 2:30], ds.train.images)
    border = padded.train.images.copy()
    border[:, :, 2:30, 2:30] = 0
    assert not border.any()  # the 2 px frame is zeros
    small = load_dataset("fashion_mnist", data_dir=tmp_path, image_size=14)
    assert small.image_shape == (3, 14, 14) and small.train.images.dtype == np.uint8
    assert data.train_size("fashion_mnist", tmp_path, {}) == 5


def test_fashion_mnist_search_order(tmp_path, no_system_fashion):
    system = _write_fashion(no_system_fashion, n_train=4, seed=1)
    ds = load_dataset("fashion_mnist", data_dir=tmp_path / "empty")  # falls back to the system copy
    assert np.array_equal(ds.train.images[:, 0], system["train"][0])
    assert data.train_size("fashion_mnist", tmp_path / "empty", {}) == 4
    _write_fashion(tmp_path / "fashion-mnist", n_train=6, seed=2)
    assert len(load_dataset("fashion_mnist", data_dir=tmp_path).train.labels) == 6  # data_dir first
    _write_fashion(tmp_path / "elsewhere", n_train=2, seed=3)
    assert len(load_dataset("fashion_mnist", data_dir=tmp_path, path="elsewhere").train.labels) == 2
    assert data.train_size("fashion_mnist", tmp_path, {"path": str(tmp_path / "elsewhere")}) == 2
    assert data.train_size("fashion_mnist", tmp_path, {"path": "nowhere"}) is None


@pytest.mark.parametrize("damage, match", [
    ("cut_gz", "unreadable"),          # a gzip stream cut short
    ("cut_raw", "truncated"),          # fewer pixels than the header declares
    ("labels_as_images", "magic number 0x00000801"),
    ("short_header", "truncated IDX header"),
])
def test_fashion_mnist_bad_files(tmp_path, no_system_fashion, damage, match):
    folder = tmp_path / "fashion-mnist"
    _write_fashion(folder)
    if damage == "cut_gz":
        f = folder / "train-images-idx3-ubyte.gz"
        f.write_bytes(f.read_bytes()[:-40])
    elif damage == "cut_raw":
        f = folder / "t10k-images-idx3-ubyte"
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "labels_as_images":
        f = folder / "t10k-images-idx3-ubyte"
        f.write_bytes((folder / "t10k-labels-idx1-ubyte").read_bytes())
    else:
        f = folder / "t10k-labels-idx1-ubyte"
        f.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DatasetError, match=match) as e:
        load_dataset("fashion_mnist", data_dir=tmp_path)
    assert str(f) in str(e.value)


def test_fashion_mnist_label_count_mismatch(tmp_path, no_system_fashion):
    folder = tmp_path / "fashion-mnist"
    _write_fashion(folder)
    _write_idx(folder / "t10k-labels-idx1-ubyte", 0x801, np.zeros(2, np.uint8), gz=False)
    with pytest.raises(DatasetError, match="2 labels for the 3 images"):
        load_dataset("fashion_mnist", data_dir=tmp_path)


def test_fashion_mnist_missing_names_both_places(tmp_path, no_system_fashion):
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion_mnist", data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte") in msg and str(no_system_fashion) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert data.train_size("fashion_mnist", tmp_path, {}) is None


REAL_FASHION = data.FASHION_MNIST_SYSTEM_DIR


@pytest.mark.skipif(not (REAL_FASHION / "train-labels-idx1-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_package(tmp_path):
    assert data.train_size("fashion_mnist", tmp_path, {}) == 60000
    ds = load_dataset("fashion_mnist", data_dir=tmp_path, image_size=32)
    assert ds.train.images.shape == (60000, 3, 32, 32) and ds.test.images.shape == (10000, 3, 32, 32)
    assert np.bincount(ds.train.labels).tolist() == [6000] * 10 and np.bincount(ds.test.labels).tolist() == [1000] * 10


# ---- folder -------------------------------------------------------------------------------------


def test_folder_loader(tmp_path):
    base = tmp_path / "mine"
    _write_folder(base / "train", ["dog", "cat"], [(20, 30), (33, 17)], ext=".png")
    _write_folder(base / "test", ["dog"], [(10, 12)], ext=".jpg")
    (base / "train" / "cat" / "notes.txt").write_text("not an image")
    Image.new("RGB", (5, 5)).save(base / "train" / "cat" / ".hidden.png")
    (base / "train" / ".ipynb_checkpoints").mkdir()
    ds = load_dataset("folder", data_dir=tmp_path, image_size=8, root="mine")
    assert ds.name == "folder" and ds.classes == ["cat", "dog"] and ds.image_shape == (3, 8, 8)
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.tolist() == [0, 0, 1, 1]
    assert ds.test.labels.tolist() == [1] and ds.test.labels.dtype == np.int64
    assert np.all(ds.train.images[0] == 40) and np.all(ds.train.images[3] == 1)  # flat PNGs stay exact
    assert data.train_size("folder", tmp_path, {"root": "mine"}) == 4
    assert isinstance(load_dataset("folder", data_dir=tmp_path, image_size=8, root="mine").train.images, np.memmap)
    # A new image makes a new cache instead of reusing the stale one.
    Image.new("RGB", (9, 9)).save(base / "train" / "cat" / "extra.png")
    assert len(load_dataset("folder", data_dir=tmp_path, image_size=8, root="mine").train.labels) == 5
    assert data.train_size("folder", tmp_path, {"root": "mine"}) == 5


def test_folder_image_size(tmp_path):
    _write_folder(tmp_path / "train", ["a", "b"], [(12, 12)], ext=".png")
    _write_folder(tmp_path / "test", ["a", "b"], [(12, 12)], ext=".png")
    ds = load_dataset("folder", data_dir=tmp_path)  # one square size: kept as it is
    assert ds.image_shape == (3, 12, 12) and ds.train.labels.tolist() == [0, 1]
    Image.new("RGB", (12, 20)).save(tmp_path / "test" / "b" / "odd.png")
    with pytest.raises(ConfigError, match="vary in size") as e:
        load_dataset("folder", data_dir=tmp_path)
    assert e.value.key == "image_size" and "odd.png" in str(e.value)
    assert load_dataset("folder", data_dir=tmp_path, image_size=12).test.labels.tolist() == [0, 1, 1]


def test_folder_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="layout") as e:
        load_dataset("folder", data_dir=tmp_path, image_size=8)
    assert str(tmp_path / "train") in str(e.value)
    assert data.train_size("folder", tmp_path, {}) is None
    _write_folder(tmp_path / "train", ["a", "b"], [(8, 8)], ext=".png")
    _write_folder(tmp_path / "test", ["a", "zebra"], [(8, 8)], ext=".png")
    with pytest.raises(DatasetError, match="zebra"):
        load_dataset("folder", data_dir=tmp_path, image_size=8)
    with pytest.raises(ConfigError, match="options.root"):
        load_dataset("folder", data_dir=tmp_path, root=3)
    (tmp_path / "train" / "a" / "a_0.png").write_bytes(b"not a png")
    (tmp_path / "test" / "zebra" / "zebra_0.png").unlink()
    (tmp_path / "test" / "zebra").rmdir()
    with pytest.raises(DatasetError, match="a_0.png"):
        load_dataset("folder", data_dir=tmp_path, image_size=8)


# ---- npz ----------------------------------------------------------------------------------------


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (6, 10, 10, 3), dtype=np.uint8)
    nchw1 = rng.integers(0, 256, (2, 1, 10, 10), dtype=np.uint8)
    np.savez_compressed(tmp_path / "a.npz", x_train=nhwc, y_train=np.array([0, 1, 2, 0, 1, 2]),
                        x_test=nchw1, y_test=np.array([2, 0], np.int32), classes=np.array(["ant", "bee", "cat"]))
    ds = load_dataset("npz", data_dir=tmp_path, path="a.npz")
    assert ds.classes == ["ant", "bee", "cat"] and ds.image_shape == (3, 10, 10)
    assert np.array_equal(ds.train.images, nhwc.transpose(0, 3, 1, 2)) and ds.train.labels.dtype == np.int64
    assert np.array_equal(ds.test.images, np.repeat(nchw1, 3, axis=1)) and ds.test.labels.tolist() == [2, 0]
    assert data.train_size("npz", tmp_path, {"path": "a.npz"}) == 6
    gray = rng.integers(0, 256, (4, 9, 9), dtype=np.uint8)
    np.savez(tmp_path / "b.npz", x_train=gray, y_train=np.array([0, 3, 1, 1]), x_test=gray[:1], y_test=np.array([1]))
    ds = load_dataset("npz", data_dir=tmp_path, path=str(tmp_path / "b.npz"), image_size=16)
    assert ds.classes == ["0", "1", "2", "3"] and ds.image_shape == (3, 16, 16) and ds.train.images.dtype == np.uint8
    assert data.train_size("npz", tmp_path, {"path": "b.npz"}) == 4
    assert data.train_size("npz", tmp_path, {"path": "c.npz"}) is None


@pytest.mark.parametrize("change, match", [
    ({"y_test": None}, r"missing array\(s\) \['y_test'\]"),
    ({"x_train": np.zeros((3, 8, 8), np.float32)}, "x_train has dtype float32"),
    ({"x_test": np.zeros((1, 8, 8, 2), np.uint8)}, "x_test has shape"),
    ({"y_train": np.array([0.0, 1.0, 1.0])}, "y_train has dtype float64"),
    ({"y_train": np.array([0, 1])}, "y_train has dtype"),
    ({"y_test": np.array([2])}, "y_test holds label 2 outside 0..1"),
    ({"y_train": np.array([0, -1, 1])}, "label -1"),
    ({"classes": np.array(["a", "b"], dtype=object)}, "classes cannot be read without pickle"),
])
def test_npz_errors(tmp_path, change, match):
    arrays = {"x_train": np.zeros((3, 8, 8), np.uint8), "y_train": np.array([0, 1, 1]),
              "x_test": np.zeros((1, 8, 8), np.uint8), "y_test": np.array([0]), "classes": np.array(["a", "b"])}
    arrays.update(change)
    np.savez(tmp_path / "d.npz", **{k: v for k, v in arrays.items() if v is not None}, allow_pickle=True)
    with pytest.raises(DatasetError, match=match) as e:
        load_dataset("npz", data_dir=tmp_path, path="d.npz")
    assert str(tmp_path / "d.npz") in str(e.value)


def test_npz_missing_and_options(tmp_path):
    with pytest.raises(DatasetError, match="layout") as e:
        load_dataset("npz", data_dir=tmp_path, path="none.npz")
    assert str(tmp_path / "none.npz") in str(e.value)
    with pytest.raises(ConfigError, match="options.path"):
        load_dataset("npz", data_dir=tmp_path)
    np.savez(tmp_path / "r.npz", x_train=np.zeros((2, 8, 6), np.uint8), y_train=np.array([0, 1]),
             x_test=np.zeros((1, 8, 6), np.uint8), y_test=np.array([0]))
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("npz", data_dir=tmp_path, path="r.npz")  # not square: needs image_size
    assert load_dataset("npz", data_dir=tmp_path, path="r.npz", image_size=8).image_shape == (3, 8, 8)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DatasetError, match="bad.npz"):
        load_dataset("npz", data_dir=tmp_path, path="bad.npz")
    with pytest.raises(DatasetError, match="bad.npz"):
        data.train_size("npz", tmp_path, {"path": "bad.npz"})


# ---- train_size ---------------------------------------------------------------------------------


def test_train_size_fixed_and_digits(tmp_path):
    assert [data.train_size(n, tmp_path, {}) for n in ("cifar10", "gtsrb", "imagenette", "imagenet")] == \
        [50000, 26640, 9469, 1281167]
    for opts in ({}, {"test_fraction": 0.5}, {"test_fraction": 0.33, "split_seed": 4}):
        assert data.train_size("digits", tmp_path, opts) == len(load_dataset("digits", image_size=8, **opts).train.labels)
    with pytest.raises(ConfigError, match="test_fraction"):
        data.train_size("digits", tmp_path, {"test_fraction": 2})
    with pytest.raises(ConfigError, match="only the options"):
        data.train_size("cifar10", tmp_path, {"root": "x"})
    with pytest.raises(ConfigError, match="fashion_mnist"):
        data.train_size("mnist", tmp_path, {})


def test_fashion_mnist_config_budget():
    from poisongrid import config

    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / "fashion-mnist.yaml")
    ds = cfg["datasets"]["fashion_mnist"]
    assert ds["loader"] == "fashion_mnist" and ds["image_size"] == 32
    n = data.train_size(ds["loader"], cfg["data_dir"], ds["options"]) or 60000  # the set's size when not installed
    poisoned = sum(max(int(n * a["ratio"]), a["min_count"]) for a in ds["attacks"].values())
    assert cfg["bona_fide"]["n_clean"] <= n - poisoned


def test_fashion_mnist_download(tmp_path, no_system_fashion, monkeypatch):
    import torchvision.datasets.utils as tvu

    fixture = _write_fashion(tmp_path / "fixture")
    calls = []

    def fake_download(url, root, filename, md5):  # stands in for the network: serves the fixture as .gz
        calls.append((url, filename, md5))
        src = tmp_path / "fixture" / filename
        body = src.read_bytes() if src.exists() else gzip.compress(src.with_suffix("").read_bytes())
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / filename).write_bytes(body)

    monkeypatch.setattr(tvu, "download_url", fake_download)
    ds = load_dataset("fashion_mnist", data_dir=tmp_path / "d", download=True)
    assert sorted(f for _, f, _ in calls) == sorted(f"{s}-{k}-idx{d}-ubyte.gz" for s in ("train", "t10k")
                                                    for k, d in (("images", 3), ("labels", 1)))
    assert all(url.endswith(f) and md5 for url, f, md5 in calls)
    assert np.array_equal(ds.test.images[:, 0], fixture["t10k"][0])
    calls.clear()
    load_dataset("fashion_mnist", data_dir=tmp_path / "d", download=True)
    assert calls == []  # already there: nothing fetched


@pytest.mark.parametrize("loader", ["folder", "npz"])
def test_own_data_budget_check_uses_the_real_size(tmp_path, loader):
    """The config's poisoning budget is checked against the user's own set, before any job."""
    from poisongrid import config

    if loader == "folder":
        for split in ("train", "test"):
            _write_folder(tmp_path / "mine" / split, ["a", "b"], [(12, 12)] * 15, ext=".png")
        options = {"root": "mine"}
    else:
        x = np.zeros((30, 12, 12), np.uint8)
        np.savez(tmp_path / "mine.npz", x_train=x, y_train=np.arange(30) % 2, x_test=x[:4], y_test=np.arange(4) % 2)
        options = {"path": "mine.npz"}
    cfg = {"data_dir": str(tmp_path), "bona_fide": {"n_clean": 30}, "detectors": {"badloss": {"type": "badloss", "k": 5}},
           "datasets": {"mine": {"loader": loader, "options": options, "image_size": 12, "model": "smallcnn",
                                 "attacks": {"patch": {"ratio": 0.2}}}}}
    with pytest.raises(ConfigError, match=r"bona_fide.n_clean.*at most 24, the untouched examples of 'mine' \(30 training"):
        config.validate(copy.deepcopy(cfg))
    cfg["bona_fide"]["n_clean"] = 24
    assert config.validate(cfg)["datasets"]["mine"]["loader"] == loader


# ---- every image mode PIL reads -----------------------------------------------------------------

GREY = 0.6  # each image below is this fraction of white, stored the way its mode stores it


def _image_of_mode(mode: str) -> tuple[Image.Image, str, int]:
    """(an 8x8 image of mode `mode` at GREY, the file extension that keeps that mode, the 8-bit
    value it must load as)."""
    v8 = round(GREY * 255)
    flat = np.full((8, 8), v8, np.uint8)
    if mode == "1":
        return Image.fromarray(np.ones((8, 8), bool)), ".png", 255
    if mode == "L":
        return Image.fromarray(flat, "L"), ".png", v8
    if mode == "LA":
        return Image.merge("LA", [Image.fromarray(flat, "L"), Image.new("L", (8, 8), 7)]), ".png", v8
    if mode == "P":
        return Image.fromarray(np.stack([flat] * 3, -1), "RGB").convert("P"), ".png", v8
    if mode in ("RGB", "RGBA"):
        a = np.stack([flat] * (3 if mode == "RGB" else 4), -1)
        if mode == "RGBA":
            a[..., 3] = 0  # fully transparent: the colour still counts
        return Image.fromarray(a, mode), ".png", v8
    if mode == "I;16":
        return Image.fromarray(np.full((8, 8), round(GREY * 65535), np.uint16)), ".png", v8
    if mode == "I":
        return Image.fromarray(np.full((8, 8), round(GREY * 65535), np.int32), "I"), ".tif", v8
    if mode == "F":
        return Image.fromarray(np.full((8, 8), GREY, np.float32), "F"), ".tif", v8
    if mode == "CMYK":
        return Image.fromarray(np.stack([flat] * 3, -1), "RGB").convert("CMYK"), ".tif", v8
    raise AssertionError(mode)


PIL_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"]


@pytest.mark.parametrize("mode", PIL_MODES)
def test_every_pil_mode_loads_scaled_not_clipped(tmp_path, mode):
    im, ext, want = _image_of_mode(mode)
    for split in ("train", "test"):
        d = tmp_path / "mine" / split / "a"
        d.mkdir(parents=True)
        im.save(d / f"x{ext}")
    assert Image.open(tmp_path / "mine/train/a" / f"x{ext}").mode == mode  # the file really holds that mode
    ds = load_dataset("folder", data_dir=tmp_path, root="mine")
    got = ds.train.images[0]
    assert got.shape == (3, 8, 8) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want).max() <= 1, (mode, np.unique(got))


def test_a_16_bit_png_is_scaled_from_its_full_range(tmp_path):
    """A 16-bit gradient keeps its gradient (a clipping conversion made 99.6% of it white)."""
    ramp = np.tile(np.linspace(0, 65535, 16).round().astype(np.uint16), (16, 1))
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(ramp).save(tmp_path / split / "a" / "g.png")
    got = load_dataset("folder", data_dir=tmp_path).train.images[0, 0]
    np.testing.assert_allclose(got[0].astype(float), ramp[0].astype(float) * 255 / 65535, atol=1)
    assert (got == 255).mean() < 0.1


def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch):
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("L", (64, 64)).save(tmp_path / split / "a" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 pixels: over twice the limit
    with pytest.raises(DatasetError) as e:
        load_dataset("folder", data_dir=tmp_path, image_size=8)
    msg = str(e.value)
    assert "big.png" in msg and "decompression bomb" in msg and "\n" not in msg


def test_an_unreadable_image_is_refused_naming_the_file(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / split / "a" / "ok.png")
    (tmp_path / "train" / "a" / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DatasetError, match="zz.png: not a readable image"):
        load_dataset("folder", data_dir=tmp_path, image_size=8)


# ---- is the data where the loaders read it --------------------------------------------------------

@pytest.mark.parametrize("loader, options, named", [
    ("cifar10", {}, "cifar-10-batches-py"), ("gtsrb", {}, "gtsrb/GTSRB/Training"),
    ("imagenette", {"variant": "160px"}, "imagenette2-160/train"), ("imagenet", {}, "train"),
    ("fashion_mnist", {"path": "fm"}, "fm"), ("npz", {"path": "mine.npz"}, "mine.npz"),
    ("folder", {"root": "mine"}, "mine")])
def test_missing_data_is_found_before_loading(tmp_path, loader, options, named):
    from poisongrid.data import check_present

    with pytest.raises(DatasetError) as e:
        check_present(loader, tmp_path, options)
    assert named in str(e.value) and "\n" not in str(e.value)
    # A cache made from the data stands in for it (the raw files may be gone once it is built).
    if loader in ("gtsrb", "imagenette", "imagenet", "folder"):
        (tmp_path / ".poisongrid-cache").mkdir()
        (tmp_path / ".poisongrid-cache" / f"{loader}-32px-meta.json").write_text("{}")
        check_present(loader, tmp_path, options)


def test_present_data_passes_the_check(tmp_path):
    from poisongrid.data import check_present

    check_present("digits", tmp_path / "anywhere", {})
    _write_folder(tmp_path / "mine" / "train", ["a", "b"], [(8, 8)], ext=".png")
    _write_folder(tmp_path / "mine" / "test", ["a", "b"], [(8, 8)], ext=".png")
    check_present("folder", tmp_path, {"root": "mine"})
    _write_fashion(tmp_path / "fm")
    check_present("fashion_mnist", tmp_path, {"path": "fm"})


def test_validate_names_missing_data_unless_told_not_to(tmp_path, capsys, monkeypatch):
    import yaml

    from poisongrid.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"data_dir": "nowhere", "datasets": {"cifar10": {
        "model": "smallcnn", "scenarios": ["single-patch"], "attacks": {"patch": {"ratio": 0.01}}}}}))
    assert main(["validate", "g.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "datasets.cifar10: CIFAR-10" in err and "nowhere/cifar-10-batches-py" in err, err
    assert main(["validate", "--no-data", "g.yaml"]) == 0
