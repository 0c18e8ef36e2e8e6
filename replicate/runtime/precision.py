"""CPU matmul precision: fp32 by default on every CPU; bf16 multiplies with fp32 accumulation as an explicit opt-in.

The paper trains with mixed precision (the official code autocasts to fp16; this suite autocasts to bf16 on GPUs).
On CPUs, ``torch.autocast`` costs more in casts than it saves at the reduced model's small shapes (the bench's
bf16-autocast row, docs/code-measurements.md); oneDNN's implicit down-conversion
(``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``) instead rounds the fp32 operands to bf16 inside the matmul
kernel and accumulates in fp32, so tensors, parameters, optimizer state and every elementwise op stay fp32: only the
products are bf16, as on a GPU's tensor cores.

PyTorch's CPU flash-attention kernel is many times slower under that setting at the reduced model's 17 tokens
(docs/code-measurements.md), so timm's attention runs unfused (q k^T, softmax, v as two batched matmuls, which then
also multiply in bf16).

``$REPLICATE_CPU_MATMUL``: ``bf16`` or ``fp32``; unset: fp32, on every CPU, so that results compare across CPUs
(the committed ``results/reduced/`` are fp32). ``bf16`` is worth it only where the CPU multiplies bf16 natively
(AMX or AVX512-BF16; elsewhere oneDNN emulates it, slowly); its results are kept apart: without ``--results`` a
bf16 CPU run writes under ``results/cpu-bf16/`` (``BF16_RESULTS``, used by the runner). CUDA runs are unaffected
(they autocast).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from replicate.runtime.hardware import cpu_info

ENV = "REPLICATE_CPU_MATMUL"
CHOICES = ("bf16", "fp32")
DEFAULT = "fp32"
BF16_RESULTS = "cpu-bf16"  # the results root's sub-folder that bf16 CPU runs default to (README, CPU precision)
# how a training step multiplies, in words (provenance.precision, rendered tables, the bench report)
LABELS = {"bf16": "bf16 matmul, fp32 accumulate", "fp32": "fp32", "bf16 autocast": "bf16 autocast"}


class PrecisionError(ValueError):
    """A bad ``$REPLICATE_CPU_MATMUL``."""


def cpu_has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_info()[1])


def cpu_matmul_precision() -> str:
    """``bf16`` or ``fp32``: ``$REPLICATE_CPU_MATMUL``, else fp32 (the default on every CPU: comparable results)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value == "":
        return DEFAULT
    if value not in CHOICES:
        raise PrecisionError(f"${ENV}={value!r}: expected one of {', '.join(CHOICES)} (or unset for the default, "
                             f"{DEFAULT})")
    return value


@functools.cache
def bf16_matmuls_take_effect() -> bool:
    """Whether this CPU and torch build honour ``fp32_precision = "bf16"`` for a Linear layer. Not every one does:
    on a Zen 4 EPYC (AVX512-BF16) with torch 2.14.1, a Linear multiplied in fp32 bit for bit under it."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 96, generator=g), torch.randn(96, 96, generator=g)
    previous = torch.backends.mkldnn.matmul.fp32_precision
    exact = F.linear(x, w)
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        rounded = F.linear(x, w)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous
    return not torch.equal(exact, rounded)


def check_cpu_precision() -> None:
    """Before a CPU run: a bad ``$REPLICATE_CPU_MATMUL`` is refused, and so is bf16 where it would not take effect
    (the run would multiply in fp32 and be labelled bf16)."""
    if cpu_matmul_precision() == "bf16" and not torch.cuda.is_available() and not bf16_matmuls_take_effect():
        raise PrecisionError(f"${ENV}=bf16: this CPU and torch build ignore bf16 matmuls (a test Linear multiplied in "
                             f"fp32, bit for bit), so the runs would be fp32 labelled bf16; unset {ENV}")


def step_precision(device_type: str) -> str:
    """How a training step multiplies: ``bf16 autocast`` on CUDA, else the CPU matmul precision (bf16 / fp32)."""
    return "bf16 autocast" if device_type == "cuda" else cpu_matmul_precision()


def training_precision(device_type: str) -> str:
    """``step_precision`` in words, as provenance records it."""
    return LABELS[step_precision(device_type)]


@contextmanager
def cpu_bf16_matmuls(model: nn.Module, device: torch.device, enabled: bool | None = None) -> Iterator[bool]:
    """Within the block, CPU matmuls of ``model`` multiply in bf16 (fp32 accumulate) and its timm attention runs
    unfused; both are restored on exit. Yields whether bf16 is on. No-op on CUDA or when the precision is fp32."""
    on = device.type == "cpu" and (cpu_matmul_precision() == "bf16" if enabled is None else enabled)
    if not on:
        yield False
        return
    attention = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    fused = [m.fused_attn for m in attention]
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    for m in attention:
        m.fused_attn = False
    try:
        yield True
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous
        for m, f in zip(attention, fused):
            m.fused_attn = f
