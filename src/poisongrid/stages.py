"""One pure function per stage: files in, files out. The CLI and the Snakemake rules are thin
wrappers around these. torch, scikit-learn, pandas, the dataset loaders and the attack, detector
and remedy registries are imported inside the stages that use them, so the light jobs (poison,
the score of a trajectory detector, plan) start in a fraction of a second without torch
(tests/test_light_stages.py, benchmarks/light_stages.py)."""
from __future__ import annotations

import platform
import sys
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa

from . import __version__, paths, provenance, trajectories
from .errors import ArtifactError
from .io import fingerprint, from_numpy, load_npz, read_table, save_npz, table_meta, to_numpy, write_json, write_table

if TYPE_CHECKING:
    import pandas as pd

    from .data import Dataset
    from .defender import DefenderView

Log = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


def get_dataset(spec: dict) -> Dataset:
    from .data import load_dataset

    d = spec["dataset"]
    return load_dataset(d["loader"], data_dir=d["data_dir"], image_size=d["image_size"], download=d["download"], **d["options"])


ARTIFACT_PROVENANCE = ("target", "dataset", "seed", "attack", "image_shape")


# ---- trigger: what an attack learns before poisoning -------------------------------------------


def trigger(spec: dict, inp: dict, out: dict, log: Log = _quiet) -> dict:
    """Run one attack's learning step (a Narcissus trigger, a generator, adversarial
    perturbations, ...) for this dataset and seed, from the clean data and the attack's own
    settings only, and save what it made with its provenance."""
    from . import poisoning
    from .attacks import ATTACKS
    from .attacks.base import LearnJob
    from .training import setup_runtime

    t0 = time.perf_counter()
    name = spec["attack"]
    cls = ATTACKS.get(name, "attack")
    device = setup_runtime(spec["runtime"])
    ds = get_dataset(spec)
    target = poisoning.draw_target(name, spec["params"], ds.train.labels, ds.num_classes, spec["seed"])
    params = {k: v for k, v in spec["params"].items() if k in cls.defaults}
    job = LearnJob(dataset=ds, target=target, seed=spec["seed"], params=params, settings=spec["learn"],
                   training=spec["training"], device=device, log=log,
                   ratio=spec["params"].get("ratio"))
    arrays = cls.learn(job)
    clash = sorted(set(arrays) & set(ARTIFACT_PROVENANCE))
    if clash:
        raise ValueError(f"attack '{name}' learned arrays named {clash}, which are reserved")
    save_npz(out["out"], **arrays, target=np.int64(target), dataset=np.array(spec["dataset"]["name"]),
             seed=np.int64(spec["seed"]), attack=np.array(name), image_shape=np.array(ds.image_shape, dtype=np.int64))
    meta = {"attack": name, "target": target, "arrays": sorted(arrays), "wall_time_s": time.perf_counter() - t0}
    log(f"{name}: learned {sorted(arrays)} for target class {target} in {meta['wall_time_s']:.1f}s")
    return meta


# ---- poison -----------------------------------------------------------------------------------


def checked_triggers(spec: dict, inp: dict, ds: Dataset, targets: dict[str, int]) -> dict[str, dict[str, np.ndarray]]:
    """What each learned attack of the cell learned (its trigger file's arrays), checked to be made
    for this dataset, seed, attack, image size and target (`targets`: attack -> class) and to
    build a valid attack (a trigger within its budget and of the image's shape). Every refusal
    names the file."""
    from .attacks import build_attack
    from .errors import ConfigError

    out = {}
    for name, path in paths.trigger_inputs(inp).items():
        z = load_npz(path)
        made = {"dataset": str(z.get("dataset", "?")), "seed": int(z["seed"]) if "seed" in z else None,
                "attack": str(z.get("attack", "?")),
                "image shape": tuple(int(s) for s in z["image_shape"]) if "image_shape" in z else None}
        want = {"dataset": spec["dataset"]["name"], "seed": spec["seed"], "attack": name, "image shape": tuple(ds.image_shape)}
        if made != want:
            raise ArtifactError(f"{path}: a trigger made for {made}, but this job needs one for {want}; delete it and "
                                "rerun the trigger stage")
        got = int(z["target"]) if "target" in z else None
        if name in targets and got != targets[name]:
            raise ArtifactError(f"{path}: trigger was optimised for class {got}, but this seed's {name} target is {targets[name]}")
        arrays = {k: v for k, v in z.items() if k not in ARTIFACT_PROVENANCE}
        params = (spec.get("attacks") or {}).get(name)
        if params is not None:
            from .attacks.base import attack_params

            try:
                build_attack(name, ds.image_shape, 0, attack_params(params), arrays)
            except ConfigError as e:
                raise ArtifactError(f"{path}: not a usable {name} trigger for these settings ({e}); delete it and rerun "
                                    "the trigger stage") from None
        out[name] = arrays
    return out


