"""Datasets: in-memory tensors for the small ones (Fashion-MNIST, digits), ImageFolder/torchvision for the rest.

Small datasets are held as one float tensor in [0, 1] of shape (N, C, H, W): the batched augmentations in
``augment.py`` then run on whole batches, so the data pipeline never bottlenecks a CPU or GPU step.
"""
from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.datasets import FashionMNIST
from torchvision.datasets.folder import IMG_EXTENSIONS

from replicate.core import datapaths
from replicate.core.datapaths import FMNIST_FILES, find_idx

DEBIAN_FASHION_MNIST = datapaths.DEBIAN_FASHION_MNIST  # a module global: tests point it elsewhere


class DataError(RuntimeError):
    """A dataset is missing or malformed; the message says where it looked and how to fix it."""


@dataclass
class TensorSplit:
    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor | np.ndarray) -> "TensorSplit":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TensorSplit(self.images[idx], self.labels[idx])

    def fixed_order(self) -> torch.Tensor:
        """One fixed permutation of the split: ``fixed_subset`` takes its head, the held-out monitor set its tail."""
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(1234))

    def fixed_subset(self, n: int | None) -> "TensorSplit":
        """The first ``n`` of a fixed permutation: the same images for every row, seed and evaluator."""
        if not n or n >= len(self):
            return self
        return self.subset(self.fixed_order()[:n])

    def without_classes(self, classes) -> "TensorSplit":
        if not classes:
            return self
        keep = ~torch.isin(self.labels, torch.as_tensor(list(classes)))
        return TensorSplit(self.images[keep], self.labels[keep])

    def only_classes(self, classes) -> "TensorSplit":
        """Keep ``classes`` and relabel them 0..len-1 in the given order."""
        classes = list(classes)
        keep = torch.isin(self.labels, torch.as_tensor(classes))
        remap = torch.full((int(self.labels.max()) + 1,), -1, dtype=torch.long)
        remap[torch.as_tensor(classes)] = torch.arange(len(classes))
        return TensorSplit(self.images[keep], remap[self.labels[keep]])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e}); delete it and fetch the dataset again") from None
    if len(data) < 8 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number); delete it and fetch the dataset again")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({body.size} of {int(np.prod(dims))} values)")
    return body.reshape(dims)


def fashion_mnist_dirs(data_root: str | None) -> list[Path]:
    """``datapaths.fashion_mnist_dirs`` (the list nox checks too), with this module's Debian folder."""
    return datapaths.fashion_mnist_dirs(data_root, DEBIAN_FASHION_MNIST)


def load_fashion_mnist(data_root: str | None, split: str) -> TensorSplit:
    """Fashion-MNIST from ``data_root`` (raw idx files or torchvision's layout), Debian's package, or a download."""
    if data_root and not Path(data_root).is_dir():
        raise DataError(f"--data-root {data_root}: no such folder (it should hold the Fashion-MNIST idx files, "
                        "or be an existing folder to download them into)")
    dirs = fashion_mnist_dirs(data_root)
    img_stem, lbl_stem = FMNIST_FILES[split]
    img, lbl = find_idx(dirs, img_stem), find_idx(dirs, lbl_stem)
    if img is None or lbl is None:
        root = datapaths.download_root(data_root)
        _download_fashion_mnist(root, dirs)
        return load_fashion_mnist(str(root), split)
    x = torch.from_numpy(_read_idx(img).copy()).float().div_(255).unsqueeze(1)
    y = torch.from_numpy(_read_idx(lbl).astype(np.int64))
    if len(x) != len(y):
        raise DataError(f"{img}: {len(x)} images but {lbl}: {len(y)} labels")
    return TensorSplit(x, y)


def _download_fashion_mnist(root: Path, looked: list[Path]) -> None:
    """torchvision's download into a scratch folder, moved under ``root`` only once complete: a failed download
    leaves no half-made folders behind."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            for train in (True, False):
                FashionMNIST(scratch, train=train, download=True)
        except Exception as e:  # noqa: BLE001 - any download failure becomes the same actionable message
            raise DataError(
                f"Fashion-MNIST not found (looked in {', '.join(map(str, looked))}) and the download failed "
                f"({type(e).__name__}). Fix: {datapaths.FIX}, or run once online so torchvision can download it."
            ) from None
        raw = root / "FashionMNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for f in (Path(scratch) / "FashionMNIST" / "raw").iterdir():
            shutil.move(str(f), str(raw / f.name))


def load_digits_split(split: str, image_size: int = 16, seed: int = 0) -> TensorSplit:
    """scikit-learn's bundled 8x8 digits (1797 images), upscaled; a fixed stratified 1/3 test split."""
    # imported here on purpose: scikit-learn takes ~1.3 s to import (measured beside a training job on the 2-core VM,
    # `python -X importtime`), and only the smoke profile's digits need it
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = train_test_split(np.arange(len(y)), test_size=1 / 3, random_state=seed, stratify=d.target)
    return TensorSplit(x, y).subset(tr if split == "train" else te)


# Translated Fashion-MNIST: each 28x28 image at a seeded random offset on a larger black canvas (the reduced
# profile's data, docs/reduced-scale.md). Aligned Fashion-MNIST is nearly separable from raw pixels; at random
# offsets it is not (as ImageNet is not), while features invariant to the crops keep what the aligned images give.
TRANSLATED = "fashion_mnist_translated"
FMNIST_SIZE = 28
TRANSLATION_SEED = 2021  # the offsets are data, not a run's randomness: one fixed seed for every row and run
SPLIT_IDS = {"train": 0, "test": 1}


