"""``python -m replicate show``: the resolved setting of each row at a profile, before any GPU-day is spent."""
from __future__ import annotations

import torch
from tabulate import tabulate

from replicate.core.moco import MOMENTUM_FRAMEWORKS
from replicate.core.model import build_vit, count_parameters
from replicate.study.finetune_row import e2e_recipe
from replicate.study.profiles import Profile
from replicate.study.runner import resolved_settings
from replicate.study.spec import Spec

PAPER_PARAMS_M = {"vit_small": 22, "vit_base": 86, "vit_large": 304, "vit_huge": 632}  # Table 2


def backbone_params(cfg) -> int:
    with torch.device("meta"):  # counts without allocating (ViT-H is 632M parameters)
        return count_parameters(build_vit(cfg))


def framework_cells(s, cfg) -> dict[str, str]:
    """Predictor, momentum and temperature as the built model uses them: SimCLR and SwAV have no predictor and no
    momentum encoder; SwAV's temperature is its own, shown with its number of prototypes at this scale."""
    has_momentum = s.framework in MOMENTUM_FRAMEWORKS
    return {"pred": "y" if s.predictor and has_momentum else "n",
            "m": f"{s.momentum}{'+cos' if s.momentum_schedule == 'cosine' else ''}" if has_momentum else "-",
            "tau": f"{s.swav_temperature} K{cfg.prototypes}" if s.framework == "swav" else f"{s.temperature}"}


def patch_proj_cell(s) -> str:
    """random / learned, and a learned projection's Sec. 4.2 stabilizer: '+bn', '+wn', '+clip<max norm>'."""
    extras = ([f"+{s.patch_proj_norm}"] if s.patch_proj_norm != "none" else []) + \
        ([f"+clip{s.patch_proj_clip:g}"] if s.patch_proj_clip is not None else [])
    return s.patch_proj + "".join(extras)


def show_table(spec: Spec, profile: Profile) -> str:
    rows = []
    for row, s, cfg in resolved_settings(spec, profile):
        n = backbone_params(cfg)
        fw = framework_cells(s, cfg)
        rows.append([row.name, s.framework, f"{cfg.embed_dim}x{cfg.depth}/h{cfg.num_heads}/p{cfg.patch_size}"
                     + ("-BN" if s.norm_mlp == "bn" else ""), f"{n / 1e6:.1f}M", s.pos_embed, s.pooling,
                     patch_proj_cell(s), "y" if s.head_bn else "n", fw["pred"], fw["m"], s.optimizer,
                     cfg.batch_size, f"{cfg.lr:.3g}", cfg.weight_decay, cfg.epochs, f"{cfg.warmup_epochs:g}",
                     fw["tau"], cfg.dataset])
    head = ["row", "framework", "backbone", "params", "pos", "pool", "patch proj", "head BN", "pred", "m",
            "optim", "batch", "lr", "wd", "epochs", "warmup", "tau", "data"]
    if spec.kind == "finetune":
        rows, head = with_finetune_columns(spec, profile, rows, head)
    title = f"{spec.name}: {spec.title} ({spec.paper_ref}) at profile '{profile.name}'"
    return title + "\n" + tabulate(rows, head, tablefmt="github")


PRETRAIN_ONLY = ("framework", "m", "optim", "batch", "lr", "wd", "epochs", "warmup", "tau")  # column names


def with_finetune_columns(spec: Spec, profile: Profile, rows: list[list], head: list[str]) -> tuple[list[list], list[str]]:
    """A fine-tuning study: where each row starts (pretrained or scratch) and its fine-tuning recipe at this profile
    (``e2e_recipe``); a row from scratch is never pretrained, so its pretraining columns are dashes."""


    blank = {head.index(h) for h in PRETRAIN_ONLY}
    out = []
    for cells, (_, s, _) in zip(rows, resolved_settings(spec, profile)):
        r = e2e_recipe(s, profile)
        scratch = s.init == "random"
        cells = ["—" if scratch and i in blank else c for i, c in enumerate(cells)]
        out.append([*cells, "scratch" if scratch else s.init, r.epochs, f"{r.warmup_epochs:.3g}", r.batch,
                    f"{r.lr:.3g}", r.drop_path, "DeiT" if r.rand_augment else "crop+flip"])
    return out, [*head, "start", "ft epochs", "ft warmup", "ft batch", "ft lr", "drop path", "ft aug"]
