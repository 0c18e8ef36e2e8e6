"""MoCo v3 (Alg. 1 of the paper), and the SimCLR / BYOL / SwAV variants that studies 4 and 12 compare, on one
encoder layout (SwAV's prototypes, Sinkhorn and loss: ``swav.py``).

Layout (official ``moco/builder.py``): f_q = backbone -> projector -> predictor; f_k = momentum copy of
backbone -> projector, with no predictor. The momentum update runs inside ``forward`` before the keys are
computed, as the official code does (equivalent to Alg. 1's update after the optimizer step, shifted by one call).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from replicate.core.config import RunConfig, Setting
from replicate.core.distributed import gather_no_grad, gather_with_grad, rank
from replicate.core.model import build_mlp, build_vit
from replicate.core.swav import SwAVHead

MOMENTUM_FRAMEWORKS = ("mocov3", "byol")  # a momentum encoder and (optionally) a predictor; SimCLR and SwAV neither


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """ctr(q, k) = 2 tau * CE(normalize(q) normalize(k)^T / tau, arange), keys gathered over processes."""
    q = F.normalize(q, dim=1)
    k = gather_no_grad(F.normalize(k, dim=1))
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank()
    return F.cross_entropy(logits, labels) * (2 * temperature)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2N views (negatives from both views, gradients through all of them).

    Scaled like ``ctr`` (x 2 tau) and summed over the two views, so its magnitude matches the MoCo v3 loss.
    """
    n = z1.shape[0]
    z_local = F.normalize(torch.cat([z1, z2]), dim=1)
    a1, a2 = gather_with_grad(F.normalize(z1, dim=1)), gather_with_grad(F.normalize(z2, dim=1))
    total = a1.shape[0]
    logits = z_local @ torch.cat([a1, a2]).T / temperature
    idx = torch.arange(n, device=z1.device) + n * rank()
    self_idx, pos_idx = torch.cat([idx, idx + total]), torch.cat([idx + total, idx])
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * total).bool(), float("-inf"))
    return F.cross_entropy(logits, pos_idx) * (2 * temperature) * 2


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE, 2 - 2 cos(p, z), averaged over the batch."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


class SelfSupervisedViT(nn.Module):
    def __init__(self, cfg: RunConfig):
        super().__init__()
        s = cfg.setting
        self.framework = s.framework
        self.temperature = s.swav_temperature if s.framework == "swav" else s.temperature
        self.backbone = build_vit(cfg)
        self.projector = build_mlp(s.proj_layers, cfg.embed_dim, cfg.head_hidden, cfg.head_out, bn=s.head_bn)
        has_predictor = s.predictor and s.framework in MOMENTUM_FRAMEWORKS
        self.predictor = (build_mlp(s.pred_layers, cfg.head_out, cfg.head_hidden, cfg.head_out, bn=s.head_bn)
                          if has_predictor else nn.Identity())
        if s.framework == "swav":
            self.swav = SwAVHead(cfg)
        if s.framework in MOMENTUM_FRAMEWORKS:
            self.momentum_backbone = copy.deepcopy(self.backbone)
            self.momentum_projector = copy.deepcopy(self.projector)
            for p in self.momentum_parameters():
                p.requires_grad = False

    def online_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def momentum_parameters(self) -> list[nn.Parameter]:
        return [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]

    def compile_backbones(self) -> None:
        """``torch.compile`` the ViTs (nearly all of a step's FLOPs), in place: state-dict keys are unchanged. The
        heads and the momentum update stay eager, so the per-step momentum coefficient never triggers a recompile
        (compiling the whole forward did: m is a python float)."""
        for module in (self.backbone, getattr(self, "momentum_backbone", None)):
            if module is not None:
                module.compile()

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        """f_k <- m f_k + (1 - m) f_q over parameters (buffers such as BN statistics are not averaged)."""
        torch._foreach_lerp_(self.momentum_parameters(), self.online_parameters(), 1.0 - m)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return self.momentum_projector(self.momentum_backbone(x))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the loss and the detached backbone features of view 1 (for the kNN monitor)."""
        h1, h2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.projector(h1), self.projector(h2)
        if self.framework == "simclr":
            return nt_xent_loss(z1, z2, self.temperature), h1.detach()
        if self.framework == "swav":
            return self.swav(z1, z2), h1.detach()
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            self.update_momentum_encoder(m)
            k1, k2 = self.keys(x1), self.keys(x2)
        if self.framework == "byol":
            loss = byol_loss(q1, k2) + byol_loss(q2, k1)
        else:
            loss = contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)
        return loss, h1.detach()


def build_model(cfg: RunConfig) -> SelfSupervisedViT:
    """The row's model, starting from the weights its study's other rows of this seed start from, where it can.

    Rows compared with one seed should differ only in what the row changes (#31, paired comparisons). Drawn in
    module order, one extra or missing parameter (no [CLS], no position table, BN in a head) would shift the draws
    of everything after it. So the default recipe's model (``Setting()``: same sizes) is built from the seed, and
    every tensor whose name, shape and owning layer type it shares with the row's model is copied from it; the rest
    keeps its own draw. The global RNG is left as building the row's model alone leaves it.
    """
    model = SelfSupervisedViT(cfg)
    default = cfg.model_copy(update={"setting": Setting(arch=cfg.setting.arch, patch_size=cfg.setting.patch_size)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        reference = SelfSupervisedViT(default)
    share_initial_weights(model, reference)
    return model


def share_initial_weights(model: nn.Module, reference: nn.Module) -> list[str]:
    """Copy into ``model`` every parameter and buffer of ``reference`` with the same name, shape and owning layer
    type (a Linear's weight never takes a BatchNorm's); returns the names copied."""
    def owners(m: nn.Module) -> dict[str, tuple[type, torch.Tensor]]:
        out = {}
        for mod_name, mod in m.named_modules():
            for t_name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
                out[f"{mod_name}.{t_name}" if mod_name else t_name] = (type(mod), t)
        return out

    mine, theirs = owners(model), owners(reference)
    copied = []
    with torch.no_grad():
        for name, (kind, t) in mine.items():
            if name in theirs and theirs[name][0] is kind and theirs[name][1].shape == t.shape:
                t.copy_(theirs[name][1])
                copied.append(name)
    return copied
