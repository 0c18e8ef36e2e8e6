"""Checkpoints out: the backbone every finished row keeps, and ``replicate export`` into timm's or moco-v3's layout.

A pretraining row that finishes leaves ``<results>/<profile>/<spec file name>/<row>/seed<K>.backbone.pt`` beside its
result file: ``{"format": "replicate-backbone/1", "backbone": <state dict>, "config": <resolved RunConfig>}``, the
state dict of the online encoder's ViT (timm ``VisionTransformer`` keys, no classifier, fp32, on the CPU).
``replicate export`` rewrites it as

- ``timm``: that plain state dict, for ``replicate.core.model.build_vit(cfg)`` or an equivalent ``timm.create_model``
  (``timm_create_kwargs``; a ViT-BN backbone has BatchNorm MLP blocks, and a BatchNorm / WeightNorm patch
  projection its own layers and keys, which only ``build_vit`` builds);
- ``moco-v3``: ``{"state_dict": {"module.base_encoder.<key>": ...}, "epoch": ..., "arch": ...}``, the layout of the
  official ``main_moco.py``, which its ``main_lincls.py`` reads. Only the base encoder's backbone is kept: the
  projector and predictor heads (``module.base_encoder.head``, ``module.predictor``) and the momentum encoder are
  not exported, so the file can be probed or fine-tuned, not resumed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from replicate.core.config import RunConfig
from replicate.core.model import timm_vit_kwargs
from replicate.runtime.checkpoint import FORMATS, WeightsFileError, atomic_torch_save, load_weights, save_weights
from replicate.study.profiles import Profile
from replicate.study.results import DEFAULT_ROOT, CurrentConfigs, ResultsError, ResultStore
from replicate.study.spec import Spec, check_profile

BACKBONE_FORMAT = FORMATS["backbone"]
MOCO_PREFIX = "module.base_encoder."  # the official MoCo wrapper under DistributedDataParallel
EXPORT_FORMATS = ("timm", "moco-v3")


def backbone_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state dict on the CPU, floating tensors in fp32 (integer buffers as they are)."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
            for k, v in backbone.state_dict().items()}


def save_backbone(path: Path, backbone: nn.Module, config: dict) -> None:
    """Write a row's backbone file (``save_weights``: atomically, in the suite's one envelope)."""
    save_weights(path, "backbone", {"backbone": backbone_state(backbone), "config": config})


def keep_backbone(store: ResultStore, where: tuple[str, str, int], record: dict, backbone: nn.Module | None) -> None:
    """After a row ran (rank 0): write its backbone file and name it in the record when it finished ok; otherwise
    remove a previous run's file, so a row never keeps a backbone its record does not describe."""
    path = store.backbone_path(*where)
    if backbone is None or record.get("status") != "ok":
        path.unlink(missing_ok=True)
        return
    save_backbone(path, backbone, record["config"])
    record["backbone"] = path.name


def run_command(spec: Spec, profile: str) -> str:
    study = spec.name if spec.name != spec.key else spec.path  # tableN for a shipped study, else its file
    return f"replicate run {study} --profile {profile}"


def load_row_backbone(store: ResultStore, spec: Spec, row: str, seed: int) -> tuple[dict[str, torch.Tensor], RunConfig]:
    """The backbone a finished row kept, and its config. One-line errors when there is none."""
    spec.row(row)  # a SpecError naming the rows where there is none
    record = store.load(spec.key, row, seed)
    where = f"{spec.name} row {row} seed {seed} at profile {store.profile}"
    if record is None:
        raise ResultsError(f"no result for {where} ({store.path(spec.key, row, seed)}); run the table first: "
                           f"{run_command(spec, store.profile)} --seeds {seed + 1}")
    path = store.backbone_path(spec.key, row, seed)
    if record.get("status") != "ok":
        raise ResultsError(f"no backbone for {where}: the row {record.get('status')} ({store.path(spec.key, row, seed)})"
                           ", so there is no trained backbone to export")
    if spec.kind == "finetune" and spec.setting(spec.row(row)).init == "random":
        raise ResultsError(f"no backbone for {where}: the row trains from scratch (init: random), so it has no "
                           "pretrained backbone to export")
    if not record.get("backbone") or not path.exists():
        if store.root.resolve() == DEFAULT_ROOT.resolve():  # the committed results: never overwrite them
            fix = (f"backbones are not committed with the results; to make one, run the study into a folder of your "
                   f"own: `{run_command(spec, store.profile)} --results my-results`, then add --results my-results "
                   "here (--profile smoke makes one in seconds)")
        else:
            fix = (f"the row finished before backbones were kept, or its results were copied without them; re-run it: "
                   f"`{run_command(spec, store.profile)} --results {store.root} --force`")
        raise ResultsError(f"no backbone for {where}: {path} is missing ({fix})")
    return read_backbone_file(path, f"{run_command(spec, store.profile)} --results {store.root} --force")


