"""Where Fashion-MNIST is looked for: the one list ``replicate.core.data`` reads from and ``noxfile.py`` checks before
building any environment. Standard library only (nox imports this file on its own, without torch or the package).
"""
from __future__ import annotations

import os
from pathlib import Path

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist package
DATA_ENV = "REPLICATE_DATA"  # where a torchvision download goes without --data-root (default ./data)
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# the profiles whose data is Fashion-MNIST (tests/test_data.py pins this to replicate.study.profiles)
FASHION_MNIST_PROFILES = ("reduced", "reduced-aligned")
FIX = ("`sudo apt-get install dataset-fashion-mnist` (Debian, Ubuntu), or pass --data-root DIR holding the four "
       "Fashion-MNIST idx files")


def download_root(data_root: str | None = None) -> Path:
    """Where torchvision downloads Fashion-MNIST to (``DIR/FashionMNIST/raw``): --data-root, else $REPLICATE_DATA,
    else ./data."""
    return Path(data_root or os.environ.get(DATA_ENV) or "data")


def fashion_mnist_dirs(data_root: str | None, debian: Path = DEBIAN_FASHION_MNIST) -> list[Path]:
    """The folders searched, in order: --data-root (the idx files, or torchvision's FashionMNIST/raw layout, or a
    fashion-mnist/ folder), Debian's package, and without --data-root the download folder of an earlier run."""
    dirs = []
    if data_root:
        r = Path(data_root)
        dirs += [r, r / "FashionMNIST" / "raw", r / "fashion-mnist"]
    dirs.append(Path(debian))
    if not data_root:
        dirs.append(download_root() / "FashionMNIST" / "raw")
    return dirs


def find_idx(dirs: list[Path], stem: str) -> Path | None:
    """The first ``stem`` or ``stem.gz`` in ``dirs``."""
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def missing_fashion_mnist(data_root: str | None, debian: Path = DEBIAN_FASHION_MNIST) -> list[str]:
    """The idx files found nowhere in ``fashion_mnist_dirs`` (empty: all four are there)."""
    dirs = fashion_mnist_dirs(data_root, debian)
    return [stem for pair in FMNIST_FILES.values() for stem in pair if find_idx(dirs, stem) is None]
