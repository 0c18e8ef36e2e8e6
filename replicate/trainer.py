"""The one MoCo v3 pretraining loop every row of every study runs.

One iteration (Alg. 1): two augmented views -> loss (momentum update inside the model's forward, as the official
code) -> AdamW/LAMB/LARS step, with lr and momentum read from per-iteration schedules. Around it: a progress bar,
the instability monitor, atomic checkpoints with automatic resume, and divergence detection.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import distributed as D
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import RunConfig
from .data import channel_stats, is_tensor_dataset, load_tensor_dataset
from .moco import SelfSupervisedViT
from .monitor import TrainingMonitor
from .optim import build_optimizer
from .schedules import lr_schedule, momentum_schedule


@dataclass
class PretrainResult:
    model: SelfSupervisedViT
    status: str  # "ok" | "diverged"
    diverged_at: int | None
    iterations: int
    wall_time_s: float
    monitor: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    import random

    random.seed(seed)


class TensorBatches:
    """Epoch-seeded permutations of an in-memory dataset, sharded over processes; resumable at any step."""

    def __init__(self, cfg: RunConfig, data_root: str | None, device: torch.device):
        train = load_tensor_dataset(cfg.dataset, "train", data_root, cfg.image_size)
        train = train.without_classes(cfg.exclude_classes)
        if cfg.train_subset:
            g = torch.Generator().manual_seed(1234)  # the subset is fixed across seeds and rows
            train = train.subset(torch.randperm(len(train), generator=g)[: cfg.train_subset])
        self.images, self.labels = train.images.to(device), train.labels.to(device)
        self.cfg, self.device = cfg, device
        if cfg.batch_size % D.world_size():
            raise ValueError(f"batch {cfg.batch_size} is not divisible by world size {D.world_size()}")
        self.local_batch = cfg.batch_size // D.world_size()
        self.iters_per_epoch = len(self.labels) // cfg.batch_size  # drop_last, as the official loader
        if self.iters_per_epoch == 0:
            raise ValueError(f"batch {cfg.batch_size} exceeds the {len(self.labels)} training images")
        from .augment import TwoViewBatchAugment

        mean, std = channel_stats(cfg.dataset)
        self.augment = TwoViewBatchAugment(cfg.image_size, cfg.crop_min, cfg.blur_sigma, mean, std)

    def batch(self, step: int):
        """The views for global iteration ``step``: a pure function of (seed, step), hence exact resume."""
        epoch, i = divmod(step, self.iters_per_epoch)
        perm = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch))
        start = i * self.cfg.batch_size + D.rank() * self.local_batch
        idx = perm[start: start + self.local_batch].to(self.device)
        g = torch.Generator(device=self.device).manual_seed((self.cfg.seed * 7919 + step) * 4 + D.rank())
        x1, x2 = self.augment(self.images[idx], g)
        return x1, x2, self.labels[idx]


class FolderBatches:
    """ImageFolder data (paper scale): the official per-image pipeline in DataLoader workers."""

    def __init__(self, cfg: RunConfig, data_root: str | None, device: torch.device):
        from torchvision.datasets import ImageFolder

        from .augment import two_view_pil_transforms
        from .data import imagenet_folder

        self.ds = ImageFolder(str(imagenet_folder(data_root, "train")),
                              transform=two_view_pil_transforms(cfg.image_size, cfg.crop_min))
        self.cfg, self.device = cfg, device
        self.local_batch = cfg.batch_size // D.world_size()
        self.iters_per_epoch = len(self.ds) // cfg.batch_size
        self._epoch, self._it = None, None

    def batch(self, step: int):
        epoch, i = divmod(step, self.iters_per_epoch)
        if self._epoch != epoch or self._it is None:
            g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
            perm = torch.randperm(len(self.ds), generator=g)[: self.iters_per_epoch * self.cfg.batch_size]
            mine = perm.view(-1, D.world_size(), self.local_batch)[i:, D.rank()].reshape(-1).tolist()
            loader = torch.utils.data.DataLoader(self.ds, batch_size=self.local_batch, sampler=mine,
                                                 num_workers=self.cfg.num_workers, pin_memory=True,
                                                 persistent_workers=False)
            self._epoch, self._it = epoch, iter(loader)
        (x1, x2), y = next(self._it)
        return (x1.to(self.device, non_blocking=True), x2.to(self.device, non_blocking=True),
                y.to(self.device, non_blocking=True))


def make_batches(cfg: RunConfig, data_root: str | None, device: torch.device):
    cls = TensorBatches if is_tensor_dataset(cfg.dataset) else FolderBatches
    return cls(cfg, data_root, device)


def pretrain(cfg: RunConfig, data_root: str | None = None, ckpt_path: Path | None = None,
             progress: bool = True, max_steps: int | None = None) -> PretrainResult:
    """Pretrain one row. Resumes from ``ckpt_path`` if a valid checkpoint is there; ``max_steps`` stops early
    (used by tests to simulate an interrupted run)."""
    device = D.init_from_env()
    seed_everything(cfg.seed)
    batches = make_batches(cfg, data_root, device)
    ipe = batches.iters_per_epoch
    total = cfg.epochs * ipe
    lrs = lr_schedule(cfg.lr, cfg.epochs, cfg.warmup_epochs, ipe)
    ms = momentum_schedule(cfg.setting.momentum, cfg.epochs, ipe, cfg.setting.momentum_schedule == "cosine")

    model = SelfSupervisedViT(cfg).to(device)
    if D.is_dist():
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(cfg, model)
    monitor = TrainingMonitor(cfg, model, ipe * cfg.batch_size, lrs, ms)
    start, t_offset = 0, 0.0
    state = None
    if ckpt_path is not None and Path(ckpt_path).exists():
        try:
            state = load_checkpoint(ckpt_path, cfg)
        except CheckpointError:
            state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        monitor.load_state_dict(state["monitor"])
        torch.set_rng_state(state["torch_rng"])
        start, t_offset = state["step"], state["wall_time_s"]
    ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
           if D.is_dist() else model)
    use_amp = device.type == "cuda"
    if use_amp:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    t0 = time.perf_counter()
    status, diverged_at = "ok", None
    end = total if max_steps is None else min(total, max_steps)
    bar = tqdm(range(start, end), initial=start, total=total, disable=not (progress and D.is_main()),
               desc=f"pretrain {cfg.setting.framework} seed {cfg.seed}", unit="it", leave=False, dynamic_ncols=True)
    model.train()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = float(lrs[step])
        x1, x2, y = batches.batch(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss, feats = ddp(x1, x2, float(ms[step]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        monitor.track(loss)  # device-side stats only: no host sync on ordinary steps
        if monitor.should_flush(step, end):
            if not monitor.flush(step, feats, y):
                status, diverged_at = "diverged", monitor.diverged_at
                break
            bar.set_postfix(loss=f"{monitor.last_loss:.3f}",
                            knn=f"{monitor.last_knn:.1f}" if monitor.last_knn is not None else "-")
        optimizer.step()
        done = step + 1
        if ckpt_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total:
            if D.is_main():
                save_checkpoint(ckpt_path, cfg, model, optimizer, monitor, done,
                                t_offset + time.perf_counter() - t0)
    bar.close()
    if status == "ok" and ckpt_path is not None and max_steps is not None and end < total and D.is_main():
        save_checkpoint(ckpt_path, cfg, model, optimizer, monitor, end, t_offset + time.perf_counter() - t0)
    return PretrainResult(model=model, status=status, diverged_at=diverged_at, iterations=end,
                          wall_time_s=t_offset + time.perf_counter() - t0, monitor=monitor.curves())
