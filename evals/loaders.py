"""DataLoaders for the paper-scale evaluations: ImageNet (linear probe, fine-tuning) and the transfer datasets.

Batch sizes are global, as in the paper; under torchrun each process loads batch / world_size images of every
global batch (``ShardSampler``, or timm's ``RepeatAugSampler`` for DeiT's repeated augmentation).
Transfer datasets come from torchvision: read from a local root, downloaded there when online, and otherwise a
``DataError`` whose one-line message says how to get them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from replicate.core import distributed as D
from replicate.core.config import RunConfig
from replicate.core.data import DataError, imagenet_folder
from replicate.core.seeding import epoch_seed

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


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return epoch_seed(seed, epoch) * 1009 + rank


class ShardSampler(Sampler[int]):
    """This process's share of every global batch; over all processes, each index exactly once per epoch.

    The epoch's order (a permutation seeded by (seed, epoch) when shuffling, else 0..n-1) is cut into global batches
    of ``global_batch``, and process r of W takes the r-th of W near-equal slices of each. So the global batches are
    the same at any W, and nothing is padded or duplicated (torch's ``DistributedSampler`` pads to equal shares): the
    last, partial global batch is split too, and with fewer images than processes some get none of it.
    ``drop_last`` leaves the partial batch out instead."""

    def __init__(self, n: int, global_batch: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 rank: int | None = None, world: int | None = None):
        self.n, self.global_batch, self.shuffle, self.seed, self.drop_last = n, global_batch, shuffle, seed, drop_last
        self.rank = D.rank() if rank is None else rank
        self.world = D.world_size() if world is None else world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch_sizes(self) -> list[int]:
        """The size of each global batch of an epoch, over all processes."""
        full, rest = divmod(self.n, self.global_batch)
        return [self.global_batch] * full + ([rest] if rest and not self.drop_last else [])

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch)))
        else:
            order = torch.arange(self.n)
        for start, size in zip(range(0, self.n, self.global_batch), self.batch_sizes()):
            yield from order[start: start + size].tensor_split(self.world)[self.rank].tolist()

    def __len__(self) -> int:
        return sum(size // self.world + (self.rank < size % self.world) for size in self.batch_sizes())


class EpochLoader(DataLoader):
    """A DataLoader whose epoch ``e`` depends on (seed, e, rank) alone: ``set_epoch(e)`` sets the sampler's epoch
    (the shuffle) and reseeds the generator the workers' seeds come from (the augmentation), so a resumed run
    draws what an uninterrupted one would. Hence no persistent workers: they would carry their random state over
    from one epoch to the next (restarting them costs a second or two per epoch)."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed(_epoch_seed(self.seed, epoch, D.rank()))


def local_batch(global_batch: int) -> int:
    if global_batch % D.world_size():
        raise ValueError(f"batch {global_batch} is not divisible by world size {D.world_size()}")
    return global_batch // D.world_size()


def make_loader(ds: Dataset, global_batch: int, train: bool, num_workers: int, repeated_aug: bool = False,
                seed: int = 0, drop_last: bool = False) -> EpochLoader:
    """Global batches of ``global_batch`` images, each process loading its share (``ShardSampler``; timm's
    ``RepeatAugSampler`` for DeiT's repeated augmentation). Train loaders shuffle; eval loaders keep every image
    once, in order. ``drop_last``: fine-tuning drops the partial last batch (Mixup needs even, equal batches); the
    linear probe keeps it, as ``main_lincls.py``."""
    if repeated_aug and train:
        from timm.data.distributed_sampler import RepeatAugSampler

        sampler = RepeatAugSampler(ds, num_replicas=D.world_size(), rank=D.rank(), shuffle=True)
    else:
        sampler = ShardSampler(len(ds), global_batch, shuffle=train, seed=seed, drop_last=drop_last)
    return EpochLoader(ds, batch_size=local_batch(global_batch), sampler=sampler, num_workers=num_workers,
                       pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                       generator=torch.Generator().manual_seed(seed), seed=seed)


def imagenet_linear_loaders(cfg: RunConfig, data_root: str | None) -> tuple[EpochLoader, EpochLoader]:
    """The official ``main_lincls.py`` data: RandomResizedCrop(224) + flip / Resize(256) + CenterCrop(224)."""
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    from replicate.core.augment import eval_pil_transform

    train_tf = T.Compose([T.RandomResizedCrop(cfg.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    train = ImageFolder(str(imagenet_folder(data_root, "train")), transform=train_tf)
    val = ImageFolder(str(imagenet_folder(data_root, "val")), transform=eval_pil_transform(cfg.image_size))
    return (make_loader(train, cfg.linear_batch, True, cfg.num_workers, seed=cfg.seed),
            make_loader(val, cfg.linear_batch, False, cfg.num_workers))


def imagenet_knn_loaders(cfg: RunConfig, data_root: str | None) -> tuple[EpochLoader, EpochLoader]:
    """DINO's ``eval_knn.py`` data: train and val both with Resize(256) + CenterCrop(224), in dataset order."""
    from torchvision.datasets import ImageFolder

    from replicate.core.augment import eval_pil_transform

    tf = eval_pil_transform(cfg.image_size)
    train = ImageFolder(str(imagenet_folder(data_root, "train")), transform=tf)
    val = ImageFolder(str(imagenet_folder(data_root, "val")), transform=tf)
    return (make_loader(train, cfg.linear_batch, False, cfg.num_workers),
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
        posterize_zero_bits_as_black(train)
        test = create_transform(image_size, is_training=False, interpolation="bicubic", crop_pct=224 / 256)
        return train, test
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = T.Compose([T.RandomResizedCrop((image_size, image_size), scale=recipe.crop_scale),
                       T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    test = T.Compose([T.Resize(int(256 / 224 * image_size)), T.CenterCrop(image_size), T.ToTensor(), normalize])
    return train, test


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, where keeping 0 bits makes the image black, as Pillow did when DeiT ran."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    return Image.new(img.mode, img.size) if bits_to_keep <= 0 else posterize(img, bits_to_keep, **kwargs)


def posterize_zero_bits_as_black(transform) -> None:
    """DeiT's RandAugment (``inc1``) posterizes to 4 - int(4 x magnitude / 10) bits, i.e. 0 bits at magnitude 10,
    which m9 with std 0.5 draws about 2% of the time; recent Pillow (13 here) raises on 0 bits, so an ImageNet epoch
    would crash within seconds, where older Pillow returned a black image. Restores that in ``transform``'s
    RandAugment."""
    from timm.data.auto_augment import posterize

    for step in getattr(transform, "transforms", ()):
        for op in getattr(step, "ops", ()):
            if op.aug_fn is posterize:
                op.aug_fn = _posterize


def imagenet_finetune_loaders(cfg: RunConfig, recipe: FinetuneRecipe, data_root: str | None):
    from torchvision.datasets import ImageFolder

    train_tf, test_tf = finetune_transforms(recipe, cfg.image_size)
    train = ImageFolder(str(imagenet_folder(data_root, "train")), transform=train_tf)
    val = ImageFolder(str(imagenet_folder(data_root, "val")), transform=test_tf)
    return (make_loader(train, recipe.batch, True, cfg.num_workers, recipe.repeated_aug, cfg.seed, drop_last=True),
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
    return (make_loader(train, recipe.batch, True, num_workers, recipe.repeated_aug, seed, drop_last=True),
            make_loader(test, recipe.batch, False, num_workers), num_classes)
