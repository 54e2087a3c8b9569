"""One pure function per stage: files in, files out. The CLI and the Snakemake rules are thin
wrappers around these. torch and scikit-learn are imported inside the stages that use them, so
the light stages (poison, score, filter) start in a fraction of a second."""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from . import __version__, poisoning, trajectories
from .attacks import ATTACKS
from .data import Dataset, load_dataset
from .detectors import DETECTORS, defender_manifest, read_scores
from .errors import ArtifactError
from .io import fingerprint, load_npz, read_table, save_npz, write_json, write_table
from .remedies import REMEDIES

FILTER_KIND = "filter"
Log = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


def get_dataset(spec: dict) -> Dataset:
    d = spec["dataset"]
    return load_dataset(d["loader"], data_dir=d["data_dir"], image_size=d["image_size"], download=d["download"], **d["options"])


def _triggers(paths: dict[str, str] | None) -> dict[str, np.ndarray]:
    return {name: load_npz(p)["trigger"] for name, p in (paths or {}).items()}


# ---- trigger (Narcissus) ----------------------------------------------------------------------


def trigger(spec: dict, out: str, log: Log = _quiet) -> dict:
    """Optimise the Narcissus trigger for this dataset and seed: train a surrogate on what the
    attacker holds (the target class plus a fraction of the other classes), then minimise the
    surrogate's loss toward the target on target-class images under the l-inf budget."""
    from .attacks.narcissus import optimize_trigger
    from .training import fit, setup_runtime

    t0 = time.perf_counter()
    device = setup_runtime(spec["runtime"])
    ds = get_dataset(spec)
    seed, sur, atk = spec["seed"], spec["surrogate"], spec["attack"]
    labels = ds.train.labels
    target = poisoning.draw_target("narcissus", atk, labels, ds.num_classes, seed)
    rng = np.random.default_rng([seed, 3])
    others = np.flatnonzero(labels != target)
    pool = np.sort(np.concatenate([np.flatnonzero(labels == target),
                                   rng.choice(others, size=max(1, int(len(others) * sur["pool_fraction"])), replace=False)]))
    training = {**spec["training"], "model": sur["model"], "epochs": sur["epochs"]}
    log(f"surrogate {sur['model']} on {len(pool)} images, target class {target}")
    res = fit(training, ds.train.images[pool], labels[pool], ds.num_classes, seed=seed, device=device, log=log)
    eps = float(atk.get("eps", 16 / 255))
    target_imgs = ds.train.images[labels == target]
    trig = optimize_trigger(res.model, target_imgs, target, eps=eps, steps=sur["steps"], lr=sur["lr"],
                            batch_size=spec["training"]["batch_size"], seed=seed, device=device)
    meta = {"target": target, "eps": eps, "surrogate_pool": int(len(pool)), "wall_time_s": time.perf_counter() - t0}
    save_npz(out, trigger=trig.astype(np.float32), target=np.int64(target))
    log(f"trigger done: l-inf {np.abs(trig).max() * 255:.1f}/255 in {meta['wall_time_s']:.1f}s")
    return meta


# ---- poison -----------------------------------------------------------------------------------


def poison(spec: dict, manifest_out: str, images_out: str, trigger_paths: dict[str, str] | None = None) -> dict:
    ds = get_dataset(spec)
    trig = _triggers(trigger_paths)
    for name, path in (trigger_paths or {}).items():
        want = poisoning.draw_target(name, spec["attacks"][name], ds.train.labels, ds.num_classes, spec["seed"])
        got = int(load_npz(path)["target"])
        if got != want:
            raise ArtifactError(f"{path}: trigger was optimised for class {got}, but this seed's {name} target is {want}")
    ps = poisoning.poison(ds, spec["attacks"], spec["all_attacks"], spec["seed"], spec["bona_fide"], trig)
    ps.meta["scenario"] = spec["scenario"]
    poisoning.write(ps, manifest_out, images_out)
    return ps.meta


def _poisoned_training_set(spec: dict, manifest_path: str, images_path: str):
    ds = get_dataset(spec)
    man, meta = poisoning.read_manifest(manifest_path)
    return ds, man, meta, poisoning.training_images(ds, images_path, man)


# ---- pretrain ---------------------------------------------------------------------------------


