"""Feature space: penultimate-layer features of clean, triggered and poisoned training samples, in 2-D.

Poisoned samples form their own cluster in the feature space of a backdoored model, next to (not inside)
the target class: the observation behind activation clustering (Chen et al., 2019) and the motivation of
DBD (Huang et al., ICLR 2022). PCA gives an instant view; UMAP (McInnes et al., 2018) a faithful one.

The view's one computation is :func:`feature_set` then :func:`embed` (together: :func:`embed_features`);
:func:`analysis.figures.embedding_figure` draws it on the Feature-space page, the Compare page and the HTML report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from suspects.device import to_device
from suspects.models import model_api, penultimate_features
from suspects.store import Suspect
from suspects.triggers import Trigger

from .samples import balanced_indices

__all__ = ["FeatureSet", "extract_features", "feature_set", "pca_2d", "umap_2d", "separation_score", "KINDS",
           "EMBEDDINGS", "Embedding", "embed", "embed_features"]

KINDS = ("clean test", "triggered test", "clean train", "poisoned train")
EMBEDDINGS = ("PCA", "UMAP")


@dataclass
class FeatureSet:
    """Features (N, D) with, per point: kind (see ``KINDS``), true label, model prediction, poisoned flag,
    the index into its source split, and the image itself (uint8, for hover / selection views)."""

    features: np.ndarray
    kind: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    poisoned: np.ndarray
    source_index: np.ndarray
    images: np.ndarray

    def __len__(self) -> int:
        return len(self.features)


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and predicted labels of raw [0, 1] images."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    feats, preds = [], []
    head = model_api(model).get_classifier()
    try:
        for start in range(0, len(images), batch_size):
            f = penultimate_features(model, to_device(images[start:start + batch_size], device)).float()
            feats.append(f.cpu())
            preds.append(head(f).argmax(1).cpu())
    finally:
        model.train(was)
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def feature_set(suspect: Suspect, n_clean: int = 1000, n_triggered: int = 500, n_train: int = 0,
                seed: int = 0, trigger: Trigger | None = None) -> FeatureSet:
    """Clean test images of every class, triggered test images, and (when the poisoned training set is known
    and ``n_train`` > 0) training samples with the poisoned ones included and marked. ``trigger``: another trigger
    to stamp on the test images (e.g. a backdoored suspect's, on a clean model); the training samples then stay
    out, since the poisoned training set belongs to the suspect's own trigger."""
    own = trigger is None
    test, trigger = suspect.test, (suspect.trigger if trigger is None else trigger)
    parts: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    idx = balanced_indices(test.labels, n_clean, seed)
    x = test.images(idx)
    parts.append(("clean test", x, test.labels[idx], torch.zeros(len(idx), dtype=torch.bool), idx))
    if trigger is not None and n_triggered > 0:
        tidx = balanced_indices(test.labels, n_triggered, seed + 1, trigger.test_mask(test.labels))
        parts.append(("triggered test", trigger(test.images(tidx)), test.labels[tidx],
                      torch.ones(len(tidx), dtype=torch.bool), tidx))
    if n_train > 0 and own and trigger is not None and suspect.card.get("poison"):
        ds = suspect.poisoned_train()
        gen = torch.Generator().manual_seed(seed + 2)
        poison = ds.poison_idx[torch.randperm(len(ds.poison_idx), generator=gen)][: max(1, n_train // 5)]
        others = torch.nonzero(~ds.poisoned_mask).flatten()
        others = others[torch.randperm(len(others), generator=gen)][: n_train - len(poison)]
        tr_idx = torch.cat([others, poison]).sort().values
        items = [ds[int(i)] for i in tr_idx]
        xs = torch.stack([it[0] for it in items])
        flags = torch.tensor([it[3] for it in items])
        labels = torch.tensor([it[2] for it in items])
        for kind, m in (("clean train", ~flags), ("poisoned train", flags)):
            parts.append((kind, xs[m], labels[m], flags[m], tr_idx[m]))
    feats, preds, kinds, labels, flags, src, imgs = [], [], [], [], [], [], []
    for kind, xs, ys, fl, si in parts:
        if len(xs) == 0:
            continue
        f, p = extract_features(suspect.model, xs)
        feats.append(f)
        preds.append(p)
        kinds += [kind] * len(xs)
        labels.append(ys.numpy())
        flags.append(fl.numpy())
        src.append(si.numpy())
        imgs.append(xs.clamp(0, 1).mul(255).round().byte().numpy())
    return FeatureSet(np.concatenate(feats), np.array(kinds), np.concatenate(labels), np.concatenate(preds),
                      np.concatenate(flags), np.concatenate(src), np.concatenate(imgs))


def pca_2d(features: np.ndarray) -> np.ndarray:
    """First two principal components (centred features), instant."""
    x = features - features.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return (x @ vt[:2].T).astype(np.float32)


def umap_2d(features: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0,
            progress: Callable[[float, str, dict], None] | None = None) -> np.ndarray:
    """UMAP embedding with neighbours precomputed by scikit-learn (much faster first fit) and a fixed seed."""
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")
    from sklearn.neighbors import NearestNeighbors
    from umap import UMAP

    report = progress or (lambda f, m, d: None)
    n = len(features)
    if n < 4:
        raise ValueError("UMAP needs at least 4 points")
    k = min(n_neighbors, n - 1)
    report(0.05, "nearest neighbours", {})
    nn_ = NearestNeighbors(n_neighbors=k).fit(features)
    dist, ind = nn_.kneighbors(features)
    report(0.3, "fitting UMAP (the first fit in a process compiles numba code)", {})
    reducer = UMAP(n_neighbors=k, min_dist=min_dist, random_state=seed, precomputed_knn=(ind, dist, None),
                   n_components=2)
    emb = reducer.fit_transform(features)
    report(1.0, "UMAP done", {})
    return emb.astype(np.float32)


def separation_score(points: np.ndarray, poisoned: np.ndarray, k: int = 10) -> dict[str, float]:
    """How cleanly the poisoned points cluster: the mean share of each poisoned point's ``k`` nearest
    neighbours (excluding itself) that are poisoned, and the chance level (the poisoned share of all points)."""
    from sklearn.neighbors import NearestNeighbors

    poisoned = np.asarray(poisoned, dtype=bool)
    n_p = int(poisoned.sum())
    if n_p == 0 or n_p == len(points):
        return {"score": float("nan"), "chance": float(poisoned.mean()), "k": k, "n_poisoned": n_p}
    k = min(k, len(points) - 1)
    _, ind = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points[poisoned])
    share = poisoned[ind[:, 1:]].mean(1)
    return {"score": float(share.mean()), "chance": float((n_p - 1) / (len(points) - 1)), "k": k, "n_poisoned": n_p}


@dataclass
class Embedding:
    """2-D embedding of one model's penultimate features, per point: kind, true label, prediction, poisoned flag;
    ``separation`` is the poisoned-cluster score in the full feature space (:func:`separation_score`)."""

    points: np.ndarray
    kind: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    poisoned: np.ndarray
    separation: dict
    method: str

    def __len__(self) -> int:
        return len(self.points)


def embed(fs: FeatureSet, method: str = "PCA", n_neighbors: int = 15, seed: int = 0,
          progress: Callable[[float, str, dict], None] | None = None) -> Embedding:
    """Embed a feature set in 2-D by PCA (:func:`pca_2d`) or UMAP (:func:`umap_2d`), with its separation score."""
    if method not in EMBEDDINGS:
        raise ValueError(f"method must be PCA or UMAP, got {method!r}")
    points = pca_2d(fs.features) if method == "PCA" else umap_2d(fs.features, n_neighbors=n_neighbors, seed=seed,
                                                                   progress=progress)
    return Embedding(points, fs.kind, fs.label, fs.pred, fs.poisoned, separation_score(fs.features, fs.poisoned),
                     method)


def embed_features(suspect: Suspect, n: int = 300, method: str = "PCA", seed: int = 0) -> Embedding:
    """Features of ``n`` clean and ``n // 2`` triggered test images (the suspect's trigger), embedded by PCA or
    UMAP (:func:`embed`)."""
    if method not in EMBEDDINGS:
        raise ValueError(f"method must be PCA or UMAP, got {method!r}")
    fs = feature_set(suspect, n_clean=n, n_triggered=n // 2 if suspect.trigger is not None else 0, n_train=0,
                     seed=seed)
    return embed(fs, method)
