"""The suite's side of the bench: the trainer's own step (``trainer.train_step``) on synthetic in-memory images."""
from __future__ import annotations

import torch

from replicate.core.config import RunConfig, Setting
from replicate.core.moco import SelfSupervisedViT
from replicate.core.optim import build_optimizer
from replicate.runtime.hostmem import retain_freed_memory
from replicate.runtime.precision import cpu_bf16_matmuls
from replicate.runtime.trainer import make_augment, train_step
from replicate.study.profiles import PAPER, REDUCED

from .measure import time_steps

MOMENTUM = 0.99  # the key encoder's momentum in every timed step (any value costs the same)


def reduced_config(batch: int | None = None, **setting) -> RunConfig:
    cfg = REDUCED.resolve(Setting(**setting))
    return cfg if batch is None else cfg.model_copy(update={"batch_size": batch})


def paper_config(batch: int) -> RunConfig:
    return PAPER.resolve(Setting()).model_copy(update={"batch_size": batch})


class SuiteStep:
    """One iteration of ``trainer.pretrain`` on synthetic in-memory images: views from the trainer's batched
    augmentation, then the trainer's own ``train_step`` (what the loop runs, less the monitor and checkpoints)."""

    def __init__(self, cfg: RunConfig, device: torch.device, compile_backbones: bool = False,
                 amp: bool | None = None, cpu_bf16: bool | None = None):
        retain_freed_memory()  # as trainer.pretrain does
        torch.manual_seed(0)
        self.cfg, self.device = cfg, device
        self.model = SelfSupervisedViT(cfg).to(device).train()
        if compile_backbones:
            self.model.compile_backbones()
        self.optimizer = build_optimizer(cfg, self.model)
        self.augment = make_augment(cfg, compile=compile_backbones)
        pool = min(4 * cfg.batch_size, max(cfg.batch_size, 2048))
        self.images = torch.rand(pool, cfg.in_chans, cfg.image_size, cfg.image_size, device=device)
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.amp = device.type == "cuda" if amp is None else amp  # the trainer's bf16 autocast: GPU only
        self.cpu_bf16 = cpu_bf16  # CPU bf16 matmuls (replicate/runtime/precision.py); None: the trainer's default

    def views(self):
        idx = torch.randint(len(self.images), (self.cfg.batch_size,), generator=self.gen, device=self.device)
        return self.augment(self.images[idx], self.gen)

    def model_step(self, x1: torch.Tensor, x2: torch.Tensor) -> None:
        with cpu_bf16_matmuls(self.model, self.device, self.cpu_bf16):
            train_step(self.model, self.optimizer, x1, x2, MOMENTUM, self.cfg.lr, self.amp, self.device)

    def __call__(self) -> None:
        self.model_step(*self.views())


def suite_throughput(cfg: RunConfig, device: torch.device, warmup: int, steps: int, compile_backbones=False) -> dict:
    """Images/s of ``SuiteStep``: the median of ``steps`` timed steps after ``warmup`` untimed ones."""
    step = SuiteStep(cfg, device, compile_backbones)
    t = time_steps(step, warmup, steps, device)
    return {"batch": cfg.batch_size, "images_per_s": cfg.batch_size / t["step_s"], **t}