def pretrain(spec: dict, manifest: str, images: str, out: str, log: Log = _quiet) -> dict:
    from .training import fit, remove_checkpoint, setup_runtime

    device = setup_runtime(spec["runtime"])
    ds, man, pmeta, x = _poisoned_training_set(spec, manifest, images)
    tr, pt = spec["training"], spec["pretrain"]
    run = max(1, round(pt["r_epoch"] * tr["epochs"]))
    # Paper: no augmentation while recording trajectories; the schedule still spans the full run.
    training = {**tr, "augment": "none"}
    ckpt = str(out) + ".ckpt"
    res = fit(training, x, man["label"].to_numpy(), ds.num_classes, seed=spec["seed"], device=device,
              epochs_to_run=run, record=pt["record"], checkpoint=ckpt, fingerprint=fingerprint(spec, manifest, images), log=log)
    means = res.losses.mean(axis=1).astype(float).tolist()
    kept = trajectories.accepted_epochs(means, pt["spike_factor"])
    meta = {"epochs_recorded": run, "accepted_epochs": kept, "skipped_epochs": sorted(set(range(run)) - set(kept)),
            "epoch_mean_loss": means, "train_loss": res.train_loss, "n_examples": len(man), "record": pt["record"],
            "wall_time_s": res.wall_time_s, "images_per_s": res.images_per_s, "device": str(device),
            "schedule_epochs": tr["epochs"]}
    trajectories.write(out, res.losses, meta)
    remove_checkpoint(ckpt)
    log(f"pretrain: {run} epochs, skipped spike epochs {meta['skipped_epochs']}, {res.images_per_s:.0f} img/s")
    return meta


# ---- score ------------------------------------------------------------------------------------


def score(spec: dict, inputs: dict[str, str], out: str) -> dict:
    det_cls = DETECTORS.get(spec["type"], "detector type")
    params = {k: v for k, v in spec.items() if k not in ("type", "detector")}
    t0 = time.perf_counter()
    meta = det_cls(**params).score(inputs, out)
    return {**meta, "wall_time_s": time.perf_counter() - t0}


# ---- filter -----------------------------------------------------------------------------------


def filter_(spec: dict, manifest: str, out: str, scores: str | None = None) -> dict:
    remedy = REMEDIES.get(spec["remedy"], "remedy")
    man = poisoning.read_manifest(manifest)[0] if getattr(remedy, "ground_truth", False) else defender_manifest(manifest)[0]
    n = len(man)
    sc = np.full(n, np.nan)
    if scores is not None:
        sdf, _ = read_scores(scores)
        if len(sdf) != n or not np.array_equal(np.sort(sdf["index"].to_numpy()), man["index"].to_numpy()):
            raise ArtifactError(f"{scores}: scores cover {len(sdf)} examples, the manifest {n}; rerun the score stage")
        sc = sdf.sort_values("index")["score"].to_numpy()
    removed = remedy(sc, man, spec)
    meta = {"defense": spec["defense"], "remedy": spec["remedy"], "r_reject": spec.get("r_reject"),
            "n_removed": int(removed.sum()), "n_train": n}
    write_table(out, pa.table({"index": man["index"].to_numpy(), "keep": ~removed, "score": sc}), FILTER_KIND, meta)
    return meta


# ---- train ------------------------------------------------------------------------------------


def train(spec: dict, manifest: str, images: str, keep: str, out: str, log: Log = _quiet) -> dict:
    from .training import fit, remove_checkpoint, save_model, setup_runtime

    device = setup_runtime(spec["runtime"])
    ds, man, _, x = _poisoned_training_set(spec, manifest, images)
    ktab, kmeta = read_table(keep, FILTER_KIND)
    mask = ktab.column("keep").to_numpy(zero_copy_only=False)
    if len(mask) != len(man):
        raise ArtifactError(f"{keep}: has {len(mask)} rows, the manifest {len(man)}; rerun the filter stage")
    labels = man["label"].to_numpy()
    ckpt = str(out) + ".ckpt"
    res = fit(spec["training"], x.subset(mask), labels[mask], ds.num_classes, seed=spec["seed"], device=device,
              checkpoint=ckpt, fingerprint=fingerprint(spec, manifest, images, keep), log=log)
    meta = {"model": spec["training"]["model"], "num_classes": ds.num_classes, "image_size": int(ds.image_shape[-1]),
            "n_trained_on": int(mask.sum()), "train_loss": res.train_loss, "wall_time_s": res.wall_time_s,
            "images_per_s": res.images_per_s, "device": str(device), "epochs": res.epochs_run}
    save_model(out, res.model, meta)
    remove_checkpoint(ckpt)
    log(f"train: {mask.sum()} examples, {res.epochs_run} epochs, {res.wall_time_s:.1f}s, final loss {res.train_loss[-1]:.4f}")
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


