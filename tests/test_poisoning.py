import numpy as np
import pytest

from poisongrid import poisoning
from poisongrid.data import load_dataset
from poisongrid.errors import ConfigError
from poisongrid.stages import attack_success

ATTACKS = {"patch": {"ratio": 0.05}, "single_pixel": {"ratio": 0.04}, "blend_random": {"ratio": 0.03, "alpha": 0.1},
           "sinusoid": {"ratio": 0.03, "alpha": 0.1}, "frequency": {"ratio": 0.03}}
BONA = {"n_clean": 100, "stratified": False}


@pytest.fixture(scope="module")
def ds():
    return load_dataset("digits", image_size=16)


def test_multi_disjoint_ratios_met_and_labels(ds):
    ps = poisoning.poison(ds, ATTACKS, list(ATTACKS), seed=0)
    m = ps.manifest
    n = len(ds.train.labels)
    assert len(m) == n and (m["index"].to_numpy() == np.arange(n)).all()
    for name, cfg in ATTACKS.items():
        rows = m[m["attack"] == name]
        assert len(rows) == int(n * cfg["ratio"])
        t = ps.meta["attacks"][name]["target"]
        assert (rows["target"] == t).all()
        if name == "sinusoid":  # clean-label: target class only, labels kept
            assert (rows["orig_label"] == t).all() and (rows["label"] == rows["orig_label"]).all()
        else:
            assert (rows["label"] == t).all()
    # Never two triggers on one image: each poisoned index belongs to exactly one attack.
    assert len(np.unique(ps.index)) == len(ps.index) == m["attack"].notna().sum()
    # Untouched examples keep image and label; bona fide examples are untouched.
    clean = m["attack"].isna().to_numpy()
    assert (m["label"][clean] == m["orig_label"][clean]).all()
    bona = poisoning.draw_bona_fide(clean, m["orig_label"].to_numpy(), 10, 0, BONA)
    assert bona.sum() == 100 and not (bona & ~clean).any()


def test_poisoned_images_carry_their_attacks_trigger(ds):
    ps = poisoning.poison(ds, ATTACKS, list(ATTACKS), seed=0)
    attacks = poisoning.test_attacks(ps.meta, ds.image_shape, {})
    m = ps.manifest.set_index("index")
    for i, img in zip(ps.index, ps.images):
        atk, _ = attacks[m.loc[i, "attack"]]
        np.testing.assert_array_equal(img, atk.apply(ds.train.images[i:i + 1])[0])


def test_same_seed_same_poisoned_set_bit_for_bit(ds):
    a = poisoning.poison(ds, ATTACKS, list(ATTACKS), seed=7)
    b = poisoning.poison(ds, ATTACKS, list(ATTACKS), seed=7)
    c = poisoning.poison(ds, ATTACKS, list(ATTACKS), seed=8)
    assert a.manifest.equals(b.manifest) and np.array_equal(a.images, b.images) and a.meta == b.meta
    assert not np.array_equal(a.index, c.index)


def test_single_and_multi_share_targets(ds):
    multi = poisoning.poison(ds, ATTACKS, list(ATTACKS), seed=3)
    single = poisoning.poison(ds, {"frequency": ATTACKS["frequency"]}, list(ATTACKS), seed=3)
    assert single.meta["attacks"]["frequency"]["target"] == multi.meta["attacks"]["frequency"]["target"]
    assert set(single.manifest["attack"].dropna()) == {"frequency"}


def test_stratified_bona_fide(ds):
    ps = poisoning.poison(ds, ATTACKS, list(ATTACKS), seed=0)
    m = ps.manifest
    bona = poisoning.draw_bona_fide(m["attack"].isna().to_numpy(), m["orig_label"].to_numpy(), 10, 0,
                                    {"n_clean": 100, "stratified": True})
    assert (np.bincount(m["orig_label"][bona], minlength=10) == 10).all()


def test_bona_fide_draw_is_its_own_stream(ds):
    """The poisoned set never depends on the bona fide settings; the draw depends on the seed."""
    m = poisoning.poison(ds, ATTACKS, list(ATTACKS), seed=0).manifest
    untouched, labels = m["attack"].isna().to_numpy(), m["orig_label"].to_numpy()
    a = poisoning.draw_bona_fide(untouched, labels, 10, 0, BONA)
    assert np.array_equal(a, poisoning.draw_bona_fide(untouched, labels, 10, 0, BONA))
    assert not np.array_equal(a, poisoning.draw_bona_fide(untouched, labels, 10, 1, BONA))
    bigger = poisoning.draw_bona_fide(untouched, labels, 10, 0, {"n_clean": 200})
    assert bigger.sum() == 200 and not (bigger & ~untouched).any()


