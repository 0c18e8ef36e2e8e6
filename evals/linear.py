"""Linear probing on a frozen backbone.

``paper`` protocol (the official ``main_lincls.py``): backbone frozen and in eval mode, one Linear layer
(init N(0, 0.01), bias 0) trained with SGD momentum 0.9, wd 0, lr = base x batch/256 with a per-epoch cosine,
90 epochs, RandomResizedCrop + flip for training and Resize/CenterCrop for evaluation.

``cached`` protocol (reduced and smoke scales): identical optimiser and schedule, but on features extracted
once without augmentation, standardised with the training set's mean/std (an affine change of variables, so the
classifier family is the same; it only makes one lr work across backbones). Minutes become seconds.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn


def state_digest(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer: proves a frozen backbone was left bit-identical."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _cosine_lr(base: float, epoch: int, epochs: int) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def linear_probe_cached(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                        test_labels: torch.Tensor, epochs: int = 30, batch_size: int = 256,
                        base_lr: float = 0.5, seed: int = 0) -> float:
    """Top-1 test accuracy (%) of a linear classifier trained on cached features."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_feats.mean(0), train_feats.std(0) + 1e-6
    xtr, xte = (train_feats - mean) / std, (test_feats - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    fc = nn.Linear(xtr.shape[1], num_classes)
    nn.init.normal_(fc.weight, std=0.01, generator=g)
    nn.init.zeros_(fc.bias)
    lr = base_lr * batch_size / 256
    opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(lr, epoch, epochs)
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i: i + batch_size]
            loss = F.cross_entropy(fc(xtr[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return 100.0 * (fc(xte).argmax(1) == test_labels).float().mean().item()


def linear_probe_paper(backbone: nn.Module, embed_dim: int, num_classes: int, train_loader, val_loader,
                       epochs: int = 90, batch_size: int = 1024, base_lr: float = 3.0,
                       device: torch.device | str = "cpu", progress: bool = True) -> float:
    """The official protocol on DataLoaders of (augmented train, center-cropped val) images; top-1 (%)."""
    from tqdm import tqdm

    before = state_digest(backbone)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad = False
    fc = nn.Linear(embed_dim, num_classes).to(device)
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    lr = base_lr * batch_size / 256
    opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    use_amp = torch.device(device).type == "cuda"
    for epoch in tqdm(range(epochs), desc="linear probe", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(lr, epoch, epochs)
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad(), torch.autocast(torch.device(device).type, torch.bfloat16, enabled=use_amp):
                feats = backbone(x)
            loss = F.cross_entropy(fc(feats.float()), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    correct = total = 0
    with torch.no_grad():
        for x, y in val_loader:
            x, y = x.to(device), y.to(device)
            with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=use_amp):
                correct += (fc(backbone(x).float()).argmax(1) == y).sum().item()
            total += len(y)
    if state_digest(backbone) != before:
        raise RuntimeError("linear probe changed the frozen backbone")
    return 100.0 * correct / max(total, 1)
