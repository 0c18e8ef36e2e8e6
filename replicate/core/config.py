"""The two configuration layers of a run.

``Setting`` speaks the paper's language: the knobs a study varies (batch 4096, base lr 1.5e-4, sin-cos position
embedding, ...). Spec files write Settings. A ``Profile`` (see ``profiles.py``) translates a Setting into a
``RunConfig``: concrete sizes for one scale (dataset, model width, epochs, per-step batch). The trainer and the
evaluators only ever see a RunConfig, and a RunConfig is what a result file records.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

Framework = Literal["mocov3", "simclr", "byol", "swav"]
Arch = Literal["vit_small", "vit_base", "vit_large", "vit_huge"]

# Sane upper bounds: beyond them a spec is a typo, not an experiment (the paper's longest run is 600 epochs, its
# heads 3 layers, SwAV's Sinkhorn 3 iterations); they keep a stray digit from training for ever.
MAX_EPOCHS = 10_000
MAX_LAYERS = 16
MAX_SINKHORN = 100


class Strict(BaseModel):
    # Unknown keys and wrong types are errors: a typo in a spec must never silently train the default.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Setting(Strict):
    """A row of a study, in the paper's units. Defaults are the paper's final ViT recipe (Sec. 5, App. A)."""

    framework: Framework = Field(
        "mocov3", description="self-supervised method: MoCo v3; SimCLR (no momentum encoder, no predictor); BYOL "
                              "(no negatives); SwAV (prototypes and Sinkhorn codes, no momentum encoder, no "
                              "predictor)")
    arch: Arch = Field("vit_base", description="ViT size of the paper's Table 2; a profile maps it to its own width "
                                               "and depth")
    patch_size: Optional[int] = Field(
        None, ge=1, description="patch size in the paper's pixels; null = the arch's (16, or 14 for ViT-H); a profile maps "
                          "it to its own (docs/scales.md; `replicate show` prints it)")
    norm_mlp: Literal["ln", "bn"] = Field("ln", description="'bn' = ViT-BN: BatchNorm in the MLP blocks only")
    pos_embed: Literal["sincos", "learned", "none"] = Field(
        "sincos", description="position embedding: fixed 2-D sin-cos, learned, or none")
    pooling: Literal["cls", "gap_ln", "gap"] = Field(
        "cls", description="cls: [CLS] after final LN; gap_ln: no [CLS], final LN then avg pool; gap: no [CLS], no LN")
    patch_proj: Literal["random", "learned"] = Field(
        "random", description="patch projection: random = xavier init then frozen (the paper's stability trick); "
                              "learned = trained with the rest")
    patch_proj_norm: Literal["none", "bn", "wn"] = Field(
        "none", description="learned patch projection only (Sec. 4.2's other stabilizers): bn = BatchNorm over the "
                            "patch embeddings' channels right after the projection; wn = WeightNorm of the "
                            "projection's weight (per output channel)")
    patch_proj_clip: Optional[float] = Field(
        None, gt=0, allow_inf_nan=False,
        description="learned patch projection only (Sec. 4.2): clip the L2 norm of the projection's gradient (weight "
                    "and bias together) to this value every step, before the optimizer step; in the trainer's units, "
                    "the same at every profile; null = no clipping")

    @field_validator("patch_proj_norm", "patch_proj_clip")
    @classmethod
    def _needs_learned_patch_proj(cls, value, info: ValidationInfo):
        # a frozen projection has no gradient to clip, and normalising it is not what Sec. 4.2 tried
        if value not in ("none", None) and info.data.get("patch_proj") == "random":
            raise ValueError(f"{info.field_name} applies to a learned patch projection; set patch_proj: learned "
                             "(random freezes it)")
        return value

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_within_training(cls, value, info: ValidationInfo):
        epochs = info.data.get("epochs")
        if epochs is not None and value >= epochs:
            raise ValueError(f"{value} must be less than epochs ({epochs}): the warmup is part of training")
        return value

    head_bn: bool = Field(True, description="BatchNorm in every layer of the projector and predictor MLPs")
    predictor: bool = Field(True, description="prediction MLP after the query encoder's projector (MoCo v3, BYOL; "
                                              "SimCLR and SwAV never have one)")
    proj_layers: int = Field(3, ge=1, le=MAX_LAYERS, description="layers of the projection MLP")
    pred_layers: int = Field(2, ge=1, le=MAX_LAYERS, description="layers of the prediction MLP")
    temperature: float = Field(0.2, gt=0, allow_inf_nan=False,
                               description="softmax temperature of the contrastive loss (MoCo v3, SimCLR)")
    momentum: float = Field(
        0.99, ge=0, le=1, description="momentum coefficient m of the key encoder's moving average (MoCo v3, BYOL); the "
                                      "start value under the cosine schedule")
    momentum_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine: m rises from `momentum` to 1 over training (official code); constant: m stays "
                              "at `momentum`")
    optimizer: Literal["adamw", "lamb", "lars"] = Field(
        "adamw", description="AdamW (the paper's), LAMB or LARS (timm's implementations)")
    batch_size: int = Field(
        4096, ge=1, description="global batch in the paper's units; a profile scales it (docs/scales.md) and needs at "
                                "least 2 images per step there, and no more than its training images")
    base_lr: float = Field(1.5e-4, gt=0, allow_inf_nan=False,
                           description="base learning rate: peak lr = base_lr x batch_size / 256 (times the profile's "
                                       "lr factor)")
    weight_decay: float = Field(0.1, ge=0, allow_inf_nan=False, description="the optimizer's weight decay")
    epochs: int = Field(300, ge=1, le=MAX_EPOCHS, description="pretraining epochs in the paper's units; a profile scales "
                                                              "them (docs/scales.md) and needs at least 1 there")
    warmup_epochs: int = Field(40, ge=0, description="linear lr warmup, in the paper's epochs; scaled with `epochs` "
                                                     "(the same fraction); less than `epochs`")
    # SwAV only (official main_swav.py defaults); the other frameworks ignore these
    swav_prototypes: int = Field(
        3000, ge=1, description="SwAV: number of prototypes K at the paper's batch; a profile scales K with the "
                                "batch (the batch/K ratio the Sinkhorn equipartition works with, as there is no "
                                "queue), at least 2 there")
    swav_temperature: float = Field(0.1, gt=0, allow_inf_nan=False,
                                    description="SwAV: softmax temperature of the swapped prediction")
    swav_epsilon: float = Field(0.05, gt=0, allow_inf_nan=False,
                                description="SwAV: entropic regularisation epsilon of Sinkhorn-Knopp")
    sinkhorn_iterations: int = Field(3, ge=1, le=MAX_SINKHORN, description="SwAV: Sinkhorn-Knopp iterations per view")
    swav_freeze_prototypes_epochs: int = Field(
        1, ge=0, description="SwAV: the prototypes get no update for this many of the paper's epochs (official "
                             "freeze_prototypes_niters, 313 iterations = 1 epoch at batch 4096); scaled with `epochs`")
    init: Literal["pretrained", "random", "supervised"] = Field(
        "pretrained", description="transfer and fine-tuning studies only: what the fine-tuned backbone starts from "
                                  "(pretrained = MoCo v3 pretraining; supervised = trained with labels on the same "
                                  "data, transfer only; random = none, i.e. trained from scratch)")
    finetune_epochs: Optional[int] = Field(
        None, ge=1, le=MAX_EPOCHS,
        description="fine-tuning study only: end-to-end fine-tuning epochs in the paper's units, scaled like `epochs` "
                    "(a row from scratch trains this long), at least 1 there; null = the paper's ViT-B fine-tuning (150)")
    finetune_drop_path: Optional[float] = Field(
        None, ge=0, lt=1, description="fine-tuning study only: drop path (stochastic depth) rate while fine-tuning; "
                                      "null = the DeiT recipe's (0.1); pretraining never uses drop path")


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
    prototypes: int = Field(0, description="SwAV prototypes at this scale: the Setting's swav_prototypes x the "
                                           "profile's batch scale; 0 for the other frameworks")
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
