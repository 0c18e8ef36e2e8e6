"""Atomic checkpoints (temp file + fsync + rename) that refuse to be used for a different run or when corrupt."""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch

from .config import RunConfig


def config_fingerprint(cfg: RunConfig) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]


def atomic_torch_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path, cfg: RunConfig, model, optimizer, monitor, step: int, wall_time_s: float) -> None:
    atomic_torch_save({
        "fingerprint": config_fingerprint(cfg), "step": step, "wall_time_s": wall_time_s,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "monitor": monitor.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }, path)


class CheckpointError(RuntimeError):
    pass


def load_checkpoint(path, cfg: RunConfig) -> dict:
    """Load a checkpoint written for exactly this config. A corrupt or foreign file is moved aside (never used)
    with a warning, and a CheckpointError tells the caller to start from scratch."""
    path = Path(path)
    reason = None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "fingerprint" not in state:
            reason = "not a checkpoint of this suite"
        elif state["fingerprint"] != config_fingerprint(cfg):
            reason = "written for a different configuration"
    except Exception as e:  # noqa: BLE001 - any unreadable file is treated the same way
        reason = f"unreadable ({type(e).__name__})"
    if reason:
        bad = path.with_suffix(path.suffix + ".bad")
        os.replace(path, bad)
        print(f"warning: checkpoint {path} is {reason}; moved to {bad.name}, starting from scratch",
              file=sys.stderr)
        raise CheckpointError(reason)
    return state
