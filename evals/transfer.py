"""Study 11 (paper Table 6): fine-tune a backbone end to end on other datasets, for three initialisations.

``cfg.setting.init``:
- ``random``: the ViT from random initialisation, fine-tuned directly.
- ``supervised``: the same ViT first trained with labels (cross-entropy) on the pretraining data, then fine-tuned.
  At paper scale that is DeiT-B on ImageNet (DeiT recipe, ``cfg.epochs`` epochs; the paper copies these numbers
  from ViT). At reduced/smoke scale it is the small fine-tuning recipe run on the pretraining data for the same
  number of epochs and the same batch as the MoCo row (one forward/backward per image instead of MoCo's two
  views and momentum encoder, so it takes about a third of the MoCo row's pretraining time).
- ``pretrained``: MoCo v3 pretraining (``replicate.trainer.pretrain``), then fine-tuning.

Targets: at paper scale CIFAR-10/100, Flowers-102 and Pets with the official per-dataset recipes, pretraining on
ImageNet. At smaller scales the pretraining data loses classes 5-9 so that transfer means new classes:
reduced pretrains on Fashion-MNIST 0-4 and transfers to scikit-learn digits (another domain) and to Fashion-MNIST
5-9 (same domain, unseen classes); smoke pretrains on digits 0-4 and transfers to digits 5-9 and to all ten digits.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from replicate import distributed as D
from replicate.checkpoint import atomic_torch_save, config_fingerprint, load_problem, safe_load
from replicate.config import RunConfig
from replicate.data import (
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
from replicate.profiles import Profile

from .finetune import (
    PAPER_IMAGENET_FINETUNE,
    SMALL_TRANSFER_RECIPES,
    build_classifier,
    finetune,
    train_classifier,
    transfer_recipe,
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
        from .loaders import imagenet_finetune_loaders

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
    from replicate.trainer import pretrain

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
    cache = backbone_cache(ckpt_path)
    if cache is not None and cache.exists():
        try:
            saved = safe_load(cache)
        except Exception as e:  # noqa: BLE001 - a damaged cache is computed again
            saved = None
            if D.is_main():
                print(f"warning: cached backbone {cache} is {load_problem(e)}; computing it again", file=sys.stderr,
                      flush=True)
        if isinstance(saved, dict) and saved.get("fingerprint") == config_fingerprint(cfg):
            return saved["backbone"]
    state = (moco_backbone(cfg, data_root, ckpt_path, progress) if init == "pretrained"
             else supervised_backbone(cfg, data_root, progress))
    if cache is not None and D.is_main():
        atomic_torch_save({"fingerprint": config_fingerprint(cfg), "backbone": state}, cache)
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
            from .loaders import transfer_loaders

            train, test, num_classes = transfer_loaders(target, data_root, recipe, cfg.image_size,
                                                        cfg.num_workers, cfg.seed)
            acc = finetune(state, cfg, recipe, train, test, num_classes, device, progress, f"finetune {target}",
                           ft_ckpt)
        out[target] = round(acc, 2)
    if ckpt_path is not None and D.is_main():
        backbone_cache(ckpt_path).unlink(missing_ok=True)
    return out