def read_backbone_file(path: Path, fix: str) -> tuple[dict[str, torch.Tensor], RunConfig]:
    """A ``seed<K>.backbone.pt``'s state dict and config (``safe_load``: plain data only); an unreadable or damaged
    file is a one-line ResultsError naming it, with ``fix`` (the command that writes it again)."""
    try:
        state = load_weights(path, "backbone", {"format", "backbone", "config"})
    except WeightsFileError as e:
        raise ResultsError(f"backbone file {path} is {e}; write it again: {fix}") from None
    if not isinstance(state["backbone"], dict) or not isinstance(state["config"], dict):
        raise ResultsError(f"backbone file {path} is not a {BACKBONE_FORMAT} file of this suite; write it again: {fix}")
    return state["backbone"], stored_config(state["config"], path)


def stored_config(config: dict, path: Path) -> RunConfig:
    """The RunConfig a backbone file carries (JSON: its lists are RunConfig's tuples)."""
    try:
        return RunConfig.model_validate_json(json.dumps(config))
    except ValidationError as e:
        first = e.errors()[0]
        raise ResultsError(f"{path}: its stored config does not fit this version of the suite "
                           f"({'.'.join(map(str, first['loc']))}: {first['msg']}); re-run the row") from None


def moco_v3_checkpoint(state: dict[str, torch.Tensor], cfg: RunConfig) -> dict:
    """The official ``main_moco.py`` checkpoint layout, base-encoder backbone only (no heads, no momentum encoder,
    no optimizer: ``main_lincls.py`` reads only ``state_dict``'s ``module.base_encoder.`` keys without ``head``)."""
    return {"state_dict": {MOCO_PREFIX + k: v for k, v in state.items()}, "epoch": cfg.epochs,
            "arch": cfg.setting.arch}


def timm_create_kwargs(cfg: RunConfig) -> dict | None:
    """``timm.create_model`` arguments that build the same ViT as ``build_vit(cfg)`` (None for ViT-BN, whose
    BatchNorm MLP blocks timm does not build, and for a BatchNorm or WeightNorm patch projection, whose layers and
    keys are ours). The sin-cos table is a buffer-like parameter: it loads from the file."""
    s = cfg.setting
    return None if s.norm_mlp == "bn" or s.patch_proj_norm != "none" else timm_vit_kwargs(cfg)


def how_to_load(fmt: str, out: Path, cfg: RunConfig) -> str:
    """One line saying what the exported file loads into."""
    kwargs = timm_create_kwargs(cfg)
    what = "ViT-BN" if cfg.setting.norm_mlp == "bn" else f"patch_proj_norm {cfg.setting.patch_proj_norm}"
    if fmt == "moco-v3":
        layout = (f"official moco-v3 layout (base encoder backbone only; arch {cfg.setting.arch} at profile "
                  f"{cfg.profile}: {cfg.embed_dim} wide x {cfg.depth} blocks, patch {cfg.patch_size})")
        # the official vits.py builds neither layer: the keys are ours, under the official prefix
        return layout if kwargs is not None else (f"{layout}; a {what} backbone, whose extra layers the official "
                                                  "vits.py does not build: load it into replicate.core.model.build_vit(cfg)")
    if kwargs is None:
        return f"{what} backbone: load it into replicate.core.model.build_vit(cfg) (timm's plain ViT has no such layers)"
    name = kwargs.pop("model_name")
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return (f"timm.create_model({name!r}, {args}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(out)!r}))")


def export_row(spec: Spec, row: str, profile: Profile, seed: int, fmt: str, out: str | Path,
               results_root: str | Path | None = None) -> str:
    """Write a finished row's backbone to ``out`` in ``fmt`` (timm or moco-v3); returns how to load it."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    store = ResultStore(results_root, profile.name)
    check_profile(spec, profile)
    state, cfg = load_row_backbone(store, spec, row, seed)
    changes = CurrentConfigs(spec, profile).changes({"config": cfg.model_dump(mode="json"), "seed": seed},
                                                    spec.row(row))
    if changes:
        print(f"warning: {spec.name} row {row} is stale (the spec changed since: {'; '.join(changes)}); "
              "exporting the stored backbone", file=sys.stderr)
    out = Path(out)
    # timm's layout is the backbone's own: VisionTransformer(num_classes=0) keys, no head
    atomic_torch_save(state if fmt == "timm" else moco_v3_checkpoint(state, cfg), out)
    return how_to_load(fmt, out, cfg)
