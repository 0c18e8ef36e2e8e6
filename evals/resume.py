"""Resumable evaluations: one state per file, saved at the end of an epoch and loaded again after a crash.

Each file is tagged with a fingerprint of what it was computed for (protocol, data, starting weights), so a state
is never resumed into a different run: a foreign or corrupt file is moved aside with a warning, as the pretraining
checkpoints are (``replicate.runtime.checkpoint.load_verified``). The file also holds every process's RNG states (torch,
CUDA, numpy, python), so the epochs after a resume draw what they would have drawn without the crash. Rank 0
writes, atomically; every process reads the same file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from replicate.core import distributed as D
from replicate.runtime.checkpoint import (
    CheckpointError,
    load_verified,
    rng_states,
    safe_load,
    save_weights,
    set_rng_states,
)

REQUIRED_KEYS = {"state", "rng"}


def fingerprint(**what) -> str:
    """A short hash of ``what`` (JSON-able values; anything else by its ``str``)."""
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_digest(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer: proves a frozen backbone was left bit-identical,
    and names the starting weights in a fingerprint."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_state(path: Path, tag: str, state: dict) -> None:
    """Write ``state`` with fingerprint ``tag`` and every process's RNG states; returns once the file is there."""
    rngs = D.gather_objects(rng_states())
    if D.is_main():
        save_weights(path, "state", {"state": state, "rng": rngs}, tag)
    D.barrier()


def load_state(path: Path | None, tag: str) -> dict | None:
    """The state saved at ``path`` for fingerprint ``tag`` (this process's RNG states restored), else None.

    Rank 0 validates the file (moving a foreign or corrupt one aside) and tells the others, so every process
    resumes from the same state or none does."""
    saved = None
    if D.is_main() and path is not None and Path(path).exists():
        try:
            saved = load_verified(path, "state", tag, REQUIRED_KEYS)
        except CheckpointError:
            saved = None
    if not D.broadcast_from_main(saved is not None):
        return None
    if saved is None:
        saved = safe_load(path)  # rank 0 found it valid
    if D.rank() < len(saved["rng"]):  # resumed on more processes than saved: the new ones keep their own draws
        set_rng_states(saved["rng"][D.rank()])
    return saved["state"]


def remove_state(path: Path | None) -> None:
    """Delete a finished evaluation's state (rank 0; the others never read it again)."""
    if path is not None and D.is_main():
        Path(path).unlink(missing_ok=True)
