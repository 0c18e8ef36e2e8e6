"""``python -m replicate show``: the resolved setting of each row at a profile, before any GPU-day is spent."""
from __future__ import annotations

import torch
from tabulate import tabulate

from .model import build_vit, count_parameters
from .runner import resolved_settings
from .spec import Spec

PAPER_PARAMS_M = {"vit_small": 22, "vit_base": 86, "vit_large": 304, "vit_huge": 632}  # Table 2


def backbone_params(cfg) -> int:
    with torch.device("meta"):  # counts without allocating (ViT-H is 632M parameters)
        return count_parameters(build_vit(cfg))


def show_table(spec: Spec, profile: str) -> str:
    rows = []
    for row, s, cfg in resolved_settings(spec, profile):
        n = backbone_params(cfg)
        rows.append([row.name, s.framework, f"{cfg.embed_dim}x{cfg.depth}/h{cfg.num_heads}/p{cfg.patch_size}"
                     + ("-BN" if s.norm_mlp == "bn" else ""), f"{n / 1e6:.1f}M", s.pos_embed, s.pooling,
                     s.patch_proj, "y" if s.head_bn else "n", "y" if s.predictor else "n",
                     f"{s.momentum}{'+cos' if s.momentum_schedule == 'cosine' else ''}", s.optimizer,
                     cfg.batch_size, f"{cfg.lr:.3g}", cfg.weight_decay, cfg.epochs, f"{cfg.warmup_epochs:g}",
                     s.temperature, cfg.dataset])
    head = ["row", "framework", "backbone", "params", "pos", "pool", "patch proj", "head BN", "pred", "m",
            "optim", "batch", "lr", "wd", "epochs", "warmup", "tau", "data"]
    title = f"{spec.name}: {spec.title} ({spec.paper_ref}) at profile '{profile}'"
    return title + "\n" + tabulate(rows, head, tablefmt="github")
