"""End-to-end fine-tuning with the DeiT recipe (paper Sec. 6.3 and 6.4), through timm.

One loop for both kinds of data:
- DataLoaders (paper scale): per-image PIL transforms in workers (timm ``create_transform`` with RandAugment
  rand-m9-mstd0.5-inc1 for ImageNet; the official transfer transform for the transfer datasets, see
  ``evals/loaders.py``).
- In-memory ``TensorSplit`` (reduced / smoke): batched tensor augmentation, random-resized-crop + flip via
  ``TwoViewBatchAugment.crop_flip`` (the profile-style crop scale). RandAugment is skipped there: its PIL ops
  (colour, posterize, solarize ...) are built for RGB photographs and would have to run image by image on
  small grayscale tensors (28 or 40 px), which costs more than the fine-tuning itself.
Shared by both: DeiT's model init (``build_classifier``), AdamW with lr = base_lr x batch / 512 (DeiT) and DeiT's
no-weight-decay groups (biases, norms, position embedding, [CLS]), DeiT's lr schedule (timm's cosine scheduler
stepped once per epoch from a warmup lr, ``deit_lr_schedule``), Mixup/CutMix (``timm.data.Mixup``) with
``SoftTargetCrossEntropy``, label smoothing, drop path, random erasing.
Not reproduced: DeiT's model EMA (its accuracy is not the one DeiT reports) and gradient scaling (bf16 autocast
on GPU needs none). As in DeiT, every weight is trained, including the patch projection and position
embedding that MoCo v3 pretraining keeps frozen.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from timm.layers import trunc_normal_
from torch import nn
from torch.nn.utils import parametrize

from replicate.core import distributed as D
from replicate.core.config import RunConfig
from replicate.core.data import TensorSplit, channel_stats
from replicate.core.model import build_vit
from replicate.core.seeding import augment_seed, epoch_seed, seed_everything
from replicate.runtime.checkpoint import config_fingerprint
from replicate.runtime.progress import progress as progress_bar

from .resume import fingerprint, load_state, remove_state, save_state, state_digest

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"


class FinetuneDiverged(FloatingPointError):
    """The fine-tuning loss became non-finite; ``step`` is the iteration (a row records it as diverged)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass(frozen=True)
class FinetuneRecipe:
    epochs: int
    batch: int  # global batch
    base_lr: float  # peak lr = base_lr x batch / 512 (DeiT's scaling rule)
    wd: float
    warmup_epochs: float
    drop_path: float
    label_smoothing: float
    mixup: float  # Mixup alpha; 0 = off
    cutmix: float  # CutMix alpha; 0 = off
    reprob: float  # random erasing probability
    min_lr: float = 1e-5  # cosine floor (DeiT's --min-lr)
    warmup_lr: float = 1e-6  # where the warmup starts (DeiT's --warmup-lr)
    lr_steps_per_epoch: int = 1  # scheduler steps per epoch: DeiT steps once; see deit_lr_schedule
    rand_augment: str | None = None  # timm auto-augment policy for PIL data; None = crop + flip only
    crop_scale: tuple[float, float] = (0.08, 1.0)
    repeated_aug: bool = False  # DeiT's repeated augmentation (ImageNet only; off for transfer)
    train_subset: int | None = None  # small scales: fine-tune on a fixed random subset of the target

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch / 512


# Sec. 6.3: "DeiT codebase with all its default settings", ViT-B 150 epochs. DeiT main.py defaults (0282d2a):
# AdamW lr 5e-4 x batch/512, wd 0.05, 5 warmup epochs from 1e-6, min lr 1e-5, drop path 0.1, smoothing 0.1,
# RandAugment, Mixup 0.8, CutMix 1.0, random erasing 0.25, repeated augmentation. The GPU count (hence the total
# batch) is not stated; 1024 is DeiT's own reference batch.
PAPER_IMAGENET_FINETUNE = FinetuneRecipe(
    epochs=150, batch=1024, base_lr=5e-4, wd=0.05, warmup_epochs=5, drop_path=0.1, label_smoothing=0.1,
    mixup=0.8, cutmix=1.0, reprob=0.25, min_lr=1e-5, warmup_lr=1e-6, rand_augment=RAND_AUGMENT, repeated_aug=True)
# ViT-L: 100 epochs, drop path 0.5 (DeiT-L diverges with its defaults).
PAPER_IMAGENET_FINETUNE_LARGE = replace(PAPER_IMAGENET_FINETUNE, epochs=100, drop_path=0.5)

