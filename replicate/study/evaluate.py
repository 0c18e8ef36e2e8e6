"""Checkpoints in: ``replicate evaluate`` scores any ViT backbone with a profile's protocols.

It reads three layouts (``read_checkpoint``):

- ``replicate-backbone/1``: a row's ``seed<K>.backbone.pt`` (``replicate.study.export``), which carries its config;
- ``moco-v3``: the official ``main_moco.py`` checkpoint, ``{"state_dict": {"module.base_encoder.<key>": ...}}``
  (the released ``vit-b-300ep.pth.tar`` is ViT-B/16, sin-cos position embedding, [CLS] pooling); only the base
  encoder's backbone is used: its ``head`` (projector), the momentum encoder and the predictor are dropped, as the
  official ``main_lincls.py`` does;
- ``timm``: a timm ``VisionTransformer`` state dict, plain or under ``state_dict`` / ``model`` (a ``module.``
  prefix and a classifier ``head`` are dropped).

The model comes from the file's config (ours), else from a spec row resolved at the profile (``--row
TABLE:ROW``), else from the paper's default setting with ``--arch``. The checkpoint must fit it exactly: the first
missing, unexpected or mis-shaped key is a one-line error. Then ``replicate.study.runner.evaluate_backbone`` runs the
profile's protocols (kNN and linear probe on cached features at reduced and smoke, the paper's linear probe at
paper) and rank 0 writes ``<results>/<profile>/evaluations/<checkpoint stem>.<sha256[:8]>.json``.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from replicate.core import distributed as D
from replicate.core.config import RunConfig, Setting
from replicate.core.model import build_vit
from replicate.runtime.atomic import atomic_write_text
from replicate.runtime.checkpoint import load_problem, safe_load
from replicate.study.export import BACKBONE_FORMAT, MOCO_PREFIX, stored_config
from replicate.study.profiles import get_profile
from replicate.study.results import ResultsError, ResultStore, config_changes, provenance
from replicate.study.spec import SpecError, check_profile, find_spec, load_spec

DEFAULT_PROFILE = "paper"  # a checkpoint without our config is most likely a paper-scale ViT


class CheckpointLoadError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; ``str(e)`` is the one-line message."""


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, torch.Tensor]  # the backbone's keys, as build_vit names them
    format: str  # "replicate-backbone/1" | "moco-v3" | "timm"
    config: dict | None  # the resolved RunConfig our own files carry