def poison(spec: dict, inp: dict, out: dict, log: Log = _quiet) -> dict:
    from . import poisoning

    ds = get_dataset(spec)
    targets = {a: poisoning.draw_target(a, spec["attacks"][a], ds.train.labels, ds.num_classes, spec["seed"])
               for a in paths.trigger_inputs(inp)}
    trig = checked_triggers(spec, inp, ds, targets)
    ps = poisoning.poison(ds, spec["attacks"], spec["all_attacks"], spec["seed"], trig,
                          overlap=spec.get("overlap", False))
    ps.meta["scenario"] = spec["scenario"]
    ps.meta["cell"] = provenance.cell(spec["dataset"]["name"], spec["scenario"], spec["seed"])
    poisoning.write(ps, out["manifest"], out["images"])
    log("poisoned " + ", ".join(f"{a}: {i['count']} -> class {i['target']}" for a, i in ps.meta["attacks"].items()))
    return ps.meta


def bonafide(spec: dict, inp: dict, out: dict, log: Log = _quiet) -> dict:
    """Draw the examples the defender knows to be clean, among those no attack touched. Its own
    artifact: changing `bona_fide` reruns this and what reads it, never poisoning or pretraining."""
    import pyarrow.compute as pc

    from . import poisoning

    man, mmeta = poisoning.manifest_table(inp["manifest"], ground_truth=True)
    provenance.check(inp["manifest"], mmeta, dataset=(spec.get("dataset") or {}).get("name"), seed=spec.get("seed"))
    cfg = spec["bona_fide"]
    index = to_numpy(man["index"])
    mask = poisoning.draw_bona_fide(to_numpy(pc.is_null(man["attack"])), to_numpy(man["orig_label"]),
                                    int(mmeta["num_classes"]), spec["seed"], cfg)
    meta = {"cell": provenance.of(mmeta, inp["manifest"]), "set": spec.get("bona", paths.DEFAULT_BONA_FIDE),
            "n_clean": int(mask.sum()), "settings": cfg, "manifest_n": len(index),
            "manifest_fingerprint": poisoning.manifest_fingerprint(mmeta)}
    poisoning.write_bona_fide(out["out"], index, mask, meta)
    log(f"bona fide set {meta['set']}: {meta['n_clean']} examples" + (" (stratified)" if cfg.get("stratified") else ""))
    return meta


def _manifest(spec: dict, manifest_path, bona_fide_path=None):
    """The cell's whole manifest (with the bona fide mask when its file is given), checked against
    the dataset and seed of the job reading it. Detectors and remedies get the defender's view
    instead (defender_view)."""
    from . import poisoning

    man, meta = poisoning.read_manifest(manifest_path, bona_fide_path)
    provenance.check(manifest_path, meta, dataset=(spec.get("dataset") or {}).get("name"), seed=spec.get("seed"))
    return man, meta


def _poisoned_training_set(spec: dict, manifest_path, images_path, bona_fide_path=None):
    from . import poisoning

    ds = get_dataset(spec)
    man, meta = _manifest(spec, manifest_path, bona_fide_path=bona_fide_path)
    return ds, man, meta, poisoning.training_images(ds, images_path, len(man))


