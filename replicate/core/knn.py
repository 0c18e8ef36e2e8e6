"""The weighted kNN vote (InstDisc / DINO ``eval_knn.py``), one rule for the training monitor (replicate/runtime/
monitor.py, exact search) and the evaluation (evals/knn.py, faiss search)."""
from __future__ import annotations

import torch


def weighted_vote(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, t: float) -> torch.Tensor:
    """The kNN vote: row i's prediction is the class with the largest sum of exp(sims[i, j] / t) over its neighbours
    j, each voting for its label ``neighbour_labels[i, j]``. ``sims``: (n, k) cosine similarities of the k nearest;
    ``neighbour_labels``: (n, k) int64. Shared by ``knn_classify`` (faiss search) and the training monitor (exact)."""
    votes = torch.zeros(len(sims), num_classes, device=sims.device, dtype=torch.float32)
    votes.scatter_add_(1, neighbour_labels, (sims.float() / t).exp())
    return votes.argmax(1)
