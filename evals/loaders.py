"""DataLoaders for the paper-scale evaluations: ImageNet (linear probe, fine-tuning) and the transfer datasets.

Batch sizes are global, as in the paper; each process loads batch / world_size with a ``DistributedSampler``
(or timm's ``RepeatAugSampler`` for DeiT's repeated augmentation) when running under torchrun.
Transfer datasets come from torchvision: read from a local root, downloaded there when online, and otherwise a
``DataError`` whose one-line message says how to get them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from replicate import distributed as D
from replicate.config import RunConfig
from replicate.data import DataError, imagenet_folder

if TYPE_CHECKING:
    from evals.finetune import FinetuneRecipe

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# name -> (number of classes, torchvision class, train splits, test split, where to get it by hand)
TRANSFER_DATASETS = {
    "cifar10": (10, "CIFAR10", ("train",), "test",
                "cifar-10-batches-py/ (https://www.cs.toronto.edu/~kriz/cifar.html)"),
    "cifar100": (100, "CIFAR100", ("train",), "test",
                 "cifar-100-python/ (https://www.cs.toronto.edu/~kriz/cifar.html)"),
    # the official transfer code trains Flowers on trnid + valid of setid.mat and tests on tstid
    "flowers102": (102, "Flowers102", ("train", "val"), "test",
                   ("flowers-102/ with 102flowers.tgz, imagelabels.mat, setid.mat "
                    "(https://www.robots.ox.ac.uk/~vgg/data/flowers/102/)")),
    "pets": (37, "OxfordIIITPet", ("trainval",), "test",
             "oxford-iiit-pet/ with images.tar.gz, annotations.tar.gz (https://www.robots.ox.ac.uk/~vgg/data/pets/)"),
}


class EpochLoader(DataLoader):
    """A DataLoader that calls ``sampler.set_epoch`` itself at every pass, so loops written for one process
    (e.g. ``linear_probe_paper``) still reshuffle every epoch under a DistributedSampler."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._passes = 0

    def __iter__(self):
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self._passes)
        self._passes += 1
        return super().__iter__()


def local_batch(global_batch: int) -> int:
    if global_batch % D.world_size():
        raise ValueError(f"batch {global_batch} is not divisible by world size {D.world_size()}")
    return global_batch // D.world_size()


def make_loader(ds: Dataset, global_batch: int, train: bool, num_workers: int, repeated_aug: bool = False,
                seed: int = 0) -> EpochLoader:
    """Train loaders shuffle and drop the last partial batch (Mixup needs even, equal batches); eval loaders
    keep every image in order."""
    sampler = None
    if repeated_aug and train:
        from timm.data.distributed_sampler import RepeatAugSampler

        sampler = RepeatAugSampler(ds, num_replicas=D.world_size(), rank=D.rank(), shuffle=True)
    elif D.is_dist():
        sampler = torch.utils.data.DistributedSampler(ds, shuffle=train, seed=seed, drop_last=train)
    generator = torch.Generator().manual_seed(seed)
    return EpochLoader(ds, batch_size=local_batch(global_batch), shuffle=train and sampler is None,
                       sampler=sampler, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                       drop_last=train, persistent_workers=num_workers > 0, generator=generator)


