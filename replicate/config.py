"""The two configuration layers of a run.

``Setting`` speaks the paper's language: the knobs a study varies (batch 4096, base lr 1.5e-4, sin-cos position
embedding, ...). Spec files write Settings. A ``Profile`` (see ``profiles.py``) translates a Setting into a
``RunConfig``: concrete sizes for one scale (dataset, model width, epochs, per-step batch). The trainer and the
evaluators only ever see a RunConfig, and a RunConfig is what a result file records.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

Framework = Literal["mocov3", "simclr", "byol"]
Arch = Literal["vit_small", "vit_base", "vit_large", "vit_huge"]


class Strict(BaseModel):
    # Unknown keys and wrong types are errors: a typo in a spec must never silently train the default.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Setting(Strict):
    """A row of a study, in the paper's units. Defaults are the paper's final ViT recipe (Sec. 5, App. A)."""

    framework: Framework = "mocov3"
    arch: Arch = "vit_base"
    patch_size: Optional[int] = Field(None, description="paper patch size; None = the arch's (16, or 14 for ViT-H)")
    norm_mlp: Literal["ln", "bn"] = Field("ln", description="'bn' = ViT-BN: BatchNorm in the MLP blocks only")
    pos_embed: Literal["sincos", "learned", "none"] = "sincos"
    pooling: Literal["cls", "gap_ln", "gap"] = Field(
        "cls", description="cls: [CLS] after final LN; gap_ln: no [CLS], final LN then avg pool; gap: no [CLS], no LN")
    patch_proj: Literal["random", "learned"] = Field("random", description="random = xavier init then frozen")
    head_bn: bool = Field(True, description="BatchNorm in every layer of the projector and predictor MLPs")
    predictor: bool = True
    proj_layers: int = 3
    pred_layers: int = 2
    temperature: float = 0.2
    momentum: float = 0.99
    momentum_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine: m rises from `momentum` to 1 over training (official code)")
    optimizer: Literal["adamw", "lamb", "lars"] = "adamw"
    batch_size: int = 4096
    base_lr: float = 1.5e-4
    weight_decay: float = 0.1
    epochs: int = 300
    warmup_epochs: int = 40
    init: Literal["pretrained", "random", "supervised"] = Field(
        "pretrained", description="transfer study only: what the fine-tuned backbone starts from")


class RunConfig(Strict):
    """Everything one pretraining run needs, at concrete sizes. Written into every result file."""

    profile: str
    setting: Setting
    seed: int = 0
    # data
    dataset: str
    image_size: int
    in_chans: int
    num_classes: int
    train_subset: Optional[int]
    exclude_classes: tuple[int, ...] = ()
    crop_min: float
    blur_sigma: tuple[float, float]
    # model
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    head_hidden: int
    head_out: int
    # optimisation
    batch_size: int
    lr: float = Field(description="peak lr = base_lr x lr_scale x batch / 256")
    weight_decay: float
    epochs: int
    warmup_epochs: float
    # evaluation
    metrics: tuple[str, ...]
    knn_k: int = 20
    knn_t: float = 0.07
    linear_epochs: int
    linear_protocol: Literal["paper", "cached"]
    linear_batch: int
    linear_base_lr: float
    monitor_every: int = Field(description="kNN-monitor / gradient-trace interval in iterations")
    checkpoint_every: int = Field(description="iterations between checkpoints (0 = only at the end)")
    num_workers: int = 0
