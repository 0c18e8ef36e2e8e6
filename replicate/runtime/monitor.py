"""The instability monitor (paper App. A and Fig. 4), recorded during pretraining at no extra data pass.

Per iteration: loss, lr, momentum, and the gradient infinity-norm of the first layer (the patch projection, or
the first block's qkv when the projection is frozen; its direction v under WeightNorm) and of the last block, both
absolute and relative to the weights' infinity-norm. The gradients are the raw ones, as Fig. 4's: tracked before
the patch projection's gradient clipping (``patch_proj_clip``), if any. Stats stay on the device until a flush,
so ordinary steps never sync with the host.
Every ``monitor_every`` iterations, a kNN accuracy of the backbone's features, one of two ways:
- held out (``monitor_probe > 0``, in-memory datasets): a fixed probe set of images the run never trains on,
  classified against a fixed bank of pretraining images, both un-augmented, the backbone in eval mode. The value
  is a function of the weights alone, so a change between samples is the model's, not the sampling's; the
  reduced counterpart of App. A's dense monitor. The same pass records, per block, the attention entropy and the
  largest attention logit on the first chunk of those images (``attention_probe``).
- queue (App. A as written): the current batch's features against a queue of recent training features (10% of
  the training set, as the paper's memory bank). Costs no extra forward pass, but each sample is one augmented
  batch, so it varies by a few points between samples at small batches.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from replicate.core.config import RunConfig
from replicate.core.data import TensorSplit, channel_stats, monitor_splits
from replicate.core.knn import weighted_vote
from replicate.core.model import patch_projection_weight

SERIES = ("loss", "lr", "momentum", "grad_first", "grad_first_rel", "grad_last", "grad_last_rel")


def weighted_knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                         k: int = 20, t: float = 0.07) -> torch.Tensor:
    """InstDisc/DINO weighted kNN on L2-normalised features: votes exp(sim / t) over the k nearest."""
    sim = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T
    k = min(k, bank.shape[0])
    top_sim, top_idx = sim.topk(k, dim=1)
    return weighted_vote(top_sim, bank_labels[top_idx], num_classes, t)


class HeldOutKnn:
    """kNN accuracy (%) of a fixed held-out probe set against a fixed bank, on the backbone's pooled features."""

    def __init__(self, bank: TensorSplit, probe: TensorSplit, dataset: str, num_classes: int, k: int, t: float,
                 device: torch.device, chunk: int = 256):
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in channel_stats(dataset, bank.images.shape[-1]))
        self.images = ((torch.cat([bank.images, probe.images]) - mean) / std).to(device)
        self.bank_labels, self.probe_labels = bank.labels.to(device), probe.labels.to(device)
        self.n_bank, self.num_classes, self.k, self.t, self.chunk = len(bank), num_classes, k, t, chunk

    @classmethod
    def for_run(cls, cfg: RunConfig, data_root: str | None, device: torch.device) -> "HeldOutKnn":
        bank, probe = monitor_splits(cfg, data_root)
        return cls(bank, probe, cfg.dataset, cfg.num_classes, cfg.knn_k, cfg.knn_t, device)

    @torch.inference_mode()
    def __call__(self, backbone: torch.nn.Module) -> float:
        was_training = backbone.training
        backbone.eval()  # no dropout / drop-path draws: the monitor consumes no RNG, so resume stays exact
        chunks = self.images.split(self.chunk)
        with attention_probe(backbone) as stats:  # the first chunk only: a fixed set of images, cheap
            feats = [backbone(chunks[0]).float()]
        self.last_attention = stats
        feats = torch.cat(feats + [backbone(x).float() for x in chunks[1:]])
        backbone.train(was_training)
        pred = weighted_knn_predict(feats[self.n_bank:], feats[: self.n_bank], self.bank_labels, self.num_classes,
                                    self.k, self.t)
        return round(100.0 * (pred == self.probe_labels).float().mean().item(), 2)


@contextmanager
def attention_probe(backbone: torch.nn.Module) -> Iterator[dict[str, list[float]]]:
    """Within the block, every forward of ``backbone`` records, per transformer block, the mean entropy (nats) of
    its attention rows and its largest attention logit (q.k / sqrt(d), over heads, tokens and images): the
    diagnostics of small-scale attention instability (Zhai et al. 2023, entropy collapse; Wortsman et al. 2023,
    logit growth). Recomputed from each block's input with its own qkv weights, so the forward itself (fused or
    not) is untouched."""
    stats: dict[str, list[float]] = {"entropy": [], "max_logit": []}

    def hook(attn, inputs, _output):
        x = inputs[0]
        b, n, _ = x.shape
        q, k, _v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        logits = (attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1)
        p = logits.float().softmax(dim=-1)
        stats["entropy"].append(round(float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()), 4))
        stats["max_logit"].append(round(float(logits.max()), 3))

    handles = [block.attn.register_forward_hook(hook) for block in backbone.blocks]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


