"""Frozen-backbone feature extraction (eval mode, no grad, batched) for kNN and the cached linear probe: from an
in-memory split, or (paper scale) from an evaluation loader, sharded over processes and gathered."""
from __future__ import annotations

import torch
from torch import nn

from replicate.core import distributed as D
from replicate.core.data import TensorSplit, channel_stats
from replicate.runtime.hostmem import retain_freed_memory


@torch.no_grad()
def extract_features(backbone: nn.Module, split: TensorSplit, dataset: str, batch_size: int = 1024,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features (the [CLS] token or the average pool, per the model's pooling) of ``split``."""
    retain_freed_memory()
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in channel_stats(dataset, split.images.shape[-1]))
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


@torch.no_grad()
def extract_loader_features(backbone: nn.Module, loader, device: torch.device | str = "cpu",
                            amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and labels of every image of an evaluation loader (``evals.loaders.make_loader`` with
    ``train=False``), in dataset order, on every process. Under torchrun each process extracts its ``ShardSampler``
    share (DINO's ``eval_knn.py`` shards the same way); the shares are all-gathered (padded to the largest, then
    trimmed) and put back in dataset order, which each process knows from the sampler. ``amp``: bf16 on CUDA."""
    from .loaders import ShardSampler

    sampler, device = loader.sampler, torch.device(device)
    if not isinstance(sampler, ShardSampler) or sampler.shuffle:
        raise ValueError("extract_loader_features needs an evaluation loader of evals.loaders.make_loader")
    was_training = backbone.training
    backbone.eval()
    dim = backbone.num_features
    feats, labels = [torch.zeros(0, dim, device=device)], [torch.zeros(0, dtype=torch.long, device=device)]
    for x, y in loader:
        with torch.autocast(device.type, torch.bfloat16, enabled=amp and device.type == "cuda"):
            feats.append(backbone(x.to(device, non_blocking=True)).float())
        labels.append(y.to(device, non_blocking=True).long())
    backbone.train(was_training)
    mine = torch.cat([torch.cat(feats), torch.cat(labels)[:, None].float()], 1)  # labels ride along (exact < 2^24)
    shares = [ShardSampler(sampler.n, sampler.global_batch, False, rank=r, world=D.world_size())
              for r in range(D.world_size())]
    width = max(len(s) for s in shares)
    padded = torch.cat([mine, mine.new_zeros(width - len(mine), mine.shape[1])])
    gathered = D.gather_no_grad(padded).view(D.world_size(), width, -1)
    rows = torch.cat([gathered[r, : len(s)] for r, s in enumerate(shares)])
    order = torch.tensor([i for s in shares for i in s], device=rows.device)
    out = torch.empty_like(rows)
    out[order] = rows
    return out[:, :-1].cpu(), out[:, -1].long().cpu()