def translate(split: TensorSplit, canvas: int, key: tuple[int, ...]) -> TensorSplit:
    """Every image of ``split`` pasted on a ``canvas`` x ``canvas`` zero background at an offset drawn uniformly
    from every position that keeps it whole. Image i's offset is row i of one generator seeded by ``key``: a pure
    function of (key, i), the same on every machine and in every process."""
    n, c, h, w = split.images.shape
    if canvas < max(h, w):
        raise DataError(f"a {canvas}x{canvas} canvas cannot hold {h}x{w} images")
    off = np.random.default_rng(list(key)).integers(0, canvas - max(h, w) + 1, size=(n, 2))
    out = torch.zeros(n, c, canvas, canvas)
    for i, (dy, dx) in enumerate(off.tolist()):
        out[i, :, dy:dy + h, dx:dx + w] = split.images[i]
    return TensorSplit(out, split.labels)


def load_tensor_dataset(name: str, split: str, data_root: str | None, image_size: int) -> TensorSplit:
    if name == TRANSLATED:  # image_size is the canvas
        return translate(load_fashion_mnist(data_root, split), image_size, (TRANSLATION_SEED, SPLIT_IDS[split]))
    if name == "fashion_mnist":
        ds = load_fashion_mnist(data_root, split)
        if ds.images.shape[-1] != image_size:
            ds = TensorSplit(F.interpolate(ds.images, size=(image_size, image_size), mode="bilinear",
                                           align_corners=False).clamp_(0, 1), ds.labels)
        return ds
    if name == "digits":
        return load_digits_split(split, image_size)
    raise DataError(f"dataset {name!r} is not an in-memory dataset (use the ImageFolder path)")


def pretraining_split(cfg, data_root: str | None) -> TensorSplit:
    """A run's pretraining images (held-out classes removed, the fixed subset) with their labels; the evaluators
    use the same images as the kNN bank / probe training set."""
    train = load_tensor_dataset(cfg.dataset, "train", data_root, cfg.image_size).without_classes(cfg.exclude_classes)
    return train.fixed_subset(cfg.train_subset)


def monitor_splits(cfg, data_root: str | None) -> tuple[TensorSplit, TensorSplit]:
    """The held-out kNN monitor's fixed images: a bank of ``cfg.monitor_bank`` pretraining images and a probe of
    ``cfg.monitor_probe`` images the run never trains on (training images outside the pretraining subset, or test
    images where the subset is the whole training split). The same for every row and seed."""
    full = load_tensor_dataset(cfg.dataset, "train", data_root, cfg.image_size).without_classes(cfg.exclude_classes)
    order = full.fixed_order()
    used = cfg.train_subset if cfg.train_subset and cfg.train_subset < len(full) else len(full)
    bank = full.subset(order[: min(cfg.monitor_bank, used)])
    spare = order[used: used + cfg.monitor_probe]
    if len(spare) >= cfg.monitor_probe:
        probe = full.subset(spare)
    else:
        test = load_tensor_dataset(cfg.dataset, "test", data_root, cfg.image_size).without_classes(cfg.exclude_classes)
        probe = test.subset(test.fixed_order()[: cfg.monitor_probe])
    return bank, probe


def is_tensor_dataset(name: str) -> bool:
    return name in ("fashion_mnist", TRANSLATED, "digits")


FMNIST_STATS = (0.2860, 0.3530)  # Fashion-MNIST's training-set mean and standard deviation


def channel_stats(name: str, image_size: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation constants: ImageNet's for RGB data, the train-set statistics for the grayscale sets. On the
    translated canvas (``image_size``) the zero background dilutes Fashion-MNIST's moments by the area ratio."""
    if name == TRANSLATED:
        mean, std = FMNIST_STATS
        area = FMNIST_SIZE ** 2 / image_size ** 2
        second = (std ** 2 + mean ** 2) * area
        return (mean * area,), ((second - (mean * area) ** 2) ** 0.5,)
    return {
        "fashion_mnist": ((FMNIST_STATS[0],), (FMNIST_STATS[1],)),
        "digits": ((0.30,), (0.40,)),
    }.get(name, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))


def imagenet_folder(data_root: str | None, split: str):
    """ImageNet in ImageFolder layout: DATA_ROOT/{train,val}/<wnid>/*.JPEG."""
    if not data_root:
        raise DataError("the paper profiles need ImageFolder data: pass --data-root DIR with DIR/train and DIR/val "
                        "in ImageFolder layout, one folder per class (paper: ImageNet; paper-smoke: "
                        "`python -m tools.synthetic DIR` writes one)")
    path = Path(data_root) / split
    if not path.is_dir():
        raise DataError(f"{path}: no such folder; --data-root must hold train/ and val/ in ImageFolder layout")
    return path


def count_folder_images(path: Path, at_most: int) -> int:
    """The images torchvision's ImageFolder would find under ``path`` (class folders, its extensions), counting
    stops at ``at_most``: enough to tell whether a batch fits without listing 1.28M files first."""
    n = 0
    for class_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        for _, _, files in os.walk(class_dir, followlinks=True):
            n += sum(f.lower().endswith(IMG_EXTENSIONS) for f in files)
            if n >= at_most:
                return at_most
    return n