def defender_view(spec: dict, inp: dict, log: Log = _quiet, model_role: dict | None = None) -> DefenderView:
    """What a detector or remedy of this cell may read (defender.DefenderView): the manifest's
    defender columns and the bona fide flags, now; the images, the device, the defender model in
    `inp['weights']` (checked to be this cell's `model_role`), its features and its trajectories,
    on first use. The ground truth and the files' paths stay here."""
    from . import poisoning
    from .defender import DefenderView, Trajectories, model_record

    man, mmeta = poisoning.manifest_table(inp["manifest"], bona_fide_path=inp.get("bona_fide"))
    provenance.check(inp["manifest"], mmeta, dataset=(spec.get("dataset") or {}).get("name"), seed=spec.get("seed"))
    ref = provenance.of(mmeta, inp["manifest"])
    n = man.num_rows
    bona = to_numpy(man["bona_fide"]) if "bona_fide" in man.column_names else np.zeros(n, dtype=bool)
    runtime = spec.get("runtime") or {"device": "cpu"}
    role = model_role if model_role is not None else {"model": spec.get("model")}
    loaders: dict = {}

    def device():
        from .training import setup_runtime

        return setup_runtime(runtime)

    if "images" in inp:
        loaders["images"] = lambda: poisoning.training_images(get_dataset(spec), inp["images"], n)
    if "weights" in inp:
        def model():
            from .training import load_model

            m, meta = load_model(inp["weights"], view.device)
            provenance.same_cell(inp["weights"], meta, ref, **role)
            return m, model_record(meta)

        loaders["model"] = model
    if "features" in inp:
        def features():
            from .io import load_features

            f, meta = load_features(inp["features"])
            provenance.same_cell(inp["features"], meta, ref, **role)
            if len(f) != n:
                raise ArtifactError(f"{inp['features']}: {len(f)} rows, the manifest {n}; rerun features")
            return f, meta.get("defender_model")

        loaders["features"] = features
    if "trajectories" in inp:
        def trajs():
            path = inp["trajectories"]
            pf, tmeta = table_meta(path, trajectories.KIND)
            provenance.same_cell(path, tmeta, ref, **role)
            if tmeta.get("n_examples") != n or pf.metadata.num_rows != n:
                raise ArtifactError(f"{path}: has {pf.metadata.num_rows} rows but the manifest has {n}; the two come from "
                                    "different runs: delete it and rerun pretrain")
            return Trajectories(tmeta, lambda rows, epochs: trajectories.iter_batches(path, rows, epochs=epochs))

        loaders["trajectories"] = trajs
    if spec.get("validation"):
        def held_out():
            from .defender import DefenderImages
            from .validation import split

            test = get_dataset(spec).test
            rows = split(test.labels, spec["validation"]["fraction"], int(spec["seed"]), spec["validation"]["stratified"])
            return DefenderImages.from_array(np.asarray(test.images[rows])), np.array(test.labels[rows])

        loaders["validation"] = held_out
    labels = to_numpy(man["label"])
    num_classes = mmeta.get("num_classes")  # absent only from hand-made manifests
    if num_classes is None:
        num_classes = get_dataset(spec).num_classes if spec.get("dataset") else int(labels.max(initial=-1)) + 1
    view = DefenderView(index=to_numpy(man["index"]), labels=labels, bona_fide=bona,
                        num_classes=int(num_classes), seed=int(spec.get("seed", 0)),
                        training=spec.get("training") or {}, log=log, device=device, **loaders)
    return view


# ---- defender models (pretrain) -------------------------------------------------------------