# Sec. 6.4 / official transfer/README.md: DeiT main.py --batch-size 128 (x 8 GPUs = 1024) --epochs 100 --lr 3e-4
# --warmup-epochs 3 --no-repeated-aug, DeiT defaults otherwise (smoothing 0.1, min lr 1e-5, warmup lr 1e-6); the official
# transfer/datasets.py transform is RandomResizedCrop(scale=(0.05, 1)) + flip (no RandAugment, no erasing).
_TRANSFER = {"epochs": 100, "batch": 1024, "base_lr": 3e-4, "warmup_epochs": 3, "label_smoothing": 0.1,
             "min_lr": 1e-5, "warmup_lr": 1e-6, "rand_augment": None, "crop_scale": (0.05, 1.0), "repeated_aug": False}
PAPER_TRANSFER_RECIPES = {
    "cifar10": FinetuneRecipe(wd=0.1, reprob=0.0, drop_path=0.1, mixup=0.8, cutmix=1.0, **_TRANSFER),
    "cifar100": FinetuneRecipe(wd=0.1, reprob=0.0, drop_path=0.1, mixup=0.5, cutmix=1.0, **_TRANSFER),
    "flowers102": FinetuneRecipe(wd=0.3, reprob=0.25, drop_path=0.1, mixup=0.0, cutmix=0.0, **_TRANSFER),
    "pets": FinetuneRecipe(wd=0.1, reprob=0.0, drop_path=0.0, mixup=0.8, cutmix=0.0, **_TRANSFER),
}

# Small scales: a few epochs on in-memory data, so a whole transfer row stays within its time budget. Mixup and
# CutMix are off: they regularise 100-epoch runs and only slow down a 10-epoch one (the code path is tested).
# DeiT's lr schedule (warmup from 1e-6, floor 1e-5: the peak lr is 5e-4 here, 6e-4 in the paper's recipe) with
# about the paper's 100 scheduler steps: 10 (reduced) or 7 (smoke) per epoch instead of DeiT's one, which in a
# 10-epoch run would hold 2 of the 10 epochs at the warmup lr (deit_lr_schedule).
_REDUCED_TRANSFER = FinetuneRecipe(epochs=10, batch=128, base_lr=2e-3, wd=0.05, warmup_epochs=1, drop_path=0.1,
                                   label_smoothing=0.1, mixup=0.0, cutmix=0.0, reprob=0.0, crop_scale=(0.35, 1.0),
                                   train_subset=5000, min_lr=1e-5, warmup_lr=1e-6, lr_steps_per_epoch=10)
SMALL_TRANSFER_RECIPES = {
    "reduced": _REDUCED_TRANSFER,
    "reduced-aligned": _REDUCED_TRANSFER,  # both reduced datasets: Fashion-MNIST's 10 classes, 28 px objects
    "smoke": FinetuneRecipe(epochs=15, batch=64, base_lr=4e-3, wd=0.05, warmup_epochs=1, drop_path=0.0,
                            label_smoothing=0.1, mixup=0.0, cutmix=0.0, reprob=0.0, crop_scale=(0.5, 1.0),
                            min_lr=1e-5, warmup_lr=1e-6, lr_steps_per_epoch=7),
}


def transfer_recipe(profile: str, target: str) -> FinetuneRecipe:
    """The paper's per-dataset recipe at paper scale; the profile's small recipe otherwise."""
    if profile == "paper":
        return PAPER_TRANSFER_RECIPES[target]
    return SMALL_TRANSFER_RECIPES[profile]


class TensorEpochs:
    """Seeded, shuffled, drop-last batches of an in-memory split with batched crop + flip (+ random erasing)."""

    def __init__(self, split: TensorSplit, recipe: FinetuneRecipe, cfg: RunConfig, device: torch.device):
        from replicate.core.augment import TwoViewBatchAugment

        mean, std = channel_stats(cfg.dataset, cfg.image_size)  # the pretraining data's statistics, as DeiT keeps ImageNet's
        self.augment = TwoViewBatchAugment(cfg.image_size, recipe.crop_scale[0], cfg.blur_sigma, mean, std)
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.batch = min(recipe.batch, len(split)) // 2 * 2  # Mixup needs an even batch
        self.seed, self.device = cfg.seed, device
        self.erase = None
        if recipe.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(recipe.reprob, mode="pixel", device=str(device))

    def __len__(self) -> int:
        return len(self.labels) // self.batch

    def epoch(self, epoch: int):
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        perm = torch.randperm(len(self.labels), generator=g)
        ga = torch.Generator(device=self.device).manual_seed(augment_seed(self.seed, epoch))
        for i in range(len(self)):
            idx = perm[i * self.batch: (i + 1) * self.batch].to(self.device)
            x = self.augment.normalize(self.augment.crop_flip(self.images[idx], ga))
            yield (self.erase(x) if self.erase else x), self.labels[idx]


