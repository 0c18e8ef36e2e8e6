"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments") as a
framework of the one trainer, for the paper's Table 4 (study 12) and Sec. 4.2's SwAV numbers (study 4).

Per view: backbone -> projector MLP -> L2-normalise -> prototypes (a bias-free Linear holding K unit vectors) ->
scores. The codes are Sinkhorn-Knopp equipartitions of each view's detached scores; each view's code is predicted
from the other view's scores (the "swapped prediction"):

    loss = -mean_i( q2_i . log softmax(s1_i / T) + q1_i . log softmax(s2_i / T) ) / 2

Matches the official facebookresearch/swav ``main_swav.py``:
- ``sinkhorn`` is its ``distributed_sinkhorn``: Q = exp(scores / epsilon)^T, total mass 1, then per iteration rows
  (prototypes) to 1/K and columns (samples) to 1/B, finally x B, so each sample's code sums to 1. The sums are
  all-reduced, so under torchrun the equipartition runs over the global batch, and 2 processes compute what 1 does.
- Defaults: epsilon 0.05, 3 iterations, temperature 0.1, K = 3000 prototypes; two crops both used for
  assignment (``crops_for_assign 0 1``), the loss averaged over them.
- The prototypes are re-normalised to unit length before every forward (official: at the start of each
  iteration, i.e. after the previous step), under no_grad, so no gradient flows through the normalisation.
- The prototypes get no update during the first epoch (``freeze_prototypes_niters`` 313 = 1 epoch at batch 4096:
  their gradient is dropped, so the optimizer skips them, weight decay included); here the first of the paper's
  epochs, scaled by the profile like the warmup (``frozen_prototype_steps``).
- No momentum encoder, no predictor; SyncBN in the heads (the official ``sync_bn``).

Differs, and why:
- Two 224 crops and no multi-crop: MoCo v3's comparison (Table 4) runs every framework on two crops.
- No queue: the official code adds one only at small batches (256); at the paper's 4096 it is off (queue_length
  0). A smaller profile keeps the paper's batch/K ratio instead, by scaling K with the batch (``Profile.prototypes``).
- Heads: the MoCo v3 projector of the other frameworks (``build_mlp``: 3 layers, hidden 4096, output 256, last
  BN without affine) rather than SwAV's ResNet head (2 layers, hidden 2048, output 128), so that frameworks differ
  only in their loss, as in the paper's comparison; AdamW with the ViT recipe instead of LARS.
- The scores and Sinkhorn run in fp32 even under bf16 autocast (the official code's apex O1 computes the scores in
  fp16): exp(s / 0.05) turns rounding of s into multiplicative noise on the codes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from replicate.core import distributed as D
from replicate.core.config import RunConfig


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Codes (B_local, K) of a view's scores (B_local, K): each row sums to 1, and over the global batch each
    prototype gets about B/K of the mass (exactly after the last row step; the column step comes last)."""
    q = torch.exp(scores.float() / epsilon).T  # K x B, as the official code and the paper's notation
    n_prototypes, n_samples = q.shape[0], q.shape[1] * D.world_size()
    q /= D.all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= D.all_reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype: 1/K of the mass
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)  # each sample: 1/B (a per-sample sum: local)
        q /= n_samples
    return (q * n_samples).T


def swapped_prediction_loss(s1: torch.Tensor, s2: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor,
                            temperature: float) -> torch.Tensor:
    """Each view's code predicted from the other view's scores: cross-entropy of q2 against softmax(s1 / T) and of
    q1 against softmax(s2 / T), averaged over this process's samples and the two views (DDP averages processes)."""
    ce_12 = -(q2 * F.log_softmax(s1 / temperature, dim=1)).sum(dim=1).mean()
    ce_21 = -(q1 * F.log_softmax(s2 / temperature, dim=1)).sum(dim=1).mean()
    return (ce_12 + ce_21) / 2


class SwAVHead(nn.Module):
    """The prototypes and the SwAV loss on two views' projector outputs."""

    def __init__(self, cfg: RunConfig):
        super().__init__()
        s = cfg.setting
        self.temperature, self.epsilon, self.iterations = s.swav_temperature, s.swav_epsilon, s.sinkhorn_iterations
        self.prototypes = nn.Linear(cfg.head_out, cfg.prototypes, bias=False)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine similarities of the samples to the prototypes, in fp32 (see the module docstring)."""
        # (the bench counts FLOPs on the meta device, which has no autocast of its own)
        with torch.autocast(z.device.type if z.device.type in ("cpu", "cuda") else "cpu", enabled=False):
            return self.prototypes(F.normalize(z.float(), dim=1))

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        self.normalize_prototypes()
        s1, s2 = self.scores(z1), self.scores(z2)
        q1, q2 = (sinkhorn(s.detach(), self.epsilon, self.iterations) for s in (s1, s2))
        return swapped_prediction_loss(s1, s2, q1, q2, self.temperature)


def frozen_prototype_steps(cfg: RunConfig, iters_per_epoch: int) -> int:
    """Iterations whose prototype gradient is dropped: the Setting's epochs (paper units) scaled by the profile
    like the warmup, i.e. the same fraction of training; 0 for the other frameworks."""
    s = cfg.setting
    if s.framework != "swav":
        return 0
    epochs = s.swav_freeze_prototypes_epochs * cfg.epochs / s.epochs
    return math.ceil(round(epochs * iters_per_epoch, 6))


def drop_prototype_gradients(model: nn.Module) -> None:
    """The official code's gradient cancelling: with no gradient the optimizer leaves the prototypes as they are."""
    model.swav.prototypes.weight.grad = None
