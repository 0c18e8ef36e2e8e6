"""The one MoCo v3 pretraining loop every row of every study runs.

One iteration (Alg. 1): two augmented views -> loss (momentum update inside the model's forward, as the official
code) -> (Sec. 4.2's clipping of the patch projection's gradient, if set) -> AdamW/LAMB/LARS step, with lr and
momentum read from per-iteration schedules. Around it: a progress bar,
the instability monitor, atomic checkpoints with automatic resume, and divergence detection.

Distributed (``torchrun``; gloo on CPU, NCCL on GPU): DDP over the online encoder, global-batch BatchNorm
statistics (SyncBN, as the official code), keys all-gathered by the loss, per-process batch = global / world.
A run is the same computation at any world size: each process draws the same global batch and augments it with one
generator seeded by (seed, step), then keeps its slice; the monitor sees all-reduced losses and all-gathered
features. Only rank 0 writes (checkpoints, logs, results).
"""
from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.datasets import ImageFolder

from replicate.core import distributed as D
from replicate.core.augment import TwoViewBatchAugment, two_view_pil_crops
from replicate.core.config import RunConfig
from replicate.core.data import DataError, channel_stats, imagenet_folder, is_tensor_dataset, pretraining_split
from replicate.core.moco import SelfSupervisedViT, build_model
from replicate.core.optim import build_optimizer
from replicate.core.schedules import lr_schedule, momentum_schedule
from replicate.core.seeding import augment_seed, epoch_seed, seed_everything  # noqa: F401 -- seed_everything re-exported
from replicate.core.swav import drop_prototype_gradients, frozen_prototype_steps
from replicate.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, set_rng_states
from replicate.runtime.hostmem import retain_freed_memory
from replicate.runtime.monitor import HeldOutKnn, TrainingMonitor
from replicate.runtime.precision import cpu_bf16_matmuls
from replicate.runtime.progress import progress as progress_bar


@dataclass
class PretrainResult:
    model: SelfSupervisedViT
    status: str  # "ok" | "diverged"
    diverged_at: int | None
    iterations: int
    wall_time_s: float  # the whole pretraining's, including the time before a resume
    monitor: dict = field(default_factory=dict)
    resumed_s: float = 0.0  # resumed: the pretraining time before this process (the checkpoint's wall_time_s)


CHECKPOINT_EVERY_ENV = "REPLICATE_CHECKPOINT_EVERY"
COMPILE_ENV = "REPLICATE_COMPILE"  # 1/0: torch.compile the backbones or not; unset: on GPU only


def compile_wanted(device: torch.device) -> bool:
    """``$REPLICATE_COMPILE`` (1/0), else on GPU only: the bench finds compiling pays on a GPU, while on the CPUs
    measured the gain is too small to be worth a compile per row (docs/code-measurements.md)."""
    value = os.environ.get(COMPILE_ENV, "")
    return device.type == "cuda" if value == "" else value != "0"


def checkpoint_interval(cfg: RunConfig) -> int:
    """The profile's ``checkpoint_every``, or ``$REPLICATE_CHECKPOINT_EVERY`` when set (0 = only when stopped early).

    A runtime knob like --quiet: it changes when a run saves, never what it computes, so it is not part of the
    checkpoint fingerprint and a run may resume under a different interval.
    """
    env = os.environ.get(CHECKPOINT_EVERY_ENV)
    if env is None or env == "":
        return cfg.checkpoint_every
    try:
        every = int(env)
    except ValueError:
        every = -1
    if every < 0:
        raise D.LaunchError(f"${CHECKPOINT_EVERY_ENV} must be a non-negative integer (got {env!r})")
    return every


def compute_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, x1: torch.Tensor, x2: torch.Tensor,
                      momentum: float, lr: float, use_amp: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration up to its update: set the lr, loss (momentum update and key forward inside the model, bf16
    autocast if ``use_amp``), fresh gradients. Returns (loss, backbone features of the first view). ``model`` may be
    the DDP wrapper. The update is ``optimizer.step()``, left to the caller: ``pretrain`` runs the monitor between
    the two and skips the update of a diverged step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        loss, feats = model(x1, x2, momentum)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss, feats


