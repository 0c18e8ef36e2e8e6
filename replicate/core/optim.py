"""Optimizers: torch AdamW (the paper's), and LAMB / LARS from ``timm.optim`` (not re-implemented here)."""
from __future__ import annotations

import torch
from timm.optim import Lamb, Lars

from replicate.core.config import RunConfig


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Weight decay on every trainable parameter, as the official ViT config; frozen ones (random patch
    projection, sin-cos table, momentum encoder) are not given to the optimizer at all."""
    params = [p for p in model.parameters() if p.requires_grad]
    name, lr, wd = cfg.setting.optimizer, cfg.lr, cfg.weight_decay
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True)  # one kernel per step (CPU and GPU)
    if name == "lamb":
        return Lamb(params, lr=lr, weight_decay=wd)
    # LARS as the official ResNet config: momentum 0.9, trust coefficient 0.001, no wd/adaptation for 1-d params
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return Lars([{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "trust_clip": False,
                                     "trust_coeff": 0.0}], lr=lr, weight_decay=wd, momentum=0.9, trust_coeff=0.001)