def _only_prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _without_head(state: dict) -> dict:
    """Drop the classifier / projector ``head``: evaluation uses the backbone's pooled features only."""
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def _load(path: Path, trust: bool):
    """The file's objects: tensors and plain data only (``safe_load``), unless ``trust`` (``--trust-checkpoint``)
    allows full unpickling, which can run code, for a file from a source the user trusts."""
    try:
        return safe_load(path)
    except FileNotFoundError:
        raise CheckpointLoadError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as e:
        if not trust or "Weights only load failed" not in str(e):
            raise CheckpointLoadError(f"checkpoint {path} is {load_problem(e)}; if it comes from a source you "
                                      "trust, pass --trust-checkpoint to unpickle it (that can run code)") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one line
        raise CheckpointLoadError(f"checkpoint {path} is {load_problem(e)}") from None
    _warn(f"--trust-checkpoint: unpickling {path} in full (it holds Python objects beyond tensors)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointLoadError(f"checkpoint {path} is {load_problem(e)}") from None


def read_checkpoint(path: str | Path, trust: bool = False) -> Checkpoint:
    """The backbone state dict of a checkpoint in any of the three layouts, and which layout it was. The file is
    read as tensors and plain data only, unless ``trust``."""
    path = Path(path)
    obj = _load(path, trust)
    if isinstance(obj, dict) and obj.get("format") == BACKBONE_FORMAT:
        if not isinstance(obj.get("backbone"), dict) or not isinstance(obj.get("config"), dict):
            raise CheckpointLoadError(f"{path} is a damaged {BACKBONE_FORMAT} file (no backbone or config in it); "
                                      "re-run the row that wrote it")
        return Checkpoint(path, obj["backbone"], BACKBONE_FORMAT, obj["config"])
    inner = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else None
    if not isinstance(inner, dict) or not inner or not all(isinstance(v, torch.Tensor) for v in inner.values()):
        raise CheckpointLoadError(f"{path} is not a ViT checkpoint: expected one of ours (*.backbone.pt), the official "
                                  "moco-v3 layout ({'state_dict': {'module.base_encoder.*': ...}}) or a timm state dict")
    if any(k.startswith(MOCO_PREFIX) for k in inner):
        return Checkpoint(path, _without_head(_only_prefixed(inner, MOCO_PREFIX)), "moco-v3", None)
    if all(k.startswith("module.") for k in inner):  # saved from a DistributedDataParallel wrapper
        inner = _only_prefixed(inner, "module.")
    return Checkpoint(path, _without_head(inner), "timm", None)


def parse_row(value: str) -> tuple[str, str]:
    """``TABLE:ROW`` (``table5:sincos``, ``tables/05_position_embedding.yaml:sincos``) -> (table, row)."""
    table, sep, row = value.rpartition(":")
    if not sep or not table or not row:
        raise SpecError(f"--row {value!r}: expected TABLE:ROW, e.g. table5:sincos")
    return table, row


def row_config(value: str, profile: str, seed: int) -> RunConfig:
    table, row = parse_row(value)
    spec = load_spec(find_spec(table))
    try:
        chosen = spec.row(row)
    except SpecError as e:
        raise SpecError(f"--row {value}: {e}") from None
    check_profile(spec, get_profile(profile))
    return get_profile(profile).resolve(spec.setting(chosen), seed=seed)


def model_config(ckpt: Checkpoint, profile: str | None, row: str | None, arch: str | None,
                 seed: int) -> tuple[RunConfig, str]:
    """The config to build and evaluate the model with, and where it came from (for the log and the record)."""
    if ckpt.config is not None:
        cfg = stored_config(ckpt.config, ckpt.path)
        if profile not in (None, cfg.profile):
            raise SpecError(f"{ckpt.path} was trained at profile {cfg.profile}; evaluate it with --profile "
                            f"{cfg.profile} (or leave --profile out)")
        if row is not None:
            changes = config_changes(ckpt.config, row_config(row, cfg.profile, cfg.seed).model_dump(mode="json"))
            if changes:
                _warn(f"--row {row} differs from the config stored in {ckpt.path.name} ({'; '.join(changes)}); "
                      "using the stored one")
        return cfg, f"the config stored in {ckpt.path.name}"
    profile = profile or DEFAULT_PROFILE
    if row is not None:
        if arch is not None:
            raise SpecError("pass --row or --arch, not both: a row fixes its architecture")
        return row_config(row, profile, seed), f"row {row} at profile {profile}"
    arch = arch or "vit_base"
    return get_profile(profile).resolve(Setting(arch=arch), seed=seed), f"the default {arch} at profile {profile}"


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def first_mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str | None:
    """The first key that keeps ``got`` from loading strictly into a model whose state dict is ``expected``."""
    for key, want in expected.items():
        if key not in got:
            return f"{key} is missing from the checkpoint (the model expects shape {_shape(want)})"
        if got[key].shape != want.shape:
            return f"{key} has shape {_shape(got[key])} in the checkpoint, the model expects {_shape(want)}"
    for key, have in got.items():
        if key not in expected:
            return f"the checkpoint has {key} {_shape(have)}, which the model does not"
    return None


def describe(cfg: RunConfig) -> str:
    s = cfg.setting
    return (f"ViT {cfg.embed_dim} wide x {cfg.depth} blocks, {cfg.num_heads} heads, patch {cfg.patch_size}, "
            f"{cfg.image_size}px x {cfg.in_chans} channels, pooling {s.pooling}, pos_embed {s.pos_embed}, "
            f"norm_mlp {s.norm_mlp}")


def build_loaded_backbone(cfg: RunConfig, ckpt: Checkpoint, source: str) -> nn.Module:
    """``build_vit(cfg)`` with the checkpoint's weights, loaded strictly (a misfit is one line naming the key)."""

    backbone = build_vit(cfg)
    problem = first_mismatch(backbone.state_dict(), ckpt.state)
    if problem:
        raise CheckpointLoadError(f"{ckpt.path} ({ckpt.format}) does not fit {source} ({describe(cfg)}): {problem}; "
                                  "pass --row TABLE:ROW or --arch for the checkpoint's model")
    backbone.load_state_dict(ckpt.state, strict=True)
    return backbone


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _warn(msg: str) -> None:
    if D.is_main():
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def evaluate_checkpoint(path: str | Path, profile: str | None = None, arch: str | None = None,
                        row: str | None = None, seed: int = 0, data_root: str | None = None,
                        results_root: str | Path | None = None, progress: bool = True,
                        trust: bool = False) -> tuple[dict[str, float], Path | None]:
    """Score a checkpoint with the profile's protocols; every rank takes part, rank 0 writes the record.
    Returns the metrics and the record's path (None on other ranks). ``trust``: ``read_checkpoint``'s."""
    from replicate.study.runner import evaluate_backbone  # the runner imports the trainer: only when evaluating

    device = D.init_from_env()
    t0 = time.perf_counter()
    ckpt = read_checkpoint(path, trust)
    cfg, source = model_config(ckpt, profile, row, arch, seed)
    backbone = build_loaded_backbone(cfg, ckpt, source).to(device)
    problem = None
    if D.is_main():  # before the probe (hours at paper scale), not after it; every rank stops alike
        try:
            ResultStore(results_root, cfg.profile).check_writable()
        except ResultsError as e:
            problem = str(e)
    if D.broadcast_from_main(problem):
        raise ResultsError(problem)
    if D.is_main():
        print(f"evaluating {ckpt.path} ({ckpt.format}) as {source}: {describe(cfg)}", file=sys.stderr, flush=True)
    metrics = evaluate_backbone(cfg, backbone, data_root, progress)
    if not D.is_main():
        return metrics, None
    digest = sha256(ckpt.path)
    record = {"checkpoint": {"path": str(ckpt.path.resolve()), "sha256": digest, "format": ckpt.format},
              "config_from": source, "profile": cfg.profile, "metrics": metrics,
              "wall_time_s": round(time.perf_counter() - t0, 1), "config": cfg.model_dump(mode="json"),
              "provenance": provenance(_device_name(device))}
    out = ResultStore(results_root, cfg.profile).evaluation_path(f"{ckpt.path.name.split('.')[0]}.{digest[:8]}")
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    return metrics, out


def _device_name(device: torch.device) -> str:
    return "cuda:" + torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
