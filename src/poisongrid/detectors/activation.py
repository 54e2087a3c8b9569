"""Activation Clustering (Chen et al. 2018): per class, ICA-reduced penultimate features split
into two clusters; a class whose split passes the rule loses its smaller cluster."""
from __future__ import annotations

import warnings

import numpy as np

from ..errors import ConfigError
from .base import DETECTORS, Detector, ScoreWriter

# Score of every example not in the smaller cluster of a class: below any silhouette - threshold
# (both lie in [-1, 1]), so the flagged examples always rank first.
UNFLAGGED = -3.0
MIN_CLASS = 3


def cluster_class(feats: np.ndarray, n_components: int, seed: int) -> dict:
    """ICA + 2-means on one class's features. Returns the silhouette, the smaller cluster's mask
    (BaDLoss's rule: cluster 0 if cluster 1 holds more than half, else cluster 1), and the
    components used; or `skipped` with the reason where the class cannot be clustered."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import silhouette_score

    n = len(feats)
    if n < MIN_CLASS:
        return {"skipped": f"{n} examples"}
    a = np.asarray(feats, dtype=np.float64)
    a = a[:, np.any(a != 0, axis=0)]  # dead ReLU columns would make ICA output zeros
    # Centring leaves rank <= n - 1: more components than that would whiten by zero.
    k = min(n_components, n - 1, a.shape[1])
    if k < 1:
        return {"skipped": "all features zero"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        ica = FastICA(n_components=k, whiten="unit-variance", random_state=seed)
        z = ica.fit_transform(a)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    if not np.isfinite(z).all():
        return {"skipped": "ICA gave non-finite components", "components": k}
    lab = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(z)
    if len(np.unique(lab)) < 2:
        return {"skipped": "one cluster", "components": k}
    sil = float(silhouette_score(z, lab))
    small = lab == (0 if lab.sum() * 2 > n else 1)
    return {"silhouette": sil, "smaller": small, "components": k, "ica_converged": converged}


RULES = ("silhouette", "larger_cluster", "relative_size")


@DETECTORS.register("activation_clustering")
class ActivationClustering(Detector):
    """Activation Clustering: the defender model's penultimate features, grouped by the PREDICTED
    class (`group_by: label` groups by the given label, as IBM ART does); all-zero columns
    dropped; FastICA to `n_components` (10), KMeans(2); then per class, by `rule`:
    - `silhouette` (BaDLoss's adaptation, the default): the class is attacked if its silhouette
      score > `silhouette_threshold` (0.15), and then its smaller cluster is flagged. Score:
      silhouette - threshold for the members of each class's smaller cluster.
    - `larger_cluster` (LfD's Trojan-zoo variant as LfD describes it: "trained a new model from
      scratch using the cluster with more data"): every class keeps its larger cluster, no test.
      Score: 1 - the smaller cluster's share of its class (in [0.5, 1)).
    - `relative_size` (Trojan-zoo's code): the class is attacked if its silhouette score >
      `silhouette_threshold` (Trojan-zoo: 0.1) and its smaller cluster holds less than
      `size_threshold` (0.35) of it. Score: min(silhouette - threshold, size_threshold - share).
    Everyone else scores -3, so score > 0 is exactly the rule's decision (remedy
    `remove_flagged`), and sweeping the threshold over the smaller-cluster members gives
    BaDLoss's AUROC sweep. The exact decision is in the metadata (`flagged_classes`, `n_flagged`).
    LfD ran its variant on a ResNet-18 trained 80 epochs without augmentation (a defender model of
    its own in configs/lfd-paper.yaml), layer-4 activations (the penultimate features here).

    Deviations: predictions come from the features through the model's last linear layer (float32
    here, bfloat16 autocast on GPU in the forward pass, so a near-tie may differ); FastICA and
    KMeans are seeded from the cell's seed and the class, KMeans runs 10 inits (sklearn's default is
    now 1), ICA whitening is set explicitly to unit variance. Classes with < 3 examples, no
    nonzero feature or a degenerate clustering are not attacked (BaDLoss would crash); a class
    with n <= n_components uses n - 1 components."""

    type = "activation_clustering"
    needs = ("features", "weights")
    default_model = "attacked"
    params = {"group_by": "predicted", "silhouette_threshold": 0.15, "n_components": 10, "rule": "silhouette",
              "size_threshold": 0.35}

    @classmethod
    def check(cls, det: dict, key: str, cfg: dict, bona) -> None:
        super().check(det, key, cfg, bona)
        p = {**cls.params, **det}
        if p["group_by"] not in ("predicted", "label"):
            raise ConfigError(f"{key}.group_by", p["group_by"], "'predicted' (BaDLoss) or 'label' (IBM ART)")
        t = p["silhouette_threshold"]
        if not -1 <= t < 1:
            raise ConfigError(f"{key}.silhouette_threshold", t, "a number in [-1, 1)")
        cls.positive(f"{key}.n_components", p["n_components"], integer=True)
        if p["rule"] not in RULES:
            raise ConfigError(f"{key}.rule", p["rule"], "'silhouette' (BaDLoss), 'larger_cluster' (LfD) or "
                              "'relative_size' (Trojan-zoo's code)")
        if not 0 < p["size_threshold"] <= 0.5:
            raise ConfigError(f"{key}.size_threshold", p["size_threshold"], "a number in (0, 0.5]")

    def decide(self, r: dict, small: np.ndarray) -> tuple[bool, float]:
        """Whether a clustered class is attacked under the rule, and its flagged members' score."""
        thr, share = float(self.p["silhouette_threshold"]), float(small.mean())
        if self.p["rule"] == "larger_cluster":
            return True, 1.0 - share
        if self.p["rule"] == "relative_size":
            s = min(r["silhouette"] - thr, float(self.p["size_threshold"]) - share)
            return s > 0, s
        return r["silhouette"] > thr, r["silhouette"] - thr

    def groups(self, feats: np.ndarray) -> np.ndarray:
        if self.p["group_by"] == "label":
            return self.view.labels
        from ..models import penultimate_module

        lin = penultimate_module(self.view.model())
        w = lin.weight.detach().float().cpu().numpy()
        b = lin.bias.detach().float().cpu().numpy() if lin.bias is not None else 0.0
        return (feats.astype(np.float32) @ w.T + b).argmax(1)

    def score(self, out_path) -> dict:
        feats = self.view.features()
        groups = self.groups(feats)
        scores = np.full(len(groups), UNFLAGGED, dtype=np.float64)
        classes, flagged = {}, []
        for c in np.unique(groups):
            idx = np.flatnonzero(groups == c)
            seed = int(np.random.SeedSequence([self.view.seed, int(c)]).generate_state(1)[0] % (2**31))
            r = cluster_class(feats[idx], int(self.p["n_components"]), seed)
            small = r.pop("smaller", None)
            rec = {"n": int(len(idx)), **r}
            if small is not None:
                rec["attacked"], scores[idx[small]] = self.decide(r, small)
                rec["n_smaller"] = int(small.sum())
                if rec["attacked"]:
                    flagged.append(int(c))
            classes[int(c)] = rec
            self.view.log(f"class {c}: {rec}")
        meta = {"cell": self.cell, "detector": self.type, "params": self.p, "classes": classes,
                "flagged_classes": flagged, "n_flagged": int((scores > 0).sum()), "feature_dim": int(feats.shape[1])}
        with ScoreWriter(out_path, meta, self.view) as w:
            w.write(self.view.index, scores)
        return meta
