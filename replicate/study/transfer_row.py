"""Study 11's rows (paper Table 6): fine-tune a backbone end to end on other datasets, for three initialisations.

``cfg.setting.init``:
- ``random``: the ViT from random initialisation, fine-tuned directly.
- ``supervised``: the same ViT first trained with labels (cross-entropy) on the pretraining data, then fine-tuned.
  At paper scale that is DeiT-B on ImageNet (DeiT recipe, ``cfg.epochs`` epochs; the paper copies these numbers
  from ViT). At reduced/smoke scale it is the small fine-tuning recipe run on the pretraining data for the same
  number of epochs and the same batch as the MoCo row (one forward/backward per image instead of MoCo's two
  views and momentum encoder, so it takes about a third of the MoCo row's pretraining time).
- ``pretrained``: MoCo v3 pretraining (``replicate.runtime.trainer.pretrain``), then fine-tuning.

Targets (``evals.transfer``): CIFAR-10/100, Flowers-102 and Pets at paper scale; at smaller scales the classes
that pretraining leaves out, and another domain.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from evals.finetune import (
    PAPER_IMAGENET_FINETUNE,
    SMALL_TRANSFER_RECIPES,
    build_classifier,
    finetune,
    train_classifier,
    transfer_recipe,
)
from evals.loaders import imagenet_finetune_loaders, transfer_loaders
from evals.transfer import load_target, pretraining_config
from replicate.core import distributed as D
from replicate.core.config import RunConfig
from replicate.core.data import is_tensor_dataset, load_tensor_dataset
from replicate.runtime.checkpoint import WeightsFileError, config_fingerprint, load_weights, save_weights
from replicate.runtime.trainer import pretrain
from replicate.study.profiles import Profile


def supervised_backbone(cfg: RunConfig, data_root: str | None, progress: bool) -> dict:
    """Backbone weights after supervised training on the pretraining data (classification head dropped)."""
    device = D.init_from_env()
    torch.manual_seed(cfg.seed)
    if is_tensor_dataset(cfg.dataset):
        keep = [c for c in range(cfg.num_classes) if c not in cfg.exclude_classes]
        # the same images MoCo v3 pretrains on (same class filter, same fixed subset), with their labels
        train = load_tensor_dataset(cfg.dataset, "train", data_root, cfg.image_size).only_classes(keep)
        train = train.fixed_subset(cfg.train_subset)
        recipe = replace(SMALL_TRANSFER_RECIPES[cfg.profile], epochs=cfg.epochs, batch=cfg.batch_size,
                         warmup_epochs=cfg.warmup_epochs, train_subset=None)
        num_classes = len(keep)
    else:
        recipe = replace(PAPER_IMAGENET_FINETUNE, epochs=cfg.epochs)  # DeiT-B from scratch
        train, _ = imagenet_finetune_loaders(cfg, recipe, data_root)
        num_classes = cfg.num_classes
    model = build_classifier(cfg, num_classes, recipe.drop_path, None)
    train_classifier(model, recipe, cfg, train, num_classes, device, progress, desc="supervised pretrain")
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("head.")}


class PretrainingDiverged(RuntimeError):
    """MoCo v3 pretraining diverged, so there is no backbone to fine-tune; ``at`` is the iteration."""

    def __init__(self, at: int | None):
        super().__init__(f"MoCo v3 pretraining diverged at iteration {at}; nothing to fine-tune")
        self.at = at


def moco_backbone(cfg: RunConfig, data_root: str | None, ckpt_path: Path | None, progress: bool) -> dict:
    result = pretrain(cfg, data_root, ckpt_path, progress)
    if result.status != "ok":
        raise PretrainingDiverged(result.diverged_at)
    return {k: v.detach().cpu() for k, v in result.model.backbone.state_dict().items()}


def backbone_cache(ckpt_path: Path | None) -> Path | None:
    """Where ``initial_backbone`` keeps a row's starting weights until the row is done."""
    return Path(ckpt_path).with_name(Path(ckpt_path).stem + ".backbone.pt") if ckpt_path else None


def initial_backbone(cfg: RunConfig, data_root: str | None, ckpt_path: Path | None, progress: bool) -> dict | None:
    """The row's starting weights, cached beside the checkpoint so a crash while fine-tuning keeps them."""
    init = cfg.setting.init
    if init == "random":
        return None
    cache, tag = backbone_cache(ckpt_path), config_fingerprint(cfg)
    if cache is not None and cache.exists():
        try:
            return load_weights(cache, "backbone", {"backbone"}, tag)["backbone"]
        except WeightsFileError as e:  # damaged, or another config's: computed again
            if D.is_main():
                print(f"warning: cached backbone {cache} is {e}; computing it again", file=sys.stderr, flush=True)
    state = (moco_backbone(cfg, data_root, ckpt_path, progress) if init == "pretrained"
             else supervised_backbone(cfg, data_root, progress))
    if cache is not None and D.is_main():
        save_weights(cache, "backbone", {"backbone": state, "config": cfg.model_dump(mode="json")}, tag)
    return state


def run_transfer_row(cfg: RunConfig, profile: Profile, data_root: str | None, ckpt_path: Path | None = None,
                     progress: bool = True) -> dict[str, float]:
    """{target: top-1 (%)} for each of ``profile.transfer_targets`` after fine-tuning the row's backbone."""
    pcfg = pretraining_config(cfg)
    state = initial_backbone(pcfg, data_root, ckpt_path, progress)
    device = D.init_from_env()
    out: dict[str, float] = {}
    for target in profile.transfer_targets:
        recipe = transfer_recipe(profile.name, target)
        ft_ckpt = Path(ckpt_path).with_suffix(f".{target}.pt") if ckpt_path else None  # resumable fine-tuning
        if is_tensor_dataset(cfg.dataset):
            train, test = load_target(target, cfg, data_root)
            acc = finetune(state, cfg, recipe, train, test, device=device, progress=progress,
                           desc=f"finetune {target}", ckpt_path=ft_ckpt)
        else:
            train, test, num_classes = transfer_loaders(target, data_root, recipe, cfg.image_size,
                                                        cfg.num_workers, cfg.seed)
            acc = finetune(state, cfg, recipe, train, test, num_classes, device, progress, f"finetune {target}",
                           ft_ckpt)
        out[target] = round(acc, 2)
    if ckpt_path is not None and D.is_main():
        backbone_cache(ckpt_path).unlink(missing_ok=True)
    return out