def clip_patch_projection(model: nn.Module, max_norm: float | None) -> None:
    """Sec. 4.2's gradient clipping: scale the patch projection's gradients (weight and bias, or WeightNorm's g, v
    and bias) so their joint L2 norm is at most ``max_norm``; the other parameters' gradients are left alone.
    Under DDP the gradients are already averaged over processes here, so every rank clips the same values."""
    if max_norm is not None:
        proj = getattr(model, "module", model).backbone.patch_embed.proj  # through a DDP wrapper
        nn.utils.clip_grad_norm_(proj.parameters(), max_norm)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x1: torch.Tensor, x2: torch.Tensor,
               momentum: float, lr: float, use_amp: bool, device: torch.device, clip: float | None = None,
               drop_prototypes: bool = False, before_update=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One whole iteration, the one ``pretrain`` runs (and the bench and calibration time): ``compute_gradients``;
    ``before_update(loss, feats)`` if given (``pretrain``'s monitor: it records the raw gradients, and a False
    return skips the update of a diverged step, returning None); the patch projection's clipping (``clip``: the
    setting's ``patch_proj_clip``); SwAV's frozen prototypes (``drop_prototypes``: no prototype update in the first
    epoch); then the update. ``model`` may be the DDP wrapper. Returns (loss, backbone features of the first view)."""
    loss, feats = compute_gradients(model, optimizer, x1, x2, momentum, lr, use_amp, device)
    if before_update is not None and not before_update(loss, feats):
        return None
    inner = getattr(model, "module", model)  # through a DDP wrapper
    clip_patch_projection(inner, clip)
    if drop_prototypes:
        drop_prototype_gradients(inner)
    optimizer.step()
    return loss, feats


def make_augment(cfg: RunConfig, compile: bool = False) -> TwoViewBatchAugment:
    mean, std = channel_stats(cfg.dataset, cfg.image_size)
    return TwoViewBatchAugment(cfg.image_size, cfg.crop_min, cfg.blur_sigma, mean, std, compile=compile)


class TensorBatches:
    """Epoch-seeded permutations of an in-memory dataset, sharded over processes; resumable at any step."""

    def __init__(self, cfg: RunConfig, data_root: str | None, device: torch.device):
        train = pretraining_split(cfg, data_root)  # the same fixed images for every row and seed
        self.images, self.labels = train.images.to(device), train.labels.to(device)
        self.cfg, self.device = cfg, device
        self.local_batch = cfg.batch_size // D.world_size()
        self.iters_per_epoch = len(self.labels) // cfg.batch_size  # drop_last, as the official loader
        if self.iters_per_epoch == 0:
            raise ValueError(f"batch {cfg.batch_size} exceeds the {len(self.labels)} training images")
        self.augment = make_augment(cfg, compile=compile_wanted(device))

    def batch(self, step: int):
        """This process's slice of the views for global iteration ``step``.

        A pure function of (seed, step), hence exact resume; and independent of the world size: the whole global
        batch is augmented with one generator and each process keeps its slice (augmenting a global batch of small
        in-memory images costs little next to the model, and per-rank generators would make a 2-process run
        train on different views than a 1-process run).
        """
        epoch, i = divmod(step, self.iters_per_epoch)
        perm = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(epoch_seed(self.cfg.seed, epoch)))
        idx = perm[i * self.cfg.batch_size: (i + 1) * self.cfg.batch_size].to(self.device)
        g = torch.Generator(device=self.device).manual_seed(augment_seed(self.cfg.seed, step))
        x1, x2 = self.augment(self.images[idx], g)
        mine = slice(D.rank() * self.local_batch, (D.rank() + 1) * self.local_batch)
        return x1[mine], x2[mine], self.labels[idx][mine]


class SeededSamples(torch.utils.data.Dataset):
    """A dataset indexed by ``(index, sample_seed)``: the global CPU RNGs (torch, ``random``, numpy) are seeded
    from ``sample_seed`` just before the item is loaded and transformed, so its random crops are a pure function of
    the seed, whichever worker (or the main process) draws it and whenever its loader started. In a worker nothing
    is restored (the worker's RNGs serve nothing else); in the main process (``num_workers=0``) the run's own RNG
    states are put back afterwards."""

    def __init__(self, ds: torch.utils.data.Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def _load(self, index: int, seed: int):
        torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed would reseed CUDA's
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.ds[index]

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        if torch.utils.data.get_worker_info() is not None:
            return self._load(index, seed)
        states = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            return self._load(index, seed)
        finally:
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])


class FolderBatches:
    """ImageFolder data (paper scale): DataLoader workers decode and crop each image (``two_view_pil_crops``, uint8);
    the photometric part of the recipe runs batched on the device, one generator per (seed, step, rank).

    Exact resume: the order of an epoch is a permutation drawn from (seed, epoch), and each position of it carries
    a crop seed drawn from the same generator, so the crops of a sample are a pure function of (seed, epoch,
    position in the global order); ``SeededSamples`` seeds the worker's RNGs from it per sample. A loader restarted
    at any step (resume) starts at that exact position. This is a stronger form of seeding the workers from
    (seed, epoch, rank, worker): the crops do not depend on the rank, the world size, the number of workers, which
    worker loaded which batch, or where the loader was restarted.
    """

    def __init__(self, cfg: RunConfig, data_root: str | None, device: torch.device):
        train = imagenet_folder(data_root, "train")
        folder = ImageFolder(str(train), transform=two_view_pil_crops(cfg.image_size, cfg.crop_min))
        if len(folder.classes) > cfg.num_classes:
            raise DataError(f"{train}: {len(folder.classes)} class folders, but profile {cfg.profile!r} classifies "
                            f"{cfg.num_classes}; use a dataset with at most {cfg.num_classes} classes")
        self.ds = SeededSamples(folder)
        self.augment = make_augment(cfg, compile=compile_wanted(device))
        self.cfg, self.device = cfg, device
        self.local_batch = cfg.batch_size // D.world_size()
        self.iters_per_epoch = len(self.ds) // cfg.batch_size  # drop_last, as the official loader
        if self.iters_per_epoch == 0:
            raise DataError(f"{train}: {len(self.ds)} images, fewer than one batch of {cfg.batch_size}")
        self._it, self._next = None, None  # the open loader's iterator and the step it yields next

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image indices, crop seeds) of the epoch's global order, drop_last: the same on every rank."""
        g = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, epoch))
        n = self.iters_per_epoch * self.cfg.batch_size
        perm = torch.randperm(len(self.ds), generator=g)[:n]
        seeds = torch.randint(0, 2**63 - 1, (n,), generator=g)
        return perm, seeds

    def _loader(self, epoch: int, i: int):
        """This rank's samples of ``epoch`` from iteration ``i`` on, as (index, crop seed) pairs."""
        perm, seeds = self.epoch_order(epoch)
        mine = (t.view(-1, D.world_size(), self.local_batch)[i:, D.rank()].reshape(-1).tolist() for t in (perm, seeds))
        # a generator of its own: the workers' base seed (unused: every sample is seeded) draws nothing from the
        # run's global RNG
        return torch.utils.data.DataLoader(self.ds, batch_size=self.local_batch, sampler=list(zip(*mine)),
                                           num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                                           persistent_workers=False, generator=torch.Generator().manual_seed(epoch))

    def crops(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's uint8 crops (view 1, view 2) and labels for global iteration ``step``. Sequential calls
        share one loader per epoch; any other step restarts the loader at that step's position."""
        epoch, i = divmod(step, self.iters_per_epoch)
        if step != self._next or i == 0:
            self._it = iter(self._loader(epoch, i))
        (c1, c2), y = next(self._it)
        self._next = step + 1
        return c1, c2, y

    def batch(self, step: int):
        c1, c2, y = self.crops(step)
        g = torch.Generator(device=self.device).manual_seed(augment_seed(self.cfg.seed, step) * 1024 + D.rank())
        return (*self.augment.from_crops(c1, c2, g, self.device), y.to(self.device, non_blocking=True))


def make_batches(cfg: RunConfig, data_root: str | None, device: torch.device):
    if cfg.batch_size % D.world_size():
        raise D.LaunchError(f"batch {cfg.batch_size} is not divisible by the {D.world_size()} processes")
    cls = TensorBatches if is_tensor_dataset(cfg.dataset) else FolderBatches
    return cls(cfg, data_root, device)


def restore_checkpoint(ckpt_path: Path | None, cfg: RunConfig) -> dict | None:
    """The checkpoint to resume from, or None. Rank 0 validates it (moving a corrupt or foreign file aside) and
    tells the others, so every process resumes from the same step or none does."""
    state = None
    if D.is_main() and ckpt_path is not None and Path(ckpt_path).exists():
        try:
            state = load_checkpoint(ckpt_path, cfg)
        except CheckpointError:
            state = None
    if D.broadcast_from_main(state is not None, "rank 0 to check the checkpoint") and not D.is_main():
        state = load_checkpoint(ckpt_path, cfg)
    return state


def pretrain(cfg: RunConfig, data_root: str | None = None, ckpt_path: Path | None = None,
             progress: bool = True, max_steps: int | None = None) -> PretrainResult:
    """Pretrain one row. Resumes from ``ckpt_path`` if a valid checkpoint is there, and checkpoints to it every
    ``checkpoint_interval(cfg)`` iterations; ``max_steps`` stops early and checkpoints (tests simulate an
    interrupted run with it)."""
    device = D.init_from_env()
    retain_freed_memory()
    seed_everything(cfg.seed)
    batches = make_batches(cfg, data_root, device)
    ipe = batches.iters_per_epoch
    total = cfg.epochs * ipe
    lrs = lr_schedule(cfg.lr, cfg.epochs, cfg.warmup_epochs, ipe)
    frozen_prototypes = frozen_prototype_steps(cfg, ipe)  # SwAV: no prototype update in the first epoch
    ms = momentum_schedule(cfg.setting.momentum, cfg.epochs, ipe, cfg.setting.momentum_schedule == "cosine")
    every = checkpoint_interval(cfg)

    model = build_model(cfg).to(device)
    if D.is_dist():
        model = D.convert_sync_batchnorm(model, device)
    optimizer = build_optimizer(cfg, model)
    # the held-out monitor needs in-memory images; ImageFolder data keeps App. A's queue monitor
    held_out = (HeldOutKnn.for_run(cfg, data_root, device)
                if cfg.monitor_probe and is_tensor_dataset(cfg.dataset) else None)
    monitor = TrainingMonitor(cfg, model, ipe * cfg.batch_size, lrs, ms, held_out)
    start, t_offset = 0, 0.0
    state = restore_checkpoint(ckpt_path, cfg)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        monitor.load_state_dict(state["monitor"])
        set_rng_states(state["rng"])
        start, t_offset = state["step"], state["wall_time_s"]
        if D.is_main():
            print(f"resuming {cfg.setting.framework} seed {cfg.seed} from step {start}/{total} ({ckpt_path})",
                  file=sys.stderr, flush=True)
        del state
    # Frozen parameters (random patch projection, sin-cos table, momentum encoder) have requires_grad=False, so
    # DDP never waits for their gradients; every trainable one is used by every framework, so no
    # find_unused_parameters. The momentum update inside forward touches only non-DDP (frozen) parameters.
    if compile_wanted(device):
        model.compile_backbones()
    ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
           if D.is_dist() else model)
    use_amp = device.type == "cuda"
    if use_amp:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    t0 = time.perf_counter()
    status, diverged_at = "ok", None
    end = total if max_steps is None else min(total, max_steps)
    trained = end

    def save(step: int) -> None:
        if D.is_main():
            save_checkpoint(ckpt_path, cfg, model, optimizer, monitor, step, t_offset + time.perf_counter() - t0)

    bar = progress_bar(range(start, end), initial=start, total=total, enabled=progress,
                       desc=f"pretrain {cfg.setting.framework} seed {cfg.seed}")
    # bf16 products only with REPLICATE_CPU_MATMUL=bf16 (replicate/runtime/precision.py)
    with cpu_bf16_matmuls(model, device):
        model.train()
        for step in bar:
            x1, x2, y = batches.batch(step)

            def monitored(loss: torch.Tensor, feats: torch.Tensor, step: int = step, y: torch.Tensor = y) -> bool:
                """The monitor, between the gradients and the update; False: diverged, this step not applied."""
                # the global-batch loss: every process sees the same value, so all stop at the same step on divergence
                monitor.track(D.all_reduce_mean(loss.detach()))
                if monitor.should_flush(step, total):
                    if not monitor.flush(step, D.gather_no_grad(feats), D.gather_no_grad(y)):
                        return False
                    bar.set_postfix(loss=f"{monitor.last_loss:.3f}",
                                    knn=f"{monitor.last_knn:.1f}" if monitor.last_knn is not None else "-")
                return True

            if train_step(ddp, optimizer, x1, x2, float(ms[step]), float(lrs[step]), use_amp, device,
                          cfg.setting.patch_proj_clip, step < frozen_prototypes, monitored) is None:
                status, diverged_at, trained = "diverged", monitor.diverged_at, step  # this step's update not applied
                break
            done = step + 1
            if ckpt_path is not None and every and done % every == 0 and done < total:
                save(done)
    bar.close()
    if status == "ok" and ckpt_path is not None and end < total:
        save(end)  # stopped early (max_steps): leave a checkpoint to resume from
    return PretrainResult(model=model, status=status, diverged_at=diverged_at, iterations=trained,
                          wall_time_s=t_offset + time.perf_counter() - t0, monitor=monitor.curves(),
                          resumed_s=t_offset)
