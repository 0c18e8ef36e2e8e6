"""The plain reference: Algorithm 1 of the paper written straightforwardly, the baseline the suite is timed against.

Deliberately independent of the suite's model, heads, loss and loop (only the data recipe's PIL transforms are
shared, so that both train on the same augmentation): per-image PIL views in a DataLoader, eager timm ViT, the
official ``_build_mlp`` heads, python-loop momentum update, ``F.cross_entropy`` loss, AdamW.
"""
from __future__ import annotations

import copy
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from replicate.core.config import RunConfig
from replicate.core.data import channel_stats

from .measure import COMPILE_LIMIT_S, sync


class PlainTwoViewDataset(torch.utils.data.Dataset):
    """Per-image PIL augmentation, as a straightforward Algorithm 1 would load data: for RGB images the official
    ``main_moco.py`` pipeline (the suite's paper path), for 28x28 grayscale its one-channel adaptation."""

    def __init__(self, images_u8: np.ndarray, cfg: RunConfig, length: int | None = None, two_views=None):
        from PIL import ImageFilter, ImageOps
        from torchvision import transforms as T

        from replicate.core.augment import two_view_pil_transforms

        self.images, self.length, self.two_views = images_u8, length or len(images_u8), two_views
        if two_views is not None:  # another per-image pipeline (the suite's crops-only one, in the GPU bench)
            return
        if cfg.in_chans == 3:
            self.two_views = two_view_pil_transforms(cfg.image_size, cfg.crop_min)
            return
        lo, hi = cfg.blur_sigma

        def blur(img):
            return img.filter(ImageFilter.GaussianBlur(radius=float(np.random.uniform(lo, hi))))

        mean, std = channel_stats(cfg.dataset, cfg.image_size)
        common = [T.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_min, 1.0)),
                  T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8)]
        tail = [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
        view1 = T.Compose(common + [T.Lambda(blur)] + tail)
        view2 = T.Compose(common + [T.RandomApply([T.Lambda(blur)], p=0.1),
                                    T.RandomApply([T.Lambda(ImageOps.solarize)], p=0.2)] + tail)
        self.two_views = lambda img: (view1(img), view2(img))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        from PIL import Image

        return self.two_views(Image.fromarray(self.images[i % len(self.images)]))  # (H, W) -> "L", (H, W, 3) -> RGB


def plain_images(cfg: RunConfig, n: int) -> np.ndarray:
    """Random uint8 source images: the dataset's size for 28² grayscale, 256² (a decoded, resized ImageNet JPEG's
    scale) for RGB."""
    shape = (cfg.image_size, cfg.image_size) if cfg.in_chans == 1 else (256, 256, 3)
    return np.random.default_rng(0).integers(0, 256, (n, *shape), np.uint8)


def endless(loader):
    """A DataLoader's batches without end: a new epoch starts when one runs out."""
    while True:
        yield from loader


def plain_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """The official moco-v3 ``_build_mlp``, verbatim in structure."""
    mlp = []
    for layer in range(num_layers):
        dim1 = input_dim if layer == 0 else mlp_dim
        dim2 = output_dim if layer == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if layer < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


class PlainStep:
    """Algorithm 1 of the paper written plainly: DataLoader of PIL views, eager timm ViT, loop momentum update.
    ``amp``: bf16 autocast, as the official code's AMP (used on GPU, where the suite autocasts too)."""

    def __init__(self, cfg: RunConfig, device: torch.device, num_workers: int, amp: bool = False,
                 pool: int | None = None):
        import timm

        torch.manual_seed(0)
        self.cfg, self.device, self.m, self.tau, self.amp = cfg, device, 0.99, cfg.setting.temperature, amp
        base = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=cfg.image_size,
                                 patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
                                 depth=cfg.depth, num_heads=cfg.num_heads)
        self.f_q = nn.Sequential(base, plain_mlp(3, cfg.embed_dim, cfg.head_hidden, cfg.head_out)).to(device)
        self.predictor = plain_mlp(2, cfg.head_out, cfg.head_hidden, cfg.head_out).to(device)
        self.f_k = copy.deepcopy(self.f_q)
        for p in self.f_k.parameters():
            p.requires_grad = False
        params = [*self.f_q.parameters(), *self.predictor.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # 64 batches: no epoch ends within the bench (~45 steps). An epoch's last steps run with the DataLoader
        # worker idle (nothing left to prefetch), i.e. uncontended and unrepresentatively fast.
        length = 64 * cfg.batch_size
        dataset = PlainTwoViewDataset(plain_images(cfg, min(length, pool or length)), cfg, length)
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                             num_workers=num_workers, persistent_workers=num_workers > 0,
                                             pin_memory=device.type == "cuda",
                                             # Linux's default, also inside the bench's spawned child
                                             multiprocessing_context="fork" if num_workers and
                                             sys.platform.startswith("linux") else None)
        self.batches = endless(loader)

    def ctr(self, q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", q, k) / self.tau
        return F.cross_entropy(logits, torch.arange(len(q), device=q.device)) * 2 * self.tau

    def model_step(self, x1: torch.Tensor, x2: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            q1, q2 = self.predictor(self.f_q(x1)), self.predictor(self.f_q(x2))
            with torch.no_grad():
                for p_k, p_q in zip(self.f_k.parameters(), self.f_q.parameters()):
                    p_k.data = p_k.data * self.m + p_q.data * (1.0 - self.m)
                k1, k2 = self.f_k(x1), self.f_k(x2)
            loss = self.ctr(q1, k2) + self.ctr(q2, k1)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def __call__(self) -> None:
        x1, x2 = next(self.batches)
        self.model_step(x1.to(self.device), x2.to(self.device))


def _plain_worker_main(conn, cfg_json: str, num_workers: int, warmup: int, device: str) -> None:
    """Child process: build the plain reference, then time ``n`` steps whenever the parent sends ``n``."""
    try:
        step = PlainStep(RunConfig.model_validate_json(cfg_json), torch.device(device), num_workers)
        for _ in range(warmup):
            step()
        conn.send("ready")
        while (request := conn.recv())[0] > 0:
            n, untimed = request
            for _ in range(untimed):
                step()
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                step()
                sync(torch.device(device))
                times.append(time.perf_counter() - t0)
            conn.send(times)
    except EOFError:  # the parent went away
        pass
    except Exception as e:  # noqa: BLE001 -- reported to the parent as one line
        conn.send(f"{type(e).__name__}: {e}")


class PlainWorker:
    """The plain reference in a fresh process of its own (default allocator and settings, none of the suite's),
    driven step by step over a pipe so that its steps interleave with the suite's on the same machine state."""

    def __init__(self, cfg: RunConfig, num_workers: int, warmup: int, device: torch.device):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.num_workers = num_workers
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_plain_worker_main, daemon=False,  # its DataLoader may start workers
                                args=(child, cfg.model_dump_json(), num_workers, warmup, str(device)))
        self.proc.start()
        self._receive()

    def _receive(self):
        if not self.conn.poll(COMPILE_LIMIT_S):
            raise RuntimeError(f"the plain reference process gave no answer in {COMPILE_LIMIT_S} s")
        msg = self.conn.recv()
        if isinstance(msg, str) and msg != "ready":
            raise RuntimeError(f"plain reference failed: {msg}")
        return msg

    def steps(self, n: int, untimed: int = 0) -> list[float]:
        """Times of ``n`` steps after ``untimed`` ones. With DataLoader workers, the first steps after an idle spell
        eat batches prefetched off the clock; untimed steps first measure the steady state instead."""
        self.conn.send((n, untimed))
        return self._receive()

    def close(self) -> None:
        try:
            self.conn.send((0, 0))
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
