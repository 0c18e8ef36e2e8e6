"""torch.distributed helpers: torchrun-style init, rank queries and gathers that also work with one process."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dfn
from torch import nn

# torch.distributed.nn.functional is deprecated in favour of the private _functional_collectives, whose backward
# needs explicit waits; the public autograd collectives still work and are what this module uses.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_", category=FutureWarning)


class LaunchError(ValueError):
    """A run that cannot start as launched (world size, environment knobs); shown as a one-line error."""


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


PEER_TIMEOUT_ENV = "REPLICATE_PEER_TIMEOUT"


def peer_timeout() -> timedelta | None:
    """``$REPLICATE_PEER_TIMEOUT`` (seconds): how long a process waits for the others in a collective before the run
    ends with an error (a stopped or hung rank); unset: torch's default (30 minutes for gloo, 10 for NCCL)."""
    value = os.environ.get(PEER_TIMEOUT_ENV, "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise LaunchError(f"${PEER_TIMEOUT_ENV}={value!r}: expected a number of seconds > 0")
    return timedelta(seconds=seconds)


def peer_failure(e: BaseException) -> str | None:
    """A one-line message if ``e`` is a collective that failed because another process stopped, crashed or timed
    out (torchrun runs only), else None."""
    if not is_dist():
        return None
    text = str(e)
    lowered = text.lower()
    signs = ("timed out", "timeout", "connection closed by peer", "connection reset by peer", "broken pipe")
    if not (isinstance(e, getattr(dist, "DistError", ())) or any(s in lowered for s in signs)):
        return None
    limit = peer_timeout()
    waited = f"{limit.total_seconds():g} s (${PEER_TIMEOUT_ENV})" if limit else f"torch's default (set ${PEER_TIMEOUT_ENV})"
    first = text.strip().splitlines()[0][:160] if text.strip() else type(e).__name__
    return (f"rank {rank()}: another process of this run stopped answering (waited at most {waited}: {first}); "
            "finished rows are kept, run the command again")


def init_from_env() -> torch.device:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK); plain single process otherwise.

    NCCL when CUDA is present, gloo on CPU, so the same command scales from a laptop to many nodes. Idempotent.
    A collective waits at most ``peer_timeout()`` for the other processes, then fails (``peer_failure``).
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_dist():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=peer_timeout())
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown() -> None:
    if is_dist():
        dist.destroy_process_group()


WAIT_NOTICE_S = 60.0  # a process still waiting for the others after this long says so, once


@contextmanager
def announced_wait(what: str, after_s: float | None = None) -> Iterator[None]:
    """Within the block this process waits for ``what``; if the block lasts longer than ``after_s`` seconds
    (``WAIT_NOTICE_S``), one line on stderr says what it waits for and how long it will, so a stopped peer is never
    a silent hang. The notice comes from a timer thread: the wait itself is untouched."""
    limit = peer_timeout()
    until = f"{limit.total_seconds():g} s (${PEER_TIMEOUT_ENV})" if limit else f"torch's default (${PEER_TIMEOUT_ENV})"
    delay = WAIT_NOTICE_S if after_s is None else after_s
    timer = threading.Timer(delay, lambda: print(
        f"rank {rank()}: waiting for {what} ({delay:g} s so far; a stopped process ends the run after {until})",
        file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def barrier(what: str = "the other processes") -> None:
    if is_dist():
        with announced_wait(what):
            dist.barrier()


def broadcast_from_main(obj, what: str = "rank 0"):
    """Rank 0's ``obj`` on every process (decisions that must agree: skip a row, trust a checkpoint); the others say
    what they wait for when rank 0 takes long (``announced_wait``)."""
    if not is_dist():
        return obj
    box = [obj]
    with announced_wait(what) if not is_main() else contextlib.nullcontext():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0 (the official ``concat_all_gather``)."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather that back-propagates into every process's slice (needed by SimCLR's negatives)."""
    if not is_dist():
        return x
    return torch.cat(dfn.all_gather(x.contiguous()))


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_dist():
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if is_dist():
        x = x.clone()
        dist.all_reduce(x)
        x /= world_size()
    return x


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Global-batch BatchNorm for gloo runs on CPU, where torch's SyncBatchNorm refuses to run (and DDP refuses
    CPU modules that contain one). The batch sum and centred sum of squares go through differentiable
    all-reduces, whose backward sums the statistics' gradients over processes, as torch's CUDA kernel does.
    Outside distributed training (eval, one process) it is plain BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        totals = dfn.all_reduce(torch.cat([x.sum(dims), x.new_tensor([x.numel() // x.shape[1]])]))
        count, mean = totals[-1], totals[:-1] / totals[-1]
        centred = x - mean.view(shape)
        var = dfn.all_reduce((centred * centred).sum(dims)) / count  # biased, as batch norm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, f)
                self.running_var.lerp_(var * count / (count - 1), f)  # unbiased, as torch stores it
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm (heads, ViT-BN blocks, the momentum encoder's copies) computes global-batch statistics,
    as the official code's ``convert_sync_batchnorm``: torch's SyncBatchNorm on GPUs, ``CPUSyncBatchNorm`` on CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.__class__ = CPUSyncBatchNorm  # same parameters and buffers, only forward differs: keys unchanged
    return module
