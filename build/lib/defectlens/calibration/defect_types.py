"""Few-shot defect typing: which labelled kind of defect a region looks most like.

Each region is described by the backbone's patch embeddings pooled over the region, weighted
by how anomalous each patch is, so the description is of the defect and not of the good part
around it. One prototype per type (the mean of its unit-length examples) and a cosine nearest-
prototype rule work from a handful of examples per type, which is all a plant usually has.
Accuracy is measured by stratified cross-validation and reported, never assumed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import NearestCentroid
from sklearn.preprocessing import normalize

from defectlens.errors import DefectLensError

TEMPERATURE = 0.05  # softmax temperature on cosine similarity for the reported confidence


def pool_features(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of patch embeddings (d, h, w) under a pixel weight map (H, W)."""
    d, h, w = features.shape
    wt = F.interpolate(torch.as_tensor(np.asarray(weights, dtype=np.float32))[None, None], size=(h, w), mode="area")[0, 0].numpy()
    total = float(wt.sum())
    if total <= 1e-12:  # region smaller than a patch: take the patch at its strongest pixel
        y, x = np.unravel_index(int(np.argmax(weights)), weights.shape)
        return features[:, min(h - 1, y * h // weights.shape[0]), min(w - 1, x * w // weights.shape[1])].astype(np.float64)
    return (features.reshape(d, -1) @ wt.reshape(-1) / total).astype(np.float64)


def evidence_weights(anomaly_map: np.ndarray, pixel_threshold: float, region_mask: np.ndarray | None = None) -> np.ndarray:
    """How much each pixel says about the defect: its score above the good level."""
    weights = np.maximum(anomaly_map - pixel_threshold, 0.0)
    if not weights.any():
        weights = (anomaly_map >= anomaly_map.max()).astype(np.float32)
    return weights * region_mask if region_mask is not None else weights


class DefectTyper(BaseEstimator):
    """Nearest-prototype classifier over pooled region embeddings (cosine similarity)."""

    def __init__(self, folds: int = 5, random_state: int = 0) -> None:
        self.folds = folds
        self.random_state = random_state

    def fit(self, features: np.ndarray, labels: np.ndarray) -> DefectTyper:
        X = normalize(np.asarray(features, dtype=np.float64))
        y = np.asarray(labels)
        classes, counts = np.unique(y, return_counts=True)
        if len(classes) < 2:
            raise DefectLensError("defect typing needs labelled examples of at least two defect types")
        model = NearestCentroid().fit(X, y)
        self.classes_ = model.classes_
        self.prototypes_ = normalize(model.centroids_)
        self.n_examples_ = {str(c): int(n) for c, n in zip(classes, counts, strict=True)}
        self.cv_accuracy_, self.per_type_accuracy_ = float("nan"), {}
        splits = min(self.folds, int(counts.min()))
        if splits >= 2:
            cv = StratifiedKFold(splits, shuffle=True, random_state=self.random_state)
            predicted = cross_val_predict(NearestCentroid(), X, y, cv=cv)
            self.cv_accuracy_ = float((predicted == y).mean())
            self.per_type_accuracy_ = {str(c): float((predicted[y == c] == c).mean()) for c in classes}
        return self

    def predict(self, features: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Type names and confidences (softmax over prototype similarities)."""
        X = normalize(np.atleast_2d(np.asarray(features, dtype=np.float64)))
        sims = X @ self.prototypes_.T
        logits = (sims - sims.max(axis=1, keepdims=True)) / TEMPERATURE
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        return [str(self.classes_[i]) for i in best], probs[np.arange(len(best)), best]

    def summary(self) -> str:
        lines = [f"defect typing: {len(self.classes_)} types, cross-validated accuracy "
                 + ("n/a (fewer than 2 examples of some type)" if np.isnan(self.cv_accuracy_) else f"{100 * self.cv_accuracy_:.1f} %")]
        for c in self.classes_:
            acc = self.per_type_accuracy_.get(str(c))
            lines.append(f"  {c:<24} {self.n_examples_[str(c)]:>4} examples   accuracy {'n/a' if acc is None else f'{100 * acc:.1f} %'}")
        return "\n".join(lines)

    # -- bundle state ----------------------------------------------------------------------------
    def get_state(self) -> tuple[dict[str, np.ndarray], dict]:
        meta = {"classes": [str(c) for c in self.classes_], "n_examples": self.n_examples_,
                "cv_accuracy": None if np.isnan(self.cv_accuracy_) else self.cv_accuracy_, "per_type_accuracy": self.per_type_accuracy_}
        return {"prototypes": self.prototypes_.astype(np.float32)}, meta

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict) -> DefectTyper:
        self.prototypes_ = np.asarray(arrays["prototypes"], dtype=np.float64)
        self.classes_ = np.asarray(meta["classes"])
        if self.prototypes_.shape[0] != len(self.classes_):
            raise DefectLensError("defect typing record is inconsistent (prototypes and classes differ in number)")
        self.n_examples_ = dict(meta.get("n_examples", {}))
        acc = meta.get("cv_accuracy")
        self.cv_accuracy_ = float("nan") if acc is None else float(acc)
        self.per_type_accuracy_ = dict(meta.get("per_type_accuracy", {}))
        return self