def test_budget_errors(ds):
    with pytest.raises(ConfigError, match="n_clean"):
        poisoning.draw_bona_fide(np.ones(100, bool), np.zeros(100, int), 10, 0, {"n_clean": 5000})
    with pytest.raises(ConfigError, match="sinusoid"):  # a clean-label attack larger than any class
        poisoning.poison(ds, {"sinusoid": {"ratio": 0.5}}, ["sinusoid"], seed=0)
    with pytest.raises(ConfigError, match="at least one"):
        poisoning.poison(ds, {"patch": {"ratio": 0.0001}}, ["patch"], seed=0)


def test_min_target_count_redraws_target(ds):
    counts = np.bincount(ds.train.labels)
    need = int(np.sort(counts)[-2])  # only the two largest classes qualify
    ok = set(np.flatnonzero(counts >= need))
    for seed in range(5):
        t = poisoning.draw_target("sinusoid", {"ratio": 0.01, "min_target_count": need}, ds.train.labels, 10, seed)
        assert t in ok


class _Always:
    """A stand-in model that predicts class 3 for every image."""

    def eval(self):
        return self

    def __call__(self, x):
        import torch

        out = torch.zeros(len(x), 10)
        out[:, 3] = 1
        return out


def test_asr_excludes_target_class(ds):
    import torch

    from poisongrid.attacks import build_attack

    atk = build_attack("patch", ds.image_shape, 0)
    y = ds.test.labels
    asr, boosted = attack_success(_Always(), {"patch": (atk, 3)}, ds.test.images, y, torch.device("cpu"))
    assert asr["patch"] == 1.0 and boosted == {}  # every non-target image goes to 3
    asr, _ = attack_success(_Always(), {"patch": (atk, 5)}, ds.test.images, y, torch.device("cpu"))
    assert asr["patch"] == 0.0  # no target-5 image counted, though the model is right on class-3 ones


def test_training_images_overlay_without_copy(ds, tmp_path):
    ps = poisoning.poison(ds, ATTACKS, list(ATTACKS), seed=0)
    poisoning.write(ps, tmp_path / "m.parquet", tmp_path / "p.npz")
    x = poisoning.training_images(ds, tmp_path / "p.npz", len(ps.manifest))
    full = np.array(ds.train.images)
    full[ps.index] = ps.images
    np.testing.assert_array_equal(x.materialize(), full)
    idx = np.array([ps.index[0], 0, ps.index[-1], 5])
    np.testing.assert_array_equal(x[idx], full[idx])
    mask = np.zeros(len(full), dtype=bool)
    mask[ps.index[:3]] = True
    mask[:2] = True
    np.testing.assert_array_equal(x.subset(mask).materialize(), full[mask])
    assert x.subset(mask).shape == (mask.sum(), *full.shape[1:])


def test_oracle_drops_exactly_the_poisoned(ds, tmp_path):
    import pandas as pd

    ps = poisoning.poison(ds, ATTACKS, list(ATTACKS), seed=0)
    ps.meta["cell"] = {"dataset": "digits", "scenario": "multi", "seed": 0}
    poisoning.write(ps, tmp_path / "m.parquet", tmp_path / "p.npz")
    from poisongrid.cli import main

    bf = str(tmp_path / "bf.parquet")
    assert main(["bonafide", "--spec", '{"seed": 0, "bona_fide": {"n_clean": 50}}', "--manifest", str(tmp_path / "m.parquet"),
                 "--out", bf]) == 0
    assert main(["plan", "--spec", '{"defense": "oracle", "remedy": "oracle"}', "--manifest", str(tmp_path / "m.parquet"),
                 "--bona_fide", bf, "--out", str(tmp_path / "f.parquet")]) == 0
    plan = pd.read_parquet(tmp_path / "f.parquet")
    assert plan["weight"].dtype == np.float32 and plan["score"].isna().all()
    np.testing.assert_array_equal(plan["weight"].to_numpy() == 0, ps.manifest["attack"].notna().to_numpy())
    assert set(plan["weight"].unique()) == {0.0, 1.0}


def test_fixed_target(ds):
    cfg = {"patch": {"ratio": 0.05, "target": 1}, "sinusoid": {"ratio": 0.02, "target": 1}}
    ps = poisoning.poison(ds, cfg, list(cfg), seed=0)
    assert {a: i["target"] for a, i in ps.meta["attacks"].items()} == {"patch": 1, "sinusoid": 1}
    assert (ps.manifest.loc[ps.manifest["attack"].notna(), "label"] == 1).all()
    with pytest.raises(ConfigError, match="attacks.patch.target"):
        poisoning.poison(ds, {"patch": {"ratio": 0.05, "target": 10}}, ["patch"], seed=0)