def pretrain(spec: dict, inp: dict, out: dict, log: Log = _quiet) -> dict:
    """Train one defender model on the cell's poisoned set; write it and its per-example losses
    (every epoch, or once after the last), with the spike epochs the trajectories skip."""
    from .training import fit, is_main, processes, remove_checkpoint, save_model, setup_runtime

    device = setup_runtime(spec["runtime"])
    ds, man, pmeta, x = _poisoned_training_set(spec, inp["manifest"], inp["images"])
    m = spec["model"]
    tr, run = m["training"], m["run"]
    ckpt = str(out["weights"]) + ".ckpt"
    res = fit(tr, x, man["label"].to_numpy(), ds.num_classes, seed=spec["seed"], device=device,
              epochs_to_run=run, record=m["record"], checkpoint=ckpt,
              fingerprint=fingerprint(spec, inp["manifest"], inp["images"]), log=log)
    recorded = res.losses.shape[0]
    kept = trajectories.accepted_epochs(res.train_loss, m["spike_factor"], m["spike_rule"]) if recorded == run else [0]
    cell = provenance.of_role(provenance.of(pmeta, inp["manifest"]), model=m["name"])
    meta = {"cell": cell, "model_name": m["name"], "model": tr["model"], "epochs_run": run, "epochs_recorded": recorded,
            "accepted_epochs": kept, "skipped_epochs": sorted(set(range(recorded)) - set(kept)),
            "spike_rule": m["spike_rule"], "spike_series": "train_loss", "spike_factor": m["spike_factor"],
            "epoch_mean_loss": res.losses.mean(axis=1).astype(float).tolist(), "train_loss": res.train_loss,
            "n_examples": len(man), "record": m["record"], "wall_time_s": res.wall_time_s,
            "images_per_s": res.images_per_s, "device": str(device), "processes": processes(), "schedule_epochs": tr["epochs"]}
    if not is_main():
        return meta  # data-parallel: rank 0 writes the outputs
    save_model(out["weights"], res.model, {"model": tr["model"], "num_classes": ds.num_classes,
                                           "image_size": int(ds.image_shape[-1]), "n_trained_on": len(man),
                                           "train_loss": res.train_loss, "wall_time_s": res.wall_time_s,
                                           "images_per_s": res.images_per_s, "device": str(device), "epochs": run,
                                           "defender_model": m["name"], "cell": cell})
    trajectories.write(out["trajectories"], res.losses, meta)
    remove_checkpoint(ckpt)
    log(f"pretrain {m['name']} ({tr['model']}): {run} epochs, recorded {recorded}, skipped spike epochs "
        f"{meta['skipped_epochs']}, {res.images_per_s:.0f} img/s")
    return meta


def features(spec: dict, inp: dict, out: dict, log: Log = _quiet) -> dict:
    """Penultimate-layer features of every training example under one defender model."""
    from .training import load_model, penultimate_features, setup_runtime

    device = setup_runtime(spec["runtime"])
    ds, man, pmeta, x = _poisoned_training_set(spec, inp["manifest"], inp["images"])
    model, mmeta = load_model(inp["weights"], device)
    provenance.same_cell(inp["weights"], mmeta, provenance.of(pmeta, inp["manifest"]), model=spec["model"])
    f = penultimate_features(model, x, device)
    if len(f) != len(man):
        raise ArtifactError(f"{inp['weights']}: gave {len(f)} feature rows for {len(man)} examples")
    from .defender import model_record
    from .io import save_features

    meta = {"cell": provenance.of_role(provenance.of(pmeta, inp["manifest"]), model=spec["model"]), "shape": list(f.shape),
            "model": mmeta.get("model"), "defender_model": model_record(mmeta)}
    save_features(out["out"], f, meta)
    log(f"features of {spec['model']}: {f.shape}")
    return meta


# ---- score ------------------------------------------------------------------------------------


SCORE_CONTEXT_KEYS = ("type", "detector", "model", "dataset", "seed", "runtime", "training", "bona_fide")


def score(spec: dict, inp: dict, out: dict, log: Log = _quiet) -> dict:
    from .detectors import DETECTORS

    det_cls = DETECTORS.get(spec["type"], "detector type")
    params = {k: v for k, v in spec.items() if k not in SCORE_CONTEXT_KEYS}
    det = det_cls(**params)
    det.view = defender_view(spec, inp, log)
    det.cell = provenance.of_role(provenance.of(table_meta(inp["manifest"], "manifest")[1], inp["manifest"]),
                                  detector=spec.get("detector"))
    meta = det.score(out["out"])
    log(f"scores written to {out['out']} ({meta['wall_time_s']:.2f}s)")
    return meta


