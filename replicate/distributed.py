"""torch.distributed helpers: torchrun-style init, rank queries and gathers that also work with one process."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> torch.device:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK); plain single process otherwise.

    NCCL when CUDA is present, gloo on CPU, so the same command scales from a laptop to many nodes.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_dist():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    import torch.distributed.nn.functional as dfn

    return torch.cat(dfn.all_gather(x.contiguous()))


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if is_dist():
        x = x.clone()
        dist.all_reduce(x)
        x /= world_size()
    return x