def test_every_attack_joins_one_multi_scenario(ds):
    """The BaDLoss-style multi scenario with all registered attacks at once (BaDLoss's seven and
    LfD's), learned ones with small stand-in artifacts of the right shape: disjoint images, each
    attack's labels flipped or kept as it says, and untouched images unchanged."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_attacks import _build

    from poisongrid.attacks import ATTACKS as REG

    names = REG.names()
    # Clean-label attacks share no target class here: each is fixed to its own class.
    clean = [a for a in names if REG.get(a).clean_label]
    cfg = {a: {"ratio": 0.012, **({"target": i} if a in clean else {})} for i, a in enumerate(sorted(names))}
    for i, a in enumerate(clean):
        cfg[a]["target"] = i
    shape = ds.image_shape
    artifacts = {}
    for a in names:
        if REG.get(a).learns():
            art = _build(a, shape=shape).artifact
            if a == "label_consistent":  # a perturbation for every image of its target class
                rows = np.flatnonzero(ds.train.labels == cfg[a]["target"])
                art = {"index": rows.astype(np.int64), "delta": np.ones((len(rows), *shape), np.int8)}
            artifacts[a] = art
    ps = poisoning.poison(ds, cfg, names, seed=0, artifacts=artifacts)
    m = ps.manifest
    assert len(np.unique(ps.index)) == len(ps.index) == m["attack"].notna().sum()
    assert set(m["attack"].dropna()) == set(names)
    for a in names:
        rows = m[m["attack"] == a]
        t = ps.meta["attacks"][a]["target"]
        if REG.get(a).clean_label:
            assert (rows["orig_label"] == t).all() and (rows["label"] == rows["orig_label"]).all(), a
        else:
            assert (rows["label"] == t).all(), a
    untouched = np.setdiff1d(np.arange(len(m)), ps.index)
    assert (m["label"].to_numpy()[untouched] == ds.train.labels[untouched]).all()


# ---- overlap: attacks sharing images (BaDLoss Appendix F) ----------------------------------------

def _planted(n=60, size=16):
    """Two classes taking turns; image i is a flat grey of its own level, so each trigger's effect
    can be computed by hand."""
    from poisongrid.data import Dataset, Split

    levels = 40 + 2 * np.arange(n)
    x = np.broadcast_to(levels[:, None, None, None], (n, 3, size, size)).astype(np.uint8)
    y = (np.arange(n) % 2).astype(np.int64)
    return Dataset("planted", Split(x, y), Split(x[:4], y[:4]), ["a", "b"])


# Together 84 of 60 images: pigeonhole forces sharing; sinusoid (clean-label) on 24 of class 0's 30.
OVERLAP = {"sinusoid": {"ratio": 0.4, "alpha": 0.1, "target": 0}, "patch": {"ratio": 0.5, "target": 1},
           "blend_pattern": {"ratio": 0.5, "alpha": 0.2, "target": 0}}


def _by_hand(v: float, name: str, size: int) -> np.ndarray:
    """Image of grey level v after attack `name` alone, from the triggers' definitions."""
    img = np.full((3, size, size), float(v))
    if name == "patch":  # white at (H-2,W-2), (H-4,W-2), (H-2,W-4), (H-3,W-3)
        for r, c in ((2, 2), (4, 2), (2, 4), (3, 3)):
            img[:, size - r, size - c] = 255
        return img
    if name == "blend_pattern":  # white dots on even rows and even columns
        p = np.zeros((size, size))
        p[::2, ::2] = 255
        return 0.8 * img + 0.2 * p
    col = 255 * (1 - np.cos(2 * np.pi * 6 * np.arange(size) / size))  # sinusoid: vertical stripes
    return np.clip(0.9 * img + 0.1 * col, 0, 255)


def _compose(v: float, names: list[str], size: int) -> np.ndarray:
    img = np.full((3, size, size), float(v))
    for name in names:
        if name == "patch":
            img[:, _by_hand(0, "patch", size)[0] == 255] = 255
        else:  # blends are affine in the image: (1-a) x + a p, and a p is the blend of a black image
            a = 0.2 if name == "blend_pattern" else 0.1
            img = np.clip(np.rint((1 - a) * img + _by_hand(0.0, name, size)), 0, 255)
    return img


