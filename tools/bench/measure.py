"""Measuring tools shared by the CPU and GPU benches: device sync, step timing, matmul peak, FLOP counting."""
from __future__ import annotations

import math
import statistics
import time

import torch

from replicate.core.config import RunConfig
from replicate.core.moco import SelfSupervisedViT

# the longest a child process (torch.compile, the plain reference's start-up) may take to answer
COMPILE_LIMIT_S = 120
aten = torch.ops.aten


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, warmup: int, steps: int, device: torch.device) -> dict:
    """Per-step wall times after ``warmup`` untimed steps; the median is robust to a shared, noisy machine."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"warmup_s": warm_s, "step_s": statistics.median(times), "steps": steps, "all_s": times}


def interleaved_ratio(base, variant, blocks: int, block_steps: int, device: torch.device) -> dict:
    """Median per-block ratio base/variant of step times, the two timed in alternating blocks (as §5)."""
    ratios, b_all, v_all = [], [], []
    for _ in range(blocks):
        b = statistics.median(time_steps(base, 0, block_steps, device)["all_s"])
        v = statistics.median(time_steps(variant, 0, block_steps, device)["all_s"])
        ratios.append(b / v)
        b_all.append(b)
        v_all.append(v)
    return {"base_step_s": statistics.median(b_all), "variant_step_s": statistics.median(v_all),
            "speedup": statistics.median(ratios)}


def matmul_peak(device: torch.device, reps: int = 5, dtype: torch.dtype | None = None, n: int | None = None) -> dict:
    """Best-of-``reps`` FLOP/s of one large matmul: fp32 2048² on CPU, bf16 8192² on CUDA (or ``dtype``, ``n``).
    Best-of rather than ``torch.utils.benchmark``'s mean: on a shared VM the fastest run is the peak."""
    n = n or (8192 if device.type == "cuda" else 2048)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return {"what": f"{str(dtype).removeprefix('torch.')} {n}x{n} matmul, best of {reps}",
            "flops_per_s": 2 * n ** 3 / best}


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter():
    """FlopCounterMode that also counts the CPU fused-attention kernels (torch only registers the CUDA ones)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
    })


def count_step_flops(cfg: RunConfig, batch: int | None = None) -> dict:
    """FLOPs per source image of one training step's model compute (query fwd+bwd on both views, momentum
    fwd, losses) and of one backbone forward (feature extraction), counted on the meta device: exact shapes, no
    arithmetic, so even ViT-H costs nothing. The optimizer step and augmentation are elementwise: no FLOPs here."""
    batch = batch or cfg.batch_size
    with torch.device("meta"):
        model = SelfSupervisedViT(cfg).train()
        x1 = torch.empty(batch, cfg.in_chans, cfg.image_size, cfg.image_size)
        x2 = torch.empty_like(x1)
    with flop_counter() as step:
        loss, _ = model(x1, x2, 0.99)
        loss.backward()
    with flop_counter() as fwd, torch.no_grad():
        model.backbone.eval()(x1)
    return {"train": step.get_total_flops() / batch, "forward": fwd.get_total_flops() / batch}


def flops_str(x: float) -> str:
    """A FLOP count or rate with an SI prefix (append "FLOP" or "FLOP/s")."""
    return f"{x / 1e12:.1f} T" if x >= 1e12 else f"{x / 1e9:.1f} G" if x >= 1e9 else f"{x / 1e6:.1f} M"
