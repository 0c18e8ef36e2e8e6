"""A small generated dataset in ImageFolder layout, for the ``paper-smoke`` profile (CI coverage of the paper path).

``write_image_folder(root)`` writes ``root/{train,val}/<class>/*.png``: RGB images whose class sets the colour
(a hue per class) and the texture (stripes at a class-specific angle and frequency); each image gets a random
phase, small random angle and frequency offsets and pixel noise, so classes are learnable but no two images are
equal. The command line does the same: ``python -m tools.synthetic DIR``.
"""
from __future__ import annotations

import argparse
import colorsys
import sys
from pathlib import Path

import numpy as np


def class_image(rng: np.random.Generator, label: int, classes: int, size: int) -> np.ndarray:
    """One (size, size, 3) uint8 image of class ``label``: coloured stripes plus noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    angle = np.pi / 2 * label / max(classes - 1, 1) + rng.normal(0, 0.05)  # 0..90 degrees: a flip keeps classes apart
    freq = 2.5 + 1.5 * (label % 3) + rng.uniform(-0.3, 0.3)  # cycles per image
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    colour = np.array(colorsys.hsv_to_rgb(label / classes, 0.7, 0.9))
    img = 0.15 + 0.75 * wave[..., None] * colour + rng.normal(0, 0.06, (size, size, 3))
    return (img.clip(0, 1) * 255).round().astype(np.uint8)


def write_image_folder(root: str | Path, classes: int = 4, train_per_class: int = 64, val_per_class: int = 16,
                       size: int = 40, seed: int = 0) -> Path:
    """Write ``root/train/<class>/*.png`` and ``root/val/<class>/*.png``; the same files for the same arguments.
    Returns ``root``."""
    from PIL import Image

    if classes < 2 or train_per_class < 1 or val_per_class < 1 or size < 8:
        raise ValueError("need classes >= 2, train_per_class >= 1, val_per_class >= 1 and size >= 8")
    root = Path(root)
    rng = np.random.default_rng(seed)
    width = len(str(classes - 1))  # zero-padded names: ImageFolder sorts class folders alphabetically
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"class{label:0{width}d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(class_image(rng, label, classes, size)).save(folder / f"{i:05d}.png")
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.synthetic",
        description="Write a small generated dataset in ImageFolder layout (DIR/train, DIR/val; one folder per "
                    "class) for the paper-smoke profile: `replicate run table5 --profile paper-smoke --data-root DIR`.")
    p.add_argument("root", metavar="DIR", help="folder to write train/ and val/ into (created if missing)")
    p.add_argument("--classes", type=int, default=4, help="number of classes (paper-smoke expects 4). Default: 4")
    p.add_argument("--train-per-class", type=int, default=64, help="training images per class. Default: 64")
    p.add_argument("--val-per-class", type=int, default=16, help="validation images per class. Default: 16")
    p.add_argument("--size", type=int, default=40, help="image side in pixels (paper-smoke crops 32). Default: 40")
    p.add_argument("--seed", type=int, default=0, help="random seed. Default: 0")
    args = p.parse_args(argv)
    try:
        root = write_image_folder(args.root, args.classes, args.train_per_class, args.val_per_class, args.size,
                                  args.seed)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.classes * args.train_per_class} train and {args.classes * args.val_per_class} val images "
          f"to {root} (ImageFolder layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