class TrainingMonitor:
    def __init__(self, cfg: RunConfig, model, train_size: int, lrs: np.ndarray, ms: np.ndarray,
                 held_out: HeldOutKnn | None = None):
        self.cfg, self.lrs, self.ms = cfg, lrs, ms
        self.held_out = held_out
        backbone = self.backbone = model.backbone
        proj_w = patch_projection_weight(backbone)
        self.first = proj_w if proj_w.requires_grad else backbone.blocks[0].attn.qkv.weight
        self.last = [p for p in backbone.blocks[-1].parameters() if p.requires_grad]
        self.bank_size = max(cfg.batch_size, train_size // 10)
        self.bank = torch.zeros(0, cfg.embed_dim)
        self.bank_labels = torch.zeros(0, dtype=torch.long)
        self.pending: list[torch.Tensor] = []
        self.series = {k: [] for k in SERIES}
        self.knn_steps: list[int] = []
        self.knn_acc: list[float] = []
        self.attention: dict[str, list[list[float]]] = {"entropy": [], "max_logit": []}  # per kNN step, per block
        self.last_loss: float = float("nan")
        self.last_knn: float | None = None
        self.diverged_at: int | None = None

    @torch.no_grad()
    def track(self, loss: torch.Tensor) -> None:
        def inf(ts):
            return torch.stack([t.abs().max() for t in ts]).max()

        g_first, w_first = self.first.grad.abs().max(), self.first.abs().max()
        g_last, w_last = inf([p.grad for p in self.last if p.grad is not None]), inf(self.last)
        self.pending.append(torch.stack([loss.detach().float(), g_first.float(), (g_first / w_first).float(),
                                         g_last.float(), (g_last / w_last).float()]))

    def should_flush(self, step: int, end: int) -> bool:
        done = step + 1
        every = self.cfg.monitor_every
        return done % every == 0 or done == end

    @torch.no_grad()
    def flush(self, step: int, feats: torch.Tensor, labels: torch.Tensor) -> bool:
        """Move pending stats to the host, run the kNN monitor; False if the loss went non-finite."""
        stats = torch.stack(self.pending).cpu().numpy()
        self.pending.clear()
        first_step = step - len(stats) + 1
        for i, row in enumerate(stats):
            if not math.isfinite(float(row[0])):
                self.diverged_at = first_step + i
                return False
            s = first_step + i
            for key, val in zip(SERIES, (row[0], self.lrs[s], self.ms[s], *row[1:])):
                self.series[key].append(float(val))
        self.last_loss = float(stats[-1, 0])
        if self.held_out is not None:
            self.last_knn = self.held_out(self.backbone)
            self.knn_steps.append(step)
            self.knn_acc.append(self.last_knn)
            for key, per_block in self.held_out.last_attention.items():
                self.attention[key].append(per_block)
            return True
        feats, labels = feats.float().cpu(), labels.cpu()
        if len(self.bank) >= self.cfg.knn_k:
            pred = weighted_knn_predict(feats, self.bank, self.bank_labels, self.cfg.num_classes,
                                        self.cfg.knn_k, self.cfg.knn_t)
            self.last_knn = 100.0 * (pred == labels).float().mean().item()
            self.knn_steps.append(step)
            self.knn_acc.append(self.last_knn)
        self.bank = torch.cat([feats, self.bank])[: self.bank_size]
        self.bank_labels = torch.cat([labels, self.bank_labels])[: self.bank_size]
        return True

    def state_dict(self) -> dict:
        # ``pending`` (stats tracked since the last flush) is saved rather than flushed at a checkpoint, so the flush
        # (and kNN) steps, hence the curves, are the same however a run was interrupted.
        return {"series": self.series, "knn_steps": self.knn_steps, "knn_acc": self.knn_acc,
                "attention": self.attention, "bank": self.bank, "bank_labels": self.bank_labels,
                "pending": [t.cpu() for t in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        self.series = {k: list(v) for k, v in state["series"].items()}
        self.knn_steps, self.knn_acc = list(state["knn_steps"]), list(state["knn_acc"])
        # a checkpoint from before the attention diagnostics: the curves restart them at the resumed step
        self.attention = {k: list(v) for k, v in state.get("attention", {"entropy": [], "max_logit": []}).items()}
        self.bank, self.bank_labels = state["bank"], state["bank_labels"]
        self.pending = [t.to(self.first.device) for t in state["pending"]]
        self.last_knn = self.knn_acc[-1] if self.knn_acc else None

    def curves(self) -> dict:
        """The compact, JSON-ready record stored with a row's results."""
        out = {"series": self.series, "knn_steps": self.knn_steps, "knn_acc": self.knn_acc}
        if self.attention["entropy"]:  # the held-out monitor's attention diagnostics, aligned with knn_steps
            out["attn_entropy"], out["attn_max_logit"] = self.attention["entropy"], self.attention["max_logit"]
        return out