@pytest.mark.parametrize("all_attacks", [["patch", "blend_pattern", "sinusoid"], ["blend_pattern", "patch", "sinusoid"]])
def test_overlap_stacks_triggers_in_order_and_keeps_each_ratio(all_attacks):
    ds = _planted()
    n, size = len(ds.train.labels), ds.image_shape[-1]
    ps = poisoning.poison(ds, OVERLAP, all_attacks, seed=0, overlap=True)
    m = ps.manifest
    col = m["attack"]
    for name, cfg in OVERLAP.items():  # every attack still poisons exactly its ratio
        assert poisoning.carries(col, name).sum() == int(n * cfg["ratio"])
    shared = col.fillna("").str.contains("+", regex=False).to_numpy()
    assert shared.sum() >= 24 and ps.meta["n_shared"] == shared.sum() and ps.meta["overlap"] is True
    assert (col.fillna("").str.count(r"\+") == 2).any()  # some image carries all three
    # One stored image per poisoned row, carrying every trigger of its row in the documented order:
    # clean-label first, then the dataset's attack order.
    assert len(np.unique(ps.index)) == len(ps.index) and np.array_equal(ps.index, np.flatnonzero(col.notna()))
    order = ["sinusoid"] + [a for a in all_attacks if a != "sinusoid"]
    for i, img in zip(ps.index, ps.images):
        names = col[i].split("+")
        assert names == [a for a in order if a in names]
        want = _compose(ds.train.images[i, 0, 0, 0], names, size)
        assert np.abs(img.astype(float) - want).max() <= 1, (i, names)
        # The label is the last label-flipping attack's target; clean-label alone keeps the label.
        flips = [a for a in names if a != "sinusoid"]
        assert m.loc[i, "label"] == (OVERLAP[flips[-1]]["target"] if flips else ds.train.labels[i]) == m.loc[i, "target"]
    # The patch drawn last is pure white; drawn before the blend it is blended like any pixel (at
    # (H-3,W-3), off the dot lattice: 0.8 * 255).
    both = [i for i in ps.index if {"patch", "blend_pattern"} <= set(col[i].split("+"))]
    corner = ps.images[np.searchsorted(ps.index, both)][:, :, size - 3, size - 3]
    assert set(np.unique(corner)) <= {204, 255}
    assert (corner == 255).all() == (all_attacks.index("patch") > all_attacks.index("blend_pattern"))
    bona = poisoning.draw_bona_fide(col.isna().to_numpy(), m["orig_label"].to_numpy(), 2, 0, {"n_clean": 2})
    assert not (bona & col.notna().to_numpy()).any() and bona.sum() == 2


def test_without_overlap_no_image_carries_two_triggers():
    ds = _planted()
    attacks = {**OVERLAP, "patch": {"ratio": 0.3, "target": 1}, "blend_pattern": {"ratio": 0.25, "alpha": 0.2, "target": 0}}
    ps = poisoning.poison(ds, attacks, list(attacks), seed=0)
    col = ps.manifest["attack"]
    assert not col.fillna("").str.contains("+", regex=False).any() and "overlap" not in ps.meta
    for name, cfg in attacks.items():
        assert (col == name).sum() == int(60 * cfg["ratio"])
    for i, img in zip(ps.index, ps.images):
        assert np.abs(img.astype(float) - _compose(ds.train.images[i, 0, 0, 0], [col[i]], 16)).max() <= 1
    with pytest.raises(ConfigError, match="available"):
        poisoning.poison(ds, OVERLAP, list(OVERLAP), seed=0)


def test_detection_quality_counts_a_shared_image_for_each_of_its_attacks():
    import pandas as pd

    from poisongrid.stages import detection_quality

    man = pd.DataFrame({"attack": pd.array(["patch", "patch+sinusoid", "sinusoid", None, None], dtype="string")})
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.3])
    q = detection_quality(man, scores, flagged=np.array([True, True, False, False, False]))
    assert q["recall_per_attack"] == {"patch": 1.0, "sinusoid": 0.5}
    assert q["auroc_per_attack"]["patch"] == 1.0 and q["auroc_per_attack"]["sinusoid"] == 0.5


