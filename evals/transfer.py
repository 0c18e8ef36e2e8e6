"""Transfer targets (study 11, paper Table 6): which images each target is and which classes pretraining leaves out.

Targets: at paper scale CIFAR-10/100, Flowers-102 and Pets with the official per-dataset recipes
(``evals.finetune.PAPER_TRANSFER_RECIPES``, loaded by ``evals.loaders.transfer_loaders``), pretraining on ImageNet.
At smaller scales the pretraining data loses classes 5-9 so that transfer means new classes: reduced pretrains on
Fashion-MNIST 0-4 and transfers to scikit-learn digits (another domain) and to Fashion-MNIST 5-9 (same domain, unseen
classes); smoke pretrains on digits 0-4 and transfers to digits 5-9 and to all ten digits. The row runner (the three
initialisations, fine-tuning on each target) is ``replicate.study.transfer_row``.
"""
from __future__ import annotations

from replicate.core.config import RunConfig
from replicate.core.data import (
    FMNIST_SIZE,
    SPLIT_IDS,
    TRANSLATED,
    TRANSLATION_SEED,
    TensorSplit,
    is_tensor_dataset,
    load_digits_split,
    load_tensor_dataset,
    translate,
)

HELD_OUT_CLASSES = (5, 6, 7, 8, 9)  # kept out of pretraining at reduced/smoke scale


def pretraining_config(cfg: RunConfig) -> RunConfig:
    """The pretraining run of a transfer row: the profile's dataset minus the held-out classes (small scales)."""
    if is_tensor_dataset(cfg.dataset):
        return cfg.model_copy(update={"exclude_classes": HELD_OUT_CLASSES})
    return cfg


def load_target(name: str, cfg: RunConfig, data_root: str | None) -> tuple[TensorSplit, TensorSplit]:
    """(train, test) of an in-memory transfer target at the profile's image size, labels 0..K-1."""
    size = cfg.image_size
    if name == "digits" and cfg.dataset == TRANSLATED:
        # the digits drawn like the pretraining images: upscaled to Fashion-MNIST's 28 px, at seeded offsets
        return tuple(translate(load_digits_split(s, FMNIST_SIZE), size, (TRANSLATION_SEED, 2, SPLIT_IDS[s]))
                     for s in ("train", "test"))
    if name == "digits":
        return load_digits_split("train", size), load_digits_split("test", size)
    if name == "digits_disjoint":
        return tuple(load_digits_split(s, size).only_classes(HELD_OUT_CLASSES) for s in ("train", "test"))
    if name == "fmnist_disjoint":  # the held-out classes of the pretraining data (aligned or translated)
        dataset = cfg.dataset if cfg.dataset == TRANSLATED else "fashion_mnist"
        return tuple(load_tensor_dataset(dataset, s, data_root, size).only_classes(HELD_OUT_CLASSES)
                     for s in ("train", "test"))
    raise ValueError(f"unknown in-memory transfer target {name!r} (known: digits, digits_disjoint, fmnist_disjoint)")