# ---- plan -------------------------------------------------------------------------------------

PLAN_KIND = "plan"


def plan(spec: dict, inp: dict, out: dict, log: Log = _quiet) -> dict:
    """Per-example weights of a defense: 1 train as usual, 0 drop, < 0 gradient ascent."""
    from .detectors.base import SCORES_KIND
    from .poisoning import manifest_table
    from .remedies import REMEDIES

    cls = REMEDIES.get(spec["remedy"], "remedy")
    remedy = cls.of(spec)
    # Arrow columns, not a DataFrame: a plan job never imports pandas (io.to_numpy).
    man, mmeta = manifest_table(inp["manifest"], ground_truth=cls.ground_truth, bona_fide_path=inp["bona_fide"])
    ref = provenance.of(mmeta, inp["manifest"])
    n = len(man)
    index = to_numpy(man["index"])
    sc, smeta = np.full(n, np.nan), {}
    if "scores" in inp:
        st, smeta = read_table(inp["scores"], SCORES_KIND, require=("index", "score"))
        provenance.same_cell(inp["scores"], smeta, ref, detector=spec.get("detector"))
        sc = to_numpy(st["score"])[aligned(inp["scores"], index, to_numpy(st["index"]), "scores", "score")]
        if not np.isfinite(sc).all():
            raise ArtifactError(f"{inp['scores']}: {int((~np.isfinite(sc)).sum())} score(s) NaN or infinite; a detector "
                                "scores every example: rerun the score stage")
    w = remedy.weights(sc, man, smeta).astype(np.float32)
    cell = provenance.of_role(ref, defense=spec["defense"])
    meta = {"cell": cell, "defense": spec["defense"], "remedy": spec["remedy"], "params": remedy.p, "n_train": n,
            "n_removed": int((w == 0).sum()), "n_ascent": int((w < 0).sum()), "weight_min": float(w.min()),
            "weight_max": float(w.max()), **remedy.plan_meta()}
    write_table(out["out"], pa.table({"index": from_numpy(index), "score": from_numpy(sc), "weight": from_numpy(w)}), PLAN_KIND, meta)
    log(f"plan {spec['defense']}: {meta['n_removed']} dropped, {meta['n_ascent']} ascended of {n}")
    return meta


def aligned(path, index: np.ndarray, got: np.ndarray, what: str, stage: str) -> np.ndarray:
    """Positions in a file's rows (its `index` column `got`) of the manifest's `index`, in the
    manifest's order: files are matched by example index, never by row position."""
    distinct = len(np.unique(got))
    if len(got) != len(index) or distinct != len(got):
        raise ArtifactError(f"{path}: {what} for {len(got)} rows ({distinct} distinct examples), the manifest "
                            f"has {len(index)} examples; rerun the {stage} stage")
    order = np.argsort(got, kind="stable")
    pos = np.searchsorted(got, index, sorter=order)
    pos = np.minimum(pos, len(got) - 1)
    if not np.array_equal(got[order[pos]], index):
        raise ArtifactError(f"{path}: {what} for other examples than the manifest's (index values differ); rerun the "
                            f"{stage} stage")
    return order[pos]