def test_poison_stage_passes_overlap_from_the_config_and_the_defender_never_sees_it(tmp_path):
    from poisongrid import config, stages

    big = {"patch": {"ratio": 0.6}, "blend_random": {"ratio": 0.5, "alpha": 0.1}}
    c = config.validate({"datasets": {"digits": {"model": "smallcnn", "image_size": 16, "overlap": True, "attacks": big}},
                         "bona_fide": {"n_clean": 10}, "detectors": {}, "defenses": {"none": {"remedy": "none"}}}, deep=False)
    out = {"manifest": tmp_path / "m.parquet", "images": tmp_path / "p.npz"}
    meta = stages.poison(config.stage_spec(c, "poison", "digits", "multi", 0), {}, out)
    man, _ = poisoning.read_manifest(out["manifest"])
    assert meta["overlap"] is True and (man["attack"] == "patch+blend_random").sum() == meta["n_shared"] > 0
    for name, cfg in big.items():
        assert poisoning.carries(man["attack"], name).sum() == int(len(man) * cfg["ratio"])
    bf = tmp_path / "bf.parquet"
    stages.bonafide(config.stage_spec(c, "bonafide", "digits", "multi", 0), {"manifest": out["manifest"]}, {"out": bf})
    seen = stages.defender_view(config.stage_spec(c, "bonafide", "digits", "multi", 0), {"manifest": out["manifest"], "bona_fide": bf})
    assert seen.bona_fide.sum() == 10 and (seen.labels == man["label"].to_numpy()).all()
    assert not (seen.bona_fide & man["attack"].notna().to_numpy()).any()


def test_a_bona_fide_file_from_another_poisoned_set_is_refused(ds, tmp_path):
    """Same cell, other attacks: the bona fide draw of one poisoned set never passes for another's."""
    from poisongrid import stages
    from poisongrid.errors import ArtifactError

    cell = {"dataset": "digits", "scenario": "multi", "seed": 0}
    sets = {}
    for name, attacks in {"a": ATTACKS, "b": {"patch": ATTACKS["patch"]}}.items():
        ps = poisoning.poison(ds, attacks, list(ATTACKS), seed=0)
        ps.meta["cell"] = cell
        poisoning.write(ps, tmp_path / f"{name}.parquet", tmp_path / f"{name}.npz")
        stages.bonafide({"seed": 0, "bona_fide": BONA}, {"manifest": tmp_path / f"{name}.parquet"},
                        {"out": tmp_path / f"{name}.bf.parquet"})
        sets[name] = ps
    man, _ = poisoning.read_manifest(tmp_path / "a.parquet", tmp_path / "a.bf.parquet")
    assert man["bona_fide"].sum() == 100 and not (man["bona_fide"] & man["attack"].notna()).any()
    with pytest.raises(ArtifactError, match=r"b.bf.parquet: drawn from another poisoned set"):
        poisoning.read_manifest(tmp_path / "a.parquet", tmp_path / "b.bf.parquet")


def test_detection_auroc_equals_scikit_learns_with_ties():
    from sklearn.metrics import roc_auc_score

    from poisongrid.stages import _auroc

    rng = np.random.default_rng(0)
    for n in (5, 40, 333):
        scores = rng.integers(0, 6, n).astype(float)  # many ties
        pos = rng.random(n) < 0.3
        pos[0], pos[1] = True, False
        want = roc_auc_score(pos, scores)
        assert abs(_auroc(scores, pos, ~pos) - want) < 1e-12
        neg = ~pos & (rng.random(n) < 0.5)  # a subset of the rest as negatives
        neg[1] = True
        keep = pos | neg
        assert abs(_auroc(scores, pos, neg) - roc_auc_score(pos[keep], scores[keep])) < 1e-12
    assert _auroc(np.ones(3), np.zeros(3, bool), np.ones(3, bool)) is None


def test_the_manifest_is_written_as_pandas_would_write_it():
    """Built without pandas, the manifest's Arrow table (columns, types, pandas schema metadata)
    equals pa.Table.from_pandas of the DataFrame the poison stage used to write, so readers get
    the same frame (`attack` a pandas string column, NA where no attack)."""
    import pandas as pd
    import pyarrow as pa

    rng = np.random.default_rng(0)
    n = 50
    labels, orig = rng.integers(0, 10, n), rng.integers(0, 10, n)
    attack = np.array([None] * n, dtype=object)
    attack[[3, 7, 9]] = ["patch", "blend_random+patch", "sinusoid"]
    target = np.where([a is not None for a in attack], 4, -1)
    table = poisoning.manifest_arrow(labels, orig, attack, target)
    df = pd.DataFrame({"index": np.arange(n, dtype=np.int64), "label": labels.astype(np.int64),
                       "orig_label": orig.astype(np.int64), "attack": pd.array(attack, dtype="string"),
                       "target": target.astype(np.int64)})
    ref = pa.Table.from_pandas(df, preserve_index=False)
    assert table.schema.equals(ref.schema, check_metadata=True) and table.equals(ref)
    back = table.to_pandas()
    assert back.equals(df) and back["attack"].isna().sum() == n - 3