def deit_lr_schedule(peak: float, min_lr: float, warmup_lr: float, epochs: int, warmup_epochs: float,
                     iters_per_epoch: int, steps_per_epoch: int = 1) -> np.ndarray:
    """The lr of every iteration as DeiT's main.py sets it: timm's ``CosineLRScheduler`` as ``create_scheduler``
    builds it (sched 'cosine', t_initial = epochs, warmup_t = warmup_epochs, warmup_lr_init = warmup_lr,
    lr_min = min_lr, warmup_prefix False, one cycle; DeiT drops the cooldown epochs ``create_scheduler`` returns),
    constant within an epoch, ``lr_scheduler.step(epoch)`` after it. The scheduler's value at t is
    warmup_lr + t (peak - warmup_lr) / warmup_t while t < warmup_t, then min_lr + (peak - min_lr)(1 + cos(pi t /
    t_initial)) / 2: the cosine runs over t / epochs from t = 0 and the warmup replaces its first epochs. The
    constructor sets warmup_lr (the peak when there is no warmup) and step(e) sets the value for t = e, so epoch
    e trains at t = max(e - 1, 0): epochs 0 and 1 both at warmup_lr, the last one at t = epochs - 2.

    ``steps_per_epoch`` k > 1 steps the scheduler k times per epoch over epochs x k steps (warmup_epochs x k of
    warmup): the same function of training progress with the steps k times finer. A profile that compresses
    DeiT's epochs uses it so that its run keeps DeiT's number of scheduler steps (``evals.e2e.e2e_recipe``)."""
    total = epochs * steps_per_epoch
    warm = round(warmup_epochs * steps_per_epoch, 9)  # 5 x (10/300) x 30 is 5.000000000000001
    step = np.arange(epochs * iters_per_epoch) * steps_per_epoch // iters_per_epoch  # scheduler step of an iteration
    t = np.maximum(step - 1, 0).astype(np.float64)  # the value step(t) set at the end of the previous step
    cosine = min_lr + 0.5 * (peak - min_lr) * (1.0 + np.cos(np.pi * t / total))
    if warm <= 0:
        return cosine
    return np.where(t < warm, warmup_lr + t * (peak - warmup_lr) / warm, cosine)


def deit_init_(model: nn.Module) -> nn.Module:
    """DeiT's initialisation of a ViT (timm 0.3.2's ``VisionTransformer``, which DeiT 0282d2a builds): learned
    position embedding and [CLS] trunc-normal(0.02), every Linear (the classifier head included) trunc-normal(0.02)
    with zero bias, LayerNorms weight 1 bias 0, the patch projection PyTorch's default conv init (kaiming-uniform
    a=sqrt(5), i.e. U(+-1/sqrt(fan_in)) for weight and bias). In place; returns the model."""
    if model.pos_embed is not None:
        trunc_normal_(model.pos_embed, std=0.02)
    if model.cls_token is not None:
        trunc_normal_(model.cls_token, std=0.02)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    proj = model.patch_embed.proj
    weight = torch.empty(proj.weight.shape)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(weight[0].numel())
    with torch.no_grad():
        if parametrize.is_parametrized(proj, "weight"):
            proj.weight = weight  # WeightNorm (study 13): g and v through the parametrization's right inverse
        else:
            proj.weight.copy_(weight)
        proj.bias.uniform_(-bound, bound)
    return model


