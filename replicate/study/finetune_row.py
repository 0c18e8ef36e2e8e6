"""Study 15 (paper Table 5): end-to-end fine-tuning on the pretraining data's own labels, against training from
scratch.

A row with ``init: pretrained`` is pretrained with its setting (MoCo v3, ``replicate.runtime.trainer.pretrain``) and then
fine-tuned end to end; a row with ``init: random`` trains the same ViT from random initialisation with the same
recipe (DeiT "from scratch"). The starting weights come from ``replicate.study.transfer_row.initial_backbone`` (cached beside
the row's checkpoint, so a crash while fine-tuning keeps the pretraining) or, when another study already finished
the identical pretraining run and kept its backbone, from that file (``reused_pretraining``). Fine-tuning is
``evals.finetune.finetune`` (resumable per epoch).

The recipe (``e2e_recipe``) is the DeiT recipe of Sec. 6.3 (``PAPER_IMAGENET_FINETUNE``) for the row's
``finetune_epochs`` with its ``finetune_drop_path``; a profile scales its epochs and warmup (``epoch_scale``), its
batch (``batch_scale``) and its lr, warmup lr and lr floor (``lr_scale``), as it scales pretraining, and steps
DeiT's per-epoch lr scheduler once per scaled epoch (1 / ``epoch_scale`` times per epoch), so the schedule keeps
DeiT's number of steps and its shape as a function of training progress.
- ImageFolder data (paper, paper-smoke): DeiT's data pipeline (``imagenet_finetune_loaders``: RandAugment,
  Mixup/CutMix, random erasing, repeated augmentation); trained on train/, scored on val/.
- In-memory data (reduced: Fashion-MNIST; smoke: digits): trained on the images pretraining uses (the profile's
  fixed subset, 10k at reduced) with their labels, scored on the test split. As in the paper, where both stages
  see ImageNet-1k train, the pretrained and the scratch rows differ only in their starting weights; the full 60k
  would give fine-tuning 6x the images pretraining saw, at 6x the cost. The ImageNet augmentations are off there
  (``small_base``).
"""
from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from evals.finetune import PAPER_IMAGENET_FINETUNE, FinetuneDiverged, FinetuneRecipe, finetune
from evals.loaders import imagenet_finetune_loaders
from replicate.core import distributed as D
from replicate.core.config import RunConfig, Setting
from replicate.core.data import is_tensor_dataset, load_tensor_dataset, pretraining_split
from replicate.core.model import build_vit
from replicate.runtime.precision import training_precision
from replicate.study.export import read_backbone_file
from replicate.study.profiles import Profile, scaled
from replicate.study.results import ResultsError, ResultStore
from replicate.study.spec import FINETUNE_ONLY
from replicate.study.transfer_row import PretrainingDiverged, backbone_cache, initial_backbone


def small_base(profile: Profile) -> FinetuneRecipe:
    """The DeiT recipe for in-memory data: its optimisation (AdamW, lr x batch/512, wd 0.05, warmup + cosine to a
    floor, label smoothing, drop path) as it is; RandAugment off (its PIL ops are built for RGB photographs and have
    no batched tensor form, ``evals/finetune.py``), Mixup/CutMix, erasing and repeated augmentation off (they
    regularise 300-epoch ImageNet runs and only slow a 5-epoch one, as for the small transfer recipes), crops at the
    profile's pretraining crop scale."""
    return replace(PAPER_IMAGENET_FINETUNE, mixup=0.0, cutmix=0.0, reprob=0.0, rand_augment=None, repeated_aug=False,
                   crop_scale=(profile.crop_min, 1.0))


def e2e_recipe(setting: Setting, profile: Profile) -> FinetuneRecipe:
    """A row's fine-tuning recipe at a profile (at the paper's, the DeiT recipe with the row's epochs and drop path)."""
    base = PAPER_IMAGENET_FINETUNE if not is_tensor_dataset(profile.dataset) else small_base(profile)
    epochs = scaled(setting.finetune_epochs or base.epochs, profile.epoch_scale, 1, "finetune_epochs", profile.name,
                    "epochs")  # a ResolveError, never a silent round up to 1
    batch = max(2, round(base.batch * profile.batch_scale))
    lr_factor = profile.lr_scale * batch / base.batch  # the floor and the warmup lr keep their fractions of the peak
    drop_path = base.drop_path if setting.finetune_drop_path is None else setting.finetune_drop_path
    # DeiT steps its scheduler once per epoch; here once per scaled epoch (at reduced 150 epochs -> 5, 30 steps per
    # epoch): stepped per epoch, a 5-epoch run would spend 2 of its 5 epochs at the warmup lr (deit_lr_schedule)
    steps = max(1, round(1 / profile.epoch_scale))
    return replace(base, epochs=epochs, batch=batch, base_lr=base.base_lr * profile.lr_scale,
                   min_lr=base.min_lr * lr_factor, warmup_lr=base.warmup_lr * lr_factor,
                   warmup_epochs=base.warmup_epochs * profile.epoch_scale, lr_steps_per_epoch=steps,
                   drop_path=drop_path)