def read_plan(path, index: np.ndarray, remedy=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """A plan's weights and scores in the order of the manifest's `index`, its weights checked to
    be finite and, given the remedy that made it, within what that remedy can produce."""
    table, meta = read_table(path, PLAN_KIND, require=("index", "score", "weight"))
    pos = aligned(path, np.asarray(index), to_numpy(table["index"]), "weights", "plan")
    w = to_numpy(table["weight"]).astype(np.float32)[pos]
    if not np.isfinite(w).all():
        raise ArtifactError(f"{path}: {int((~np.isfinite(w)).sum())} weight(s) NaN or infinite; a plan's weights are "
                            "finite: rerun the plan stage")
    if remedy is not None:
        lo, hi = remedy.weight_range()
        if w.min() < lo - 1e-6 or w.max() > hi + 1e-6:
            raise ArtifactError(f"{path}: weights in [{w.min():g}, {w.max():g}], outside the [{lo:g}, {hi:g}] remedy "
                                f"'{remedy.name}' makes with these settings; rerun the plan stage")
    return w, to_numpy(table["score"]).astype(np.float64)[pos], meta


# ---- train ------------------------------------------------------------------------------------


def train(spec: dict, inp: dict, out: dict, log: Log = _quiet) -> dict:
    """The final model: the defense's remedy trains it from the plan (by default from scratch on
    the weighted loss, weight-0 examples dropped)."""
    from .remedies import REMEDIES, FinalTraining
    from .training import is_main, processes, remove_checkpoint, save_model

    d = spec["defense"]
    cls = REMEDIES.get(d["remedy"], "remedy")
    view = defender_view(spec, inp, log, model_role={"model": cls.reads_model(d)})
    device = view.device
    remedy = cls.of(d)
    w, _, pmeta = read_plan(inp["plan"], view.index, remedy)
    ref = provenance.of(table_meta(inp["manifest"], "manifest")[1], inp["manifest"])
    cell = provenance.same_cell(inp["plan"], pmeta, ref, defense=d["name"])
    ckpt = str(out["out"]) + ".ckpt"
    job = FinalTraining(view=view, weights=w, plan_meta=pmeta, checkpoint=ckpt,
                        fingerprint=fingerprint(spec, *[inp[k] for k in ("manifest", "images", "plan", "weights") if k in inp]))
    res = remedy.train(job)
    wall = sum(r.wall_time_s for _, r in job.phases)
    seen = sum(r.images_per_s * r.wall_time_s for _, r in job.phases if r.wall_time_s > 0)
    meta = {"cell": cell, "model": spec["training"]["model"], "num_classes": view.num_classes,
            "image_size": int(view.images.shape[-1]),
            "n_trained_on": int((w != 0).sum()), "n_ascent": int((w < 0).sum()), "train_loss": res.train_loss,
            "wall_time_s": wall, "images_per_s": seen / wall if wall > 0 else float("nan"), "device": str(device), "processes": processes(),
            "epochs": sum(r.epochs_run for _, r in job.phases),
            "phases": [{"phase": p, "epochs": r.epochs_run, "wall_time_s": r.wall_time_s} for p, r in job.phases],
            "reference_model": view.model_meta}
    if not is_main():
        return meta  # data-parallel: rank 0 writes the outputs
    save_model(out["out"], res.model, meta)
    for p, _ in job.phases:
        remove_checkpoint(f"{ckpt}.{p}")
    log(f"train ({d['remedy']}): {meta['n_trained_on']} examples ({meta['n_ascent']} with gradient ascent), "
        f"{meta['epochs']} epochs, {wall:.1f}s, final loss {res.train_loss[-1]:.4f}")
    return meta


# ---- evaluate ---------------------------------------------------------------------------------


def attack_success(model, attacks: dict, test_x: np.ndarray, test_y: np.ndarray, device) -> tuple[dict, dict]:
    """ASR of each attack: every test image not of the target class, triggered, predicted as target."""
    from .training import predict

    asr, boosted = {}, {}
    for name, (atk, target) in attacks.items():
        x = test_x[test_y != target]
        asr[name] = float((predict(model, atk.apply(x), device) == target).mean())
        if atk.boostable:
            boosted[name] = float((predict(model, atk.apply(x, boost=True), device) == target).mean())
    return asr, boosted


def detection_quality(man: pd.DataFrame, scores: np.ndarray, flagged: np.ndarray) -> dict | None:
    """AUROC of the scores (overall and per attack); recall and precision of the flagged set (the
    examples the plan gives weight <= 0)."""

    from . import poisoning

    if np.isnan(scores).all():
        return None
    poisoned = man["attack"].notna().to_numpy()
    clean = ~poisoned
    out = {"auroc": _auroc(scores, poisoned, clean), "auroc_per_attack": {}, "recall_per_attack": {},
           "recall_removed": float(flagged[poisoned].mean()) if poisoned.any() else None,
           "precision_removed": float(poisoned[flagged].mean()) if flagged.any() else None,
           "clean_removed_fraction": float(flagged[clean].mean())}
    # An image several attacks share (overlap) counts for each of them.
    for a in poisoning.attack_names(man["attack"]):
        m = poisoning.carries(man["attack"], a)
        out["auroc_per_attack"][a] = _auroc(scores, m, clean)
        out["recall_per_attack"][a] = float(flagged[m].mean())
    return out


def rejection_counts(man: pd.DataFrame, weights: np.ndarray) -> dict:
    """What the plan rejected (weight 0), from the ground truth: per original class, [its training
    examples, its untouched (clean) examples, those of them rejected]; and [poisoned, rejected] (the
    paper's Appendix G: does removal fall harder on small classes?)."""
    rejected = np.asarray(weights) == 0
    clean = man["attack"].isna().to_numpy()
    labels = man["orig_label"].to_numpy()
    by_class = {}
    for c in np.unique(labels):
        here = labels == c
        by_class[str(int(c))] = [int(here.sum()), int((here & clean).sum()), int((here & clean & rejected).sum())]
    return {"by_class": by_class, "poisoned": [int((~clean).sum()), int((~clean & rejected).sum())]}


def _auroc(scores, pos, neg) -> float | None:
    """Area under the ROC curve of `scores` separating `pos` from `neg` (Mann-Whitney U with tied
    scores at their mean rank, as scikit-learn computes it; numpy alone, so evaluate starts faster)."""
    if not pos.any() or not neg.any():
        return None
    s = np.concatenate([scores[pos], scores[neg]]).astype(np.float64)
    order = np.argsort(s, kind="mergesort")
    ranked = s[order]
    # Mean 1-based rank of each run of equal scores.
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(s))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def evaluate(spec: dict, inp: dict, out: dict, log: Log = _quiet) -> dict:
    from . import poisoning
    from .training import load_model, predict, setup_runtime

    t0 = time.perf_counter()
    device = setup_runtime(spec["runtime"])
    ds = get_dataset(spec)
    man, pmeta = _manifest(spec, inp["manifest"])
    ref = provenance.of(pmeta, inp["manifest"])
    model, mmeta = load_model(inp["weights"], device)
    d = spec["defense"]
    # The none defense evaluates the attacked defender model; every other one its own final model.
    role = {"model": paths.ATTACKED} if paths.trains_nothing(d) else {"defense": d["name"]}
    provenance.same_cell(inp["weights"], mmeta, ref, **role)
    targets = {a: int(i["target"]) for a, i in pmeta["attacks"].items()}
    trig = checked_triggers({**spec, "attacks": {a: i["params"] for a, i in pmeta["attacks"].items()}}, inp, ds, targets)
    attacks = poisoning.test_attacks(pmeta, ds.image_shape, trig)
    test_x, test_y, held_out = ds.test.images, ds.test.labels, None
    if spec.get("validation"):
        from .validation import evaluated, split

        v = spec["validation"]
        rows = split(test_y, v["fraction"], int(spec["seed"]), v["stratified"])
        keep = evaluated(len(test_y), rows)
        test_x, test_y = np.asarray(test_x)[keep], np.asarray(test_y)[keep]
        held_out = {**v, "n_held_out": int(len(rows))}
    clean_acc = float((predict(model, test_x, device) == test_y).mean())
    asr, boosted = attack_success(model, attacks, test_x, test_y, device)
    paper = {a: boosted.get(a, asr[a]) for a in asr}
    from .remedies import REMEDIES

    cls = REMEDIES.get(d["remedy"], "remedy")
    w, scores, plmeta = read_plan(inp["plan"], man["index"].to_numpy(), cls.of(d))
    provenance.same_cell(inp["plan"], plmeta, ref, defense=d["name"])
    wall = {"train": mmeta["wall_time_s"]}
    smeta: dict = {}
    if "scores" in inp:
        from .detectors import read_scores

        smeta = read_scores(inp["scores"])[1]
        provenance.same_cell(inp["scores"], smeta, ref, detector=d.get("detector"))
        wall["score"] = smeta.get("wall_time_s")
        wall["pretrain"] = (smeta.get("defender_model") or {}).get("wall_time_s")
    wall["evaluate"] = time.perf_counter() - t0
    cost = training_cost(mmeta, smeta, trains_nothing=paths.trains_nothing(d))
    # Settings below the references' budgets, which the tables mark: the detector's, the
    # remedy's and each learned attack's.
    notes = [n for n in (smeta.get("budget"), cls.budget_note(d)) if n]
    budget = {"defense": "; ".join(notes)} if notes else {}
    attack_notes = {a: i["budget"] for a, i in pmeta["attacks"].items() if i.get("budget")}
    if attack_notes:
        budget["attacks"] = attack_notes
    metrics = {
        "dataset": spec["dataset"]["name"], "scenario": pmeta["scenario"], "seed": spec["seed"], "defense": d["name"],
        "detector": d.get("detector"), "remedy": d["remedy"], "detector_type": smeta.get("detector"),
        "defender_model": smeta.get("defender_model"), "arch": mmeta.get("model"),
        "defense_params": {k: v for k, v in d.items() if k not in ("name", "detector", "remedy")},
        "attacks": list(attacks), "targets": {a: t for a, (_, t) in attacks.items()},
        "clean_accuracy": clean_acc, "asr": asr, "asr_boosted": boosted,
        "mean_asr": float(np.mean(list(asr.values()))) if asr else None,
        "mean_asr_boosted": float(np.mean(list(paper.values()))) if paper else None,
        "detection": detection_quality(man, scores, w <= 0),
        "n_train": len(man), "n_poisoned": int(man["attack"].notna().sum()), "n_removed": int((w == 0).sum()),
        "n_ascent": int((w < 0).sum()), "rejection": rejection_counts(man, w), "wall_time_s": wall, "cost": cost, "config": spec, "versions": versions(),
        "device": device_name(device), "train_images_per_s": mmeta["images_per_s"], "train_epochs": mmeta.get("epochs"),
        "n_test": int(len(test_y)), "validation": held_out, "budget": budget or None,
    }
    write_json(out["out"], metrics)
    log(f"clean acc {clean_acc:.4f}" + (f"  mean ASR {metrics['mean_asr']:.4f}  " if asr else "  (no attack)  ")
        + " ".join(f"{a}={v:.3f}" for a, v in asr.items()))
    return metrics