def imagenet_linear_loaders(cfg: RunConfig, data_root: str | None) -> tuple[EpochLoader, EpochLoader]:
    """The official ``main_lincls.py`` data: RandomResizedCrop(224) + flip / Resize(256) + CenterCrop(224)."""
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    from replicate.augment import eval_pil_transform

    train_tf = T.Compose([T.RandomResizedCrop(cfg.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    train = ImageFolder(str(imagenet_folder(data_root, "train")), transform=train_tf)
    val = ImageFolder(str(imagenet_folder(data_root, "val")), transform=eval_pil_transform(cfg.image_size))
    return (make_loader(train, cfg.linear_batch, True, cfg.num_workers, seed=cfg.seed),
            make_loader(val, cfg.linear_batch, False, cfg.num_workers))


def finetune_transforms(recipe: FinetuneRecipe, image_size: int):
    """(train, test) PIL transforms. With ``recipe.rand_augment`` set: DeiT's ``build_transform`` through timm
    (RandAugment, bicubic, random erasing ``reprob``). Without: the official MoCo v3 ``transfer/datasets.py``,
    RandomResizedCrop(scale=recipe.crop_scale) + flip only, so ``reprob`` has no effect there, as in that code."""
    from timm.data import create_transform
    from torchvision import transforms as T

    if recipe.rand_augment:
        train = create_transform(image_size, is_training=True, scale=recipe.crop_scale, color_jitter=0.3,
                                 auto_augment=recipe.rand_augment, interpolation="bicubic",
                                 re_prob=recipe.reprob, re_mode="pixel", re_count=1)
        test = create_transform(image_size, is_training=False, interpolation="bicubic", crop_pct=224 / 256)
        return train, test
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.RandomResizedCrop((image_size, image_size), scale=recipe.crop_scale),
                       T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    test = T.Compose([T.Resize(int(256 / 224 * image_size)), T.CenterCrop(image_size), T.ToTensor(), normalize])
    return train, test


def imagenet_finetune_loaders(cfg: RunConfig, recipe: FinetuneRecipe, data_root: str | None):
    from torchvision.datasets import ImageFolder

    train_tf, test_tf = finetune_transforms(recipe, cfg.image_size)
    train = ImageFolder(str(imagenet_folder(data_root, "train")), transform=train_tf)
    val = ImageFolder(str(imagenet_folder(data_root, "val")), transform=test_tf)
    return (make_loader(train, recipe.batch, True, cfg.num_workers, recipe.repeated_aug, cfg.seed),
            make_loader(val, recipe.batch, False, cfg.num_workers))


def transfer_root(data_root: str | None) -> Path:
    """Where the torchvision transfer datasets live: --data-root, else $REPLICATE_DATA, else ./data."""
    return Path(data_root or os.environ.get("REPLICATE_DATA", "data"))


def _open_split(name: str, root: Path, split: str, transform, download: bool):
    import torchvision.datasets as tvd

    _, cls_name, *_ = TRANSFER_DATASETS[name]
    cls = getattr(tvd, cls_name)
    args = {"train": split == "train"} if name.startswith("cifar") else {"split": split}
    try:
        return cls(str(root), transform=transform, download=False, **args)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        if not download:
            raise
    return cls(str(root), transform=transform, download=True, **args)


def transfer_datasets(name: str, data_root: str | None, train_transform=None, test_transform=None,
                      download: bool = True) -> tuple[Dataset, Dataset, int]:
    """(train, test, num_classes) of a torchvision transfer dataset, with the official splits."""
    if name not in TRANSFER_DATASETS:
        raise DataError(f"unknown transfer dataset {name!r}; choose one of: {', '.join(TRANSFER_DATASETS)}")
    num_classes, _, train_splits, test_split, how = TRANSFER_DATASETS[name]
    root = transfer_root(data_root)
    try:
        parts = [_open_split(name, root, s, train_transform, download) for s in train_splits]
        test = _open_split(name, root, test_split, test_transform, download)
    except Exception as e:  # noqa: BLE001 - missing files and failed downloads get the same actionable message
        tried = "the download failed" if download else "download is off"
        raise DataError(f"{name} not found under {root} and {tried} ({type(e).__name__}). Fix: run once online "
                        f"(torchvision downloads it there), or pass --data-root DIR holding {how}") from None
    train = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    return train, test, num_classes


def transfer_loaders(name: str, data_root: str | None, recipe: FinetuneRecipe, image_size: int,
                     num_workers: int = 0, seed: int = 0, download: bool = True):
    """(train_loader, test_loader, num_classes) with the recipe's transforms and global batch."""
    train_tf, test_tf = finetune_transforms(recipe, image_size)
    train, test, num_classes = transfer_datasets(name, data_root, train_tf, test_tf, download)
    return (make_loader(train, recipe.batch, True, num_workers, recipe.repeated_aug, seed),
            make_loader(test, recipe.batch, False, num_workers), num_classes)
