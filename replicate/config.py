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

    framework: Framework = Field(
        "mocov3", description="self-supervised method: MoCo v3; SimCLR (no momentum encoder, no predictor); BYOL "
                              "(no negatives)")
    arch: Arch = Field("vit_base", description="ViT size of the paper's Table 2; a profile maps it to its own width "
                                               "and depth")
    patch_size: Optional[int] = Field(
        None, description="patch size in the paper's pixels; null = the arch's (16, or 14 for ViT-H); a profile maps "
                          "it to its own (reduced: 16 and 14 -> 7, 7 -> 4)")
    norm_mlp: Literal["ln", "bn"] = Field("ln", description="'bn' = ViT-BN: BatchNorm in the MLP blocks only")
    pos_embed: Literal["sincos", "learned", "none"] = Field(
        "sincos", description="position embedding: fixed 2-D sin-cos, learned, or none")
    pooling: Literal["cls", "gap_ln", "gap"] = Field(
        "cls", description="cls: [CLS] after final LN; gap_ln: no [CLS], final LN then avg pool; gap: no [CLS], no LN")
    patch_proj: Literal["random", "learned"] = Field(
        "random", description="patch projection: random = xavier init then frozen (the paper's stability trick); "
                              "learned = trained with the rest")
    head_bn: bool = Field(True, description="BatchNorm in every layer of the projector and predictor MLPs")
    predictor: bool = Field(True, description="prediction MLP after the query encoder's projector (MoCo v3, BYOL; "
                                              "SimCLR never has one)")
    proj_layers: int = Field(3, description="layers of the projection MLP")
    pred_layers: int = Field(2, description="layers of the prediction MLP")
    temperature: float = Field(0.2, description="softmax temperature of the contrastive loss (MoCo v3, SimCLR)")
    momentum: float = Field(
        0.99, description="momentum coefficient m of the key encoder's moving average (MoCo v3, BYOL); the start "
                          "value under the cosine schedule")
    momentum_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine: m rises from `momentum` to 1 over training (official code); constant: m stays "
                              "at `momentum`")
    optimizer: Literal["adamw", "lamb", "lars"] = Field(
        "adamw", description="AdamW (the paper's), LAMB or LARS (timm's implementations)")
    batch_size: int = Field(4096, description="global batch in the paper's units; a profile scales it (reduced: / 16)")
    base_lr: float = Field(1.5e-4, description="base learning rate: peak lr = base_lr x batch_size / 256 (times the "
                                               "profile's lr factor)")
    weight_decay: float = Field(0.1, description="the optimizer's weight decay")
    epochs: int = Field(300, description="pretraining epochs in the paper's units; a profile scales them "
                                         "(reduced: 300 -> 7)")
    warmup_epochs: int = Field(40, description="linear lr warmup, in the paper's epochs; scaled with `epochs` "
                                               "(the same fraction)")
    init: Literal["pretrained", "random", "supervised"] = Field(
        "pretrained", description="transfer study only: what the fine-tuned backbone starts from (pretrained = MoCo v3 "
                                  "pretraining; supervised = trained with labels on the same data; random = none)")


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
    monitor_probe: int = Field(0, description="held-out images the kNN monitor classifies (a fixed set); "
                                              "0: App. A's monitor, the current batch against a feature queue")
    monitor_bank: int = Field(0, description="pretraining images (fixed, un-augmented) the held-out probe is "
                                             "classified against")
    checkpoint_every: int = Field(description="iterations between checkpoints (0 = only at the end)")
    num_workers: int = 0