def detection_quality(man: pd.DataFrame, scores: np.ndarray, removed: np.ndarray) -> dict | None:
    if np.isnan(scores).all():
        return None
    poisoned = man["attack"].notna().to_numpy()
    attack = man["attack"].fillna("").to_numpy(dtype=str)
    clean = ~poisoned
    out = {"auroc": _auroc(scores, poisoned, clean), "auroc_per_attack": {}, "recall_per_attack": {},
           "recall_removed": float(removed[poisoned].mean()) if poisoned.any() else None,
           "precision_removed": float(poisoned[removed].mean()) if removed.any() else None,
           "clean_removed_fraction": float(removed[clean].mean())}
    for a in pd.unique(attack[poisoned]):
        m = attack == a
        out["auroc_per_attack"][a] = _auroc(scores, m, clean)
        out["recall_per_attack"][a] = float(removed[m].mean())
    return out


def _auroc(scores, pos, neg) -> float | None:
    from sklearn.metrics import roc_auc_score

    if not pos.any() or not neg.any():
        return None
    y = np.concatenate([np.ones(pos.sum()), np.zeros(neg.sum())])
    return float(roc_auc_score(y, np.concatenate([scores[pos], scores[neg]])))


def evaluate(spec: dict, manifest: str, keep: str, model_path: str, out: str,
             trigger_paths: dict[str, str] | None = None, pretrain_path: str | None = None,
             scores_path: str | None = None, log: Log = _quiet) -> dict:
    from .training import load_model, predict, setup_runtime

    t0 = time.perf_counter()
    device = setup_runtime(spec["runtime"])
    ds = get_dataset(spec)
    man, pmeta = poisoning.read_manifest(manifest)
    model, mmeta = load_model(model_path, device)
    attacks = poisoning.test_attacks(pmeta, ds.image_shape, _triggers(trigger_paths))
    clean_acc = float((predict(model, ds.test.images, device) == ds.test.labels).mean())
    asr, boosted = attack_success(model, attacks, ds.test.images, ds.test.labels, device)
    paper = {a: boosted.get(a, asr[a]) for a in asr}
    ktab, kmeta = read_table(keep, FILTER_KIND)
    removed = ~ktab.column("keep").to_numpy(zero_copy_only=False)
    scores = ktab.column("score").to_numpy(zero_copy_only=False).astype(float)
    d = spec["defense"]
    wall = {"train": mmeta["wall_time_s"]}
    if pretrain_path:
        wall["pretrain"] = trajectories.meta(pretrain_path)["wall_time_s"]
    if scores_path:
        wall["score"] = read_scores(scores_path)[1].get("wall_time_s")
    wall["evaluate"] = time.perf_counter() - t0
    metrics = {
        "dataset": spec["dataset"]["name"], "scenario": pmeta["scenario"], "seed": spec["seed"], "defense": d["name"],
        "detector": d.get("detector"), "remedy": d["remedy"],
        "defense_params": {k: v for k, v in d.items() if k not in ("name", "detector", "remedy")},
        "attacks": list(attacks), "targets": {a: t for a, (_, t) in attacks.items()},
        "clean_accuracy": clean_acc, "asr": asr, "asr_boosted": boosted,
        "mean_asr": float(np.mean(list(asr.values()))), "mean_asr_boosted": float(np.mean(list(paper.values()))),
        "detection": detection_quality(man, scores, removed),
        "n_train": len(man), "n_poisoned": int(man["attack"].notna().sum()), "n_removed": int(removed.sum()),
        "wall_time_s": wall, "config": spec, "versions": versions(), "device": device_name(device),
        "train_images_per_s": mmeta["images_per_s"],
    }
    write_json(out, metrics)
    log(f"clean acc {clean_acc:.4f}  mean ASR {metrics['mean_asr']:.4f}  " + " ".join(f"{a}={v:.3f}" for a, v in asr.items()))
    return metrics


def versions() -> dict:
    import sklearn
    import torch
    import torchvision

    return {"poisongrid": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "platform": platform.platform()}


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"
