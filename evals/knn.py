"""Weighted kNN classification (InstDisc / DINO ``eval_knn.py``) with faiss inner-product search.

Features are L2-normalised so inner product = cosine similarity; each of the k nearest training samples votes
for its class with weight exp(sim / T). A GPU faiss index is used when CUDA and faiss-gpu are both present.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from replicate.core.knn import weighted_vote


def _faiss_index(dim: int):
    import faiss

    index = faiss.IndexFlatIP(dim)
    if torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 k: int = 20, t: float = 0.07, num_classes: int | None = None,
                 chunk: int = 4096) -> torch.Tensor:
    """Predicted labels of ``test_feats`` by a temperature-weighted vote of the k nearest training samples."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_labels))
    train = F.normalize(train_feats.float(), dim=1).numpy().astype(np.float32)
    test = F.normalize(test_feats.float(), dim=1).numpy().astype(np.float32)
    index = _faiss_index(train.shape[1])
    index.add(np.ascontiguousarray(train))
    preds = []
    labels = train_labels.long()
    for i in range(0, len(test), chunk):
        sims, idx = index.search(np.ascontiguousarray(test[i: i + chunk]), k)
        preds.append(weighted_vote(torch.from_numpy(sims), labels[torch.from_numpy(idx)], num_classes, t))
    return torch.cat(preds)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k: int = 20, t: float = 0.07) -> float:
    """Top-1 accuracy in percent."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_classify(train_feats, train_labels, test_feats, k, t, num_classes)
    return 100.0 * (pred == test_labels.long()).float().mean().item()
