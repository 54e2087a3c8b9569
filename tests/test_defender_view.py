"""The defender's view holds what a real defender has and nothing that leads to the answer: no
clean originals, no list of poisoned rows, no dataset handle, no file path. A detector or remedy
that tries each route a plug-in could take fails."""
from pathlib import Path

import numpy as np
import pytest
import torch

from poisongrid import config, paths, poisoning, stages
from poisongrid.defender import DefenderImages
from poisongrid.jobs import run_job
from poisongrid.remedies import FinalTraining

CELL = dict(dataset="digits", scenario="multi", seed=0)


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("view"))
    cfg = config.validate({"device": "cpu", "bona_fide": {"n_clean": 40},
                           "datasets": {"digits": {"image_size": 16, "model": "smallcnn", "epochs": 1, "batch_size": 128,
                                                   "attacks": {"patch": {"ratio": 0.05},
                                                               "blend_random": {"ratio": 0.05, "alpha": 0.1}}}},
                           "detectors": {"nc": {"type": "neural_cleanse", "model": "attacked"}},
                           "defenses": {"none": {"remedy": "none"}}})
    _, _, poisoned = run_job(cfg, "poison", root, **CELL)
    run_job(cfg, "bonafide", root, **CELL)
    run_job(cfg, "pretrain", root, **CELL, model="attacked")
    run_job(cfg, "features", root, **CELL, model="attacked")
    spec = config.stage_spec(cfg, "score", "digits", scenario="multi", seed=0, detector="nc")
    inp = paths.inputs("score", spec, root, **CELL, detector="nc")
    # Every file a defender model can give a view, on top of what neural_cleanse reads.
    inp["features"] = paths.path("features", root, **CELL, model="attacked")
    inp["trajectories"] = paths.path("losses", root, **CELL, model="attacked")
    man, _ = poisoning.read_manifest(poisoned["manifest"])
    ds = stages.get_dataset(spec)
    view = stages.defender_view(spec, inp)
    return {"spec": spec, "inp": inp, "man": man, "ds": ds, "view": view,
            "poisoned_rows": np.flatnonzero(man["attack"].notna().to_numpy())}


def _load_everything(view):
    view.images.materialize()
    view.model()
    view.features()
    list(view.trajectories.batches())


