"""Seeding the global random number generators (torch, numpy, python) at the start of a run."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of a run's epoch-``epoch`` data order: one formula for the trainer, the probe and fine-tuning loaders."""
    return seed * 100003 + epoch


def augment_seed(seed: int, n: int) -> int:
    """The seed of the augmentation generator at step (pretraining) or epoch (fine-tuning) ``n`` of a run."""
    return seed * 7919 + n