def training_cost(model_meta: dict, score_meta: dict, trains_nothing: bool) -> dict:
    """What a defense cost to run, in epochs of training and wall time, per defender model it read
    (each counted once) and for its own final training and scoring (the paper's Appendix C.2)."""
    models: dict[str, dict] = {}
    if trains_nothing:
        models[paths.ATTACKED] = {"epochs": model_meta.get("epochs"), "wall_time_s": model_meta.get("wall_time_s")}
    for m in (score_meta.get("defender_model"), model_meta.get("reference_model")):
        if m and m.get("model_name"):
            models[m["model_name"]] = {"epochs": m.get("epochs_run", m.get("epochs_recorded")), "wall_time_s": m.get("wall_time_s")}
    final = {} if trains_nothing else {"epochs": model_meta.get("epochs"), "wall_time_s": model_meta.get("wall_time_s")}
    total_epochs = sum((v.get("epochs") or 0) for v in [*models.values(), final])
    total_wall = sum((v.get("wall_time_s") or 0) for v in [*models.values(), final]) + (score_meta.get("wall_time_s") or 0)
    return {"defender_models": models, "final_training": final or None, "score_wall_time_s": score_meta.get("wall_time_s"),
            "epochs": total_epochs, "wall_time_s": total_wall}


def versions() -> dict:
    from importlib.metadata import version

    import torch

    return {"poisongrid": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": version("torchvision"), "numpy": np.__version__, "scikit-learn": version("scikit-learn"),
            "platform": platform.platform()}


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"
