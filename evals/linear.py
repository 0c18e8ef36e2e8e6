"""Linear probing on a frozen backbone.

``paper`` protocol (the official ``main_lincls.py``): backbone frozen and in eval mode, one Linear layer
(init N(0, 0.01), bias 0) trained with SGD momentum 0.9, wd 0, lr = base x batch/256 with a per-epoch cosine,
90 epochs, RandomResizedCrop + flip for training and Resize/CenterCrop for evaluation, fp32. Under torchrun every
process runs it on its share of each global batch, the Linear layer in DDP; every training image is used once per
epoch (the last batch partial, as the official loader) and every validation image scored once per epoch. It
reports the last epoch's top-1 and the best epoch's (the official script's number), and resumes from a
per-epoch checkpoint (``evals/resume.py``).

``cached`` protocol (reduced and smoke scales): identical optimiser and schedule, but on features extracted
once without augmentation, standardised with the training set's mean/std (an affine change of variables, so the
classifier family is the same; it only makes one lr work across backbones). Minutes become seconds.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from replicate.core import distributed as D
from replicate.runtime.progress import progress as progress_bar

from .resume import fingerprint, load_state, remove_state, save_state, state_digest

PROBE_BF16_ENV = "REPLICATE_PROBE_BF16"


def probe_bf16() -> bool:
    """``$REPLICATE_PROBE_BF16`` (1 or 0, default 0): run the paper probe's frozen-backbone forward in bf16 autocast
    on CUDA. The official probe is fp32, so that is the default; bf16 is the faster option, and a row records which
    one it used (``probe_precision``)."""
    value = os.environ.get(PROBE_BF16_ENV, "0")
    if value not in ("0", "1"):
        raise D.LaunchError(f"${PROBE_BF16_ENV} must be 1 or 0 (got {value!r})")
    return value == "1"


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


def train_linear_head(backbone: nn.Module, embed_dim: int, num_classes: int, train_loader, val_loader,
                      epochs: int = 90, batch_size: int = 1024, base_lr: float = 3.0,
                      device: torch.device | str = "cpu", progress: bool = True, *, seed: int = 0, amp: bool = False,
                      ckpt_path: Path | None = None) -> tuple[nn.Linear, list[float]]:
    """The official protocol, run by every process: the trained Linear layer and the top-1 (%) after each epoch.

    ``train_loader``/``val_loader``: ``evals.loaders.make_loader`` loaders (train: global batch ``batch_size``, no
    drop_last). ``amp``: bf16 autocast for the backbone's forward on CUDA (the official probe is fp32).
    ``ckpt_path``: saved at the end of every epoch and resumed from automatically; deleted when done."""
    _check_train_loader(train_loader, batch_size)
    device = torch.device(device)
    before = state_digest(backbone)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad = False
    fc = nn.Linear(embed_dim, num_classes)
    nn.init.normal_(fc.weight, std=0.01, generator=torch.Generator().manual_seed(seed))
    nn.init.zeros_(fc.bias)
    fc.to(device)
    lr = base_lr * batch_size / 256
    opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    tag = fingerprint(protocol="main_lincls", backbone=before, embed_dim=embed_dim, num_classes=num_classes,
                      epochs=epochs, batch_size=batch_size, base_lr=base_lr, seed=seed, amp=amp,
                      train_images=len(train_loader.dataset), val_images=len(val_loader.dataset))
    start, accs = 0, []
    state = load_state(ckpt_path, tag)
    if state is not None:
        fc.load_state_dict(state["fc"])
        opt.load_state_dict(state["optimizer"])
        start, accs = state["epoch"], state["accs"]
        if D.is_main():
            print(f"resuming the linear probe from epoch {start}/{epochs} ({ckpt_path})", file=sys.stderr, flush=True)
    # the official main_lincls.py: DDP averages the Linear layer's gradients; the frozen backbone is not wrapped
    head = (nn.parallel.DistributedDataParallel(fc, device_ids=[device.index] if device.type == "cuda" else None)
            if D.is_dist() else fc)
    use_amp = amp and device.type == "cuda"
    for epoch in progress_bar(range(start, epochs), initial=start, total=epochs, desc="linear probe", unit="epoch",
                              enabled=progress):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(lr, epoch, epochs)
        _train_epoch(backbone, head, opt, train_loader, epoch, embed_dim, device, use_amp)
        accs.append(_top1(backbone, fc, val_loader, device, use_amp))  # every epoch, as main_lincls.py
        if ckpt_path is not None and epoch + 1 < epochs:
            save_state(ckpt_path, tag, {"fc": fc.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                                        "accs": accs, "best": max(accs)})
    remove_state(ckpt_path)
    if state_digest(backbone) != before:
        raise RuntimeError("linear probe changed the frozen backbone")
    return fc, accs


def linear_probe_paper(*args, **kwargs) -> dict[str, float]:
    """``train_linear_head`` (same arguments) -> {"linear": top-1 (%) after the last epoch, "linear_best": the best
    epoch's, which is what the official main_lincls.py reports}."""
    _, accs = train_linear_head(*args, **kwargs)
    return {"linear": accs[-1], "linear_best": max(accs)}


def _check_train_loader(loader, batch_size: int) -> None:
    """The training loop steps in the loader's global batches (``ShardSampler.batch_sizes``) and sets its epochs."""
    from .loaders import EpochLoader, ShardSampler

    sampler = getattr(loader, "sampler", None)
    if (not isinstance(loader, EpochLoader) or not isinstance(sampler, ShardSampler)
            or sampler.global_batch != batch_size or sampler.drop_last):
        raise ValueError(f"linear probe: the train loader must come from evals.loaders.make_loader with global batch "
                         f"{batch_size} and drop_last=False")


def _features(backbone: nn.Module, x: torch.Tensor, device: torch.device, amp: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
        return backbone(x.to(device, non_blocking=True)).float()


def _train_epoch(backbone: nn.Module, head: nn.Module, optimizer, loader, epoch: int, embed_dim: int,
                 device: torch.device, amp: bool) -> None:
    """One pass over the training set in global batches. Each process sums the loss over its share and scales it by
    world / global batch, so DDP's average of the processes' gradients is the global batch's mean-loss gradient even
    when the shares differ (the last, partial batch); a process without a share still steps with the others."""
    loader.set_epoch(epoch)  # shuffle and augmentation from the epoch index, so a resumed probe draws the same
    batches = iter(loader)
    for n_global in loader.sampler.batch_sizes():
        x, y = next(batches, (None, None))
        if x is None:
            feats, y = torch.zeros(0, embed_dim, device=device), torch.zeros(0, dtype=torch.long, device=device)
        else:
            feats, y = _features(backbone, x, device, amp), y.to(device, non_blocking=True)
        loss = F.cross_entropy(head(feats), y, reduction="sum") * (D.world_size() / n_global)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def _top1(backbone: nn.Module, fc: nn.Module, loader, device: torch.device, amp: bool) -> float:
    """Top-1 (%) over the whole validation set: each process scores its share, the counts are summed."""
    counts = torch.zeros(2, dtype=torch.long, device=device)
    for x, y in loader:
        y = y.to(device, non_blocking=True)
        hits = (fc(_features(backbone, x, device, amp)).argmax(1) == y).sum()
        counts += torch.stack([hits, hits.new_tensor(len(y))])
    correct, total = D.all_reduce_sum(counts).tolist()
    return 100.0 * correct / max(total, 1)