def _reachable(root, limit: int = 20000):
    """Every object reachable from `root` through attributes (instance dicts and slots), mapping
    values and sequences: what a plug-in can get at without opening a file or a closure. torch
    modules count as leaves (their parameters are the defender's own model)."""
    seen, out, todo = set(), [], [root]
    while todo and len(out) < limit:
        o = todo.pop()
        if id(o) in seen or isinstance(o, (int, float, bool, type(None), type)):
            continue
        seen.add(id(o))
        out.append(o)
        if isinstance(o, (str, bytes, Path, np.ndarray, torch.Tensor, torch.nn.Module, torch.device, torch.Generator)):
            continue
        if isinstance(o, dict):
            todo += list(o.keys()) + list(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            todo += list(o)
        else:
            todo += list(getattr(o, "__dict__", {}).values())
            for cls in type(o).__mro__:
                for s in getattr(cls, "__slots__", ()):
                    if hasattr(o, s) and not callable(getattr(o, s)):
                        todo.append(getattr(o, s))
    return out


def _leaks(objs, cell) -> list[str]:
    clean, rows = np.asarray(cell["ds"].train.images), cell["poisoned_rows"]
    files = {str(Path(v).resolve()) for v in cell["inp"].values()}
    found = []
    for o in objs:
        if isinstance(o, np.ndarray):
            if o.shape == clean.shape and np.array_equal(o, clean):
                found.append("the clean training images")
            if o.dtype.kind in "iu" and o.shape == rows.shape and np.array_equal(np.sort(o), rows):
                found.append("the poisoned rows")
            if o.dtype == bool and o.shape == (len(cell["man"]),) and np.array_equal(np.flatnonzero(o), rows):
                found.append("a mask of the poisoned rows")
        elif isinstance(o, (str, Path)) and (str(o) in files or str(Path(str(o)).resolve()) in files or "/" in str(o)):
            found.append(f"a path: {o}")
    return found


def test_the_view_leads_to_no_ground_truth(cell):
    view = cell["view"]
    _load_everything(view)
    objs = _reachable(view)
    assert len(objs) > 10  # the walk reached the loaded images, model, features and trajectories
    assert _leaks(objs, cell) == []
    job = FinalTraining(view=view, weights=np.ones(len(view), np.float32), plan_meta={})
    assert _leaks(_reachable(job), cell) == []
    # The walk finds a leak where there is one (the overlay this view replaced held all three).
    leaky = {"base": np.asarray(cell["ds"].train.images), "index": cell["poisoned_rows"], "path": cell["inp"]["manifest"]}
    assert len(_leaks(_reachable([view, leaky]), cell)) == 3


def test_the_view_holds_the_poisoned_set_as_trained_on(cell):
    view, man, ds = cell["view"], cell["man"], cell["ds"]
    full = np.array(ds.train.images)
    z = np.load(cell["inp"]["images"])
    full[z["index"]] = z["images"]
    np.testing.assert_array_equal(view.images.materialize(), full)
    np.testing.assert_array_equal(view.labels, man["label"].to_numpy())
    assert view.bona_fide.sum() == 40 and not (view.bona_fide & man["attack"].notna().to_numpy()).any()
    assert view.num_classes == 10 and view.images.shape == full.shape
    with pytest.raises(ValueError):
        view.labels[0] = 3  # read-only: a plug-in cannot change what the next one sees


@pytest.mark.parametrize("route", ["index", "base", "rows", "images", "clean", "poisoned"])
def test_a_plugin_asking_the_images_for_their_origin_fails(cell, route):
    with pytest.raises(AttributeError):
        getattr(cell["view"].images, route)
    job = FinalTraining(view=cell["view"], weights=np.ones(len(cell["view"]), np.float32), plan_meta={})
    with pytest.raises(AttributeError):
        getattr(job.images, route)


@pytest.mark.parametrize("route", ["dataset", "paths", "spec", "manifest", "attack", "poisoned", "ground_truth"])
def test_a_plugin_asking_the_view_for_the_data_or_its_files_fails(cell, route):
    with pytest.raises(AttributeError):
        getattr(cell["view"], route)


def test_a_view_gives_only_what_the_detector_declares(cell):
    spec, inp = cell["spec"], cell["inp"]
    light = stages.defender_view(spec, {k: inp[k] for k in ("manifest", "bona_fide", "trajectories")})
    assert len(light.trajectories.meta["accepted_epochs"]) >= 1
    for load in (lambda: light.images, light.model, light.features):
        with pytest.raises(ValueError, match="holds no"):
            load()


def test_dense_and_sparse_storage_read_the_same():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (50, 1, 4, 4), dtype=np.uint8)
    rows = np.array([3, 17, 40])
    new = rng.integers(0, 256, (3, 1, 4, 4), dtype=np.uint8)
    full = base.copy()
    full[rows] = new
    sparse, dense = DefenderImages.overlay(base, rows, new), DefenderImages.from_array(full)
    for idx in (np.array([40, 3, 0, 17, 17]), slice(10, 45, 3), 17, np.arange(50) % 2 == 0):
        np.testing.assert_array_equal(sparse[idx], dense[idx])
        np.testing.assert_array_equal(sparse[idx], full[idx])
    mask = np.zeros(50, bool)
    mask[[2, 3, 40]] = True
    np.testing.assert_array_equal(sparse.subset(mask).materialize(), full[mask])
    assert sparse.nbytes == full.nbytes and sparse.shape == full.shape and sparse.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(sparse), full)