def build_classifier(cfg: RunConfig, num_classes: int, drop_path: float, backbone_state: dict | None) -> nn.Module:
    """The row's ViT with a linear head, as DeiT builds it: the model initialised as DeiT's (``deit_init_``), then
    the pretrained weights loaded when given (the head is the only missing key, as ``convert_to_deit.py`` +
    ``strict=False``), so the head keeps DeiT's trunc-normal(0.02) and a row from scratch is DeiT's from-scratch
    model (learned position embedding, not the MoCo init or the sin-cos table). Everything is trainable, as in DeiT."""
    model = deit_init_(build_vit(cfg, num_classes=num_classes, drop_path_rate=drop_path))
    if backbone_state is not None:
        state = {k: v for k, v in backbone_state.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise RuntimeError(f"backbone state does not fit the model: missing {missing}, unexpected {unexpected}")
    for p in model.parameters():
        p.requires_grad = True
    return model


def train_classifier(model: nn.Module, recipe: FinetuneRecipe, cfg: RunConfig, train, num_classes: int,
                     device: torch.device, progress: bool = True, desc: str = "finetune",
                     ckpt_path: Path | None = None) -> nn.Module:
    """Train ``model`` on ``train`` (a TensorSplit or a DataLoader of (image, label)) with ``recipe``.

    ``ckpt_path``: model, optimizer and RNG states saved there at the end of every epoch, resumed from
    automatically (a file for other starting weights, recipe or data is moved aside), deleted when done."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2

    if isinstance(train, TensorSplit):
        train = train.fixed_subset(recipe.train_subset)  # fixed across seeds and rows, like pretraining
        batches = TensorEpochs(train, recipe, cfg, device)
        epoch_iter = batches.epoch
        batch = batches.batch
    else:
        batches, batch = train, recipe.batch

        def epoch_iter(epoch):
            if hasattr(train, "set_epoch"):  # shuffle and augmentation from the epoch index (evals/loaders.py)
                train.set_epoch(epoch)
            return iter(train)
    ipe = len(batches)
    if ipe == 0:
        raise ValueError(f"fine-tuning batch {batch} exceeds the training set")
    peak = recipe.base_lr * batch / 512
    lrs = deit_lr_schedule(peak, recipe.min_lr, recipe.warmup_lr, recipe.epochs, recipe.warmup_epochs, ipe,
                           recipe.lr_steps_per_epoch)

    model.to(device).train()
    optimizer = create_optimizer_v2(model, opt="adamw", lr=peak, weight_decay=recipe.wd)
    tag = fingerprint(recipe=asdict(recipe), config=config_fingerprint(cfg), start=state_digest(model),
                      num_classes=num_classes, images=len(train) if isinstance(train, TensorSplit) else len(train.dataset))
    start, step = 0, 0
    state = load_state(ckpt_path, tag)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, step = state["epoch"], state["step"]
    ddp = nn.parallel.DistributedDataParallel(model) if D.is_dist() and not isinstance(train, TensorSplit) else model
    mixup = None
    if recipe.mixup > 0 or recipe.cutmix > 0:
        mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.label_smoothing,
                      num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    use_amp = device.type == "cuda"
    bar = progress_bar(total=recipe.epochs * ipe, initial=step, desc=desc, enabled=progress)
    for epoch in range(start, recipe.epochs):
        for x, y in epoch_iter(epoch):
            if step >= len(lrs):
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = float(lrs[step])
            if mixup is not None:
                x, y = mixup(x, y)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = criterion(ddp(x), y)
            if not math.isfinite(loss.item()):
                raise FinetuneDiverged(f"{desc}: loss is {loss.item()} at iteration {step}", step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if ckpt_path is not None and epoch + 1 < recipe.epochs:
            save_state(ckpt_path, tag, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "epoch": epoch + 1, "step": step})
    bar.close()
    remove_state(ckpt_path)
    return model


@torch.no_grad()
def top1_accuracy(model: nn.Module, test, cfg: RunConfig, device: torch.device, batch_size: int = 1024) -> float:
    """Top-1 (%) on a TensorSplit (normalised with the pretraining data's statistics) or a DataLoader."""
    model.eval()
    correct = torch.zeros((), device=device)
    total = torch.zeros((), device=device)
    use_amp = device.type == "cuda"
    if isinstance(test, TensorSplit):
        mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in channel_stats(cfg.dataset, cfg.image_size))
        batches = ((test.images[i: i + batch_size], test.labels[i: i + batch_size])
                   for i in range(0, len(test), batch_size))
    else:
        mean, std, batches = 0.0, 1.0, test
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model((x - mean) / std)
        correct += (logits.argmax(1) == y).sum()
        total += len(y)
    if D.is_dist() and not isinstance(test, TensorSplit):
        correct, total = D.all_reduce_mean(correct), D.all_reduce_mean(total)
    return 100.0 * (correct / total.clamp(min=1)).item()


def finetune(backbone_state: dict | None, cfg: RunConfig, recipe: FinetuneRecipe, train, test,
             num_classes: int | None = None, device: torch.device | None = None, progress: bool = True,
             desc: str = "finetune", ckpt_path: Path | None = None) -> float:
    """Fine-tune end to end from ``backbone_state`` (None = random init) and return top-1 test accuracy (%).

    ``train``/``test``: TensorSplits (reduced / smoke) or DataLoaders (paper; see ``evals/loaders.py``).
    ``num_classes`` defaults to the largest label in a TensorSplit + 1. ``ckpt_path``: see ``train_classifier``.
    """
    device = device or D.init_from_env()
    if num_classes is None:
        if not isinstance(train, TensorSplit):
            raise ValueError("num_classes is required with DataLoaders")
        num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    seed_everything(cfg.seed)  # the head's init and Mixup's draws (numpy) repeat across runs
    model = build_classifier(cfg, num_classes, recipe.drop_path, backbone_state)
    train_classifier(model, recipe, cfg, train, num_classes, device, progress, desc, ckpt_path)
    return top1_accuracy(model, test, cfg, device)