def pretraining_run(cfg: RunConfig) -> RunConfig:
    """The row's pretraining run: its config with the fine-tuning-only keys at their defaults, i.e. the config an
    identical pretraining row of another study resolves to."""
    defaults = {k: Setting.model_fields[k].default for k in (*FINETUNE_ONLY, "init")}
    return cfg.model_copy(update={"setting": cfg.setting.model_copy(update=defaults)})


def reused_pretraining(store: ResultStore, pcfg: RunConfig) -> tuple[dict | None, str | None]:
    """(backbone state, "table/row/seedK") of a finished pretraining row with exactly this config that kept its
    backbone file (any study of this profile; on in-memory data it is the same run bit for bit), else (None, None)."""
    found = None
    if D.is_main():
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a twin pretrained as this machine would pretrain
        twin = store.find_same_run(pcfg.model_dump(mode="json"), training_precision(device))
        if twin is not None and twin.get("backbone"):
            path = store.backbone_path(twin["table"], twin["row"], twin["seed"])
            if path.exists():
                found = (str(path), f"{twin['table']}/{twin['row']}/seed{twin['seed']}")
    found = D.broadcast_from_main(found)
    if found is None:
        return None, None
    try:
        state, _ = read_backbone_file(Path(found[0]), f"replicate run --force on {found[1]}'s study")
    except ResultsError as e:  # every rank reads the same file, so every rank falls back alike
        if D.is_main():
            print(f"warning: {e}; pretraining this row instead of reusing {found[1]}", file=sys.stderr, flush=True)
        return None, None
    return state, found[1]


def e2e_data(cfg: RunConfig, recipe: FinetuneRecipe, data_root: str | None):
    """(train, test): TensorSplits of the pretraining images and the test split, or ImageNet's DataLoaders."""
    if is_tensor_dataset(cfg.dataset):  # the splits the kNN and the probe use too (replicate.study.runner.eval_splits)
        return pretraining_split(cfg, data_root), load_tensor_dataset(cfg.dataset, "test", data_root, cfg.image_size)
    return imagenet_finetune_loaders(cfg, recipe, data_root)


def as_backbone(cfg: RunConfig, state: dict) -> torch.nn.Module:
    """The pretrained ViT as a module, for the runner to keep (``replicate export``)."""
    vit = build_vit(cfg)
    vit.load_state_dict(state)
    return vit


def run_finetune_row(cfg: RunConfig, profile: Profile, data_root: str | None, store: ResultStore,
                     ckpt_path: Path | None = None, progress: bool = True) -> dict:
    """Pretrain (``init: pretrained``) and fine-tune one row. Returns the record's fields: status, diverged_at
    (and the stage that diverged), metrics ``{"finetune": top-1}``, the recipe used, where the pretrained backbone
    came from, and ``_backbone`` (the pretrained ViT, which the runner keeps; None for a row from scratch)."""
    recipe = e2e_recipe(cfg.setting, profile)
    out: dict = {"finetune_recipe": asdict(recipe), "pretrained_from": None, "curves": None, "_backbone": None,
                 "diverged_at": None}
    state = None
    try:
        if cfg.setting.init == "pretrained":
            pcfg = pretraining_run(cfg)
            state, source = reused_pretraining(store, pcfg)
            if state is None:
                state, source = initial_backbone(pcfg, data_root, ckpt_path, progress), "this row"
            out.update(pretrained_from=source, _backbone=as_backbone(pcfg, state) if D.is_main() else None)
        train, test = e2e_data(cfg, recipe, data_root)
        ft_ckpt = Path(ckpt_path).with_suffix(".finetune.pt") if ckpt_path else None
        acc = finetune(state, cfg, recipe, train, test, cfg.num_classes, D.init_from_env(), progress,
                       "finetune", ft_ckpt)
        out.update(status="ok", metrics={"finetune": round(acc, 2)})
    except PretrainingDiverged as e:
        out.update(status="diverged", diverged_at=e.at, diverged_in="pretraining", metrics={})
    except FinetuneDiverged as e:
        out.update(status="diverged", diverged_at=e.step, diverged_in="finetuning", metrics={})
    if ckpt_path is not None and D.is_main():
        backbone_cache(ckpt_path).unlink(missing_ok=True)
    return out
