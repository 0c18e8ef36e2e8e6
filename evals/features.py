"""Frozen-backbone feature extraction (eval mode, no grad, batched) for kNN and the cached linear probe."""
from __future__ import annotations

import torch
from torch import nn

from replicate.data import TensorSplit, channel_stats
from replicate.hostmem import retain_freed_memory


@torch.no_grad()
def extract_features(backbone: nn.Module, split: TensorSplit, dataset: str, batch_size: int = 1024,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features (the [CLS] token or the average pool, per the model's pooling) of ``split``."""
    retain_freed_memory()
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in channel_stats(dataset))
    was_training = backbone.training
    backbone.eval()
    out = []
    for i in range(0, len(split), batch_size):
        x = split.images[i: i + batch_size].to(device)
        out.append(backbone((x - mean) / std).float().cpu())
    backbone.train(was_training)
    return torch.cat(out), split.labels


def pixel_features(split: TensorSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pixels as features: the baseline every reduced table is judged against."""
    return split.images.flatten(1), split.labels
