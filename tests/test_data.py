"""Dataset loaders: digits for real, the others against tiny fixtures in each dataset's real on-disk layout."""
import math
import pickle

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
    assert DATASETS.names() == ["cifar10", "digits", "gtsrb", "imagenet", "imagenette"]


# ---- cifar10 ------------------------------------------------------------------------------------


def _write_cifar(root, per_batch=4):
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


def test_resize_is_shorter_side_then_centre_crop():
    # 64 wide x 32 high, leftmost quarter white: a centre crop of the 32x32 middle drops it, a squash would not.
    wide = np.zeros((32, 64), np.uint8)
    wide[:, :16] = 255
    out = data._resize_square(Image.fromarray(wide, "L"), 16)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8
    assert np.all(out[:, :, 2:] == 0) and out[0, 0, 0] < 255
    tall = Image.fromarray(np.ascontiguousarray(wide.T), "L")  # same for a tall image, vertically
    out = data._resize_square(tall, 16)
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
    assert np.array_equal(ds.train.images[1], data._resize_square(first, 32))

    cache = tmp_path / ".poisongrid-cache"
    assert (cache / "gtsrb-32px-train-images.npy").exists()

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data, "_resize_square", boom)
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
])
def test_missing_dataset_names_path(tmp_path, name, looked_for):
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
