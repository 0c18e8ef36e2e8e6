"""Atomic checkpoints (temp file + fsync + rename) that refuse to be used for a different run or when corrupt.

Every file the suite reads back with torch (checkpoints, evaluation states, backbone files) goes through
``safe_load``: ``torch.load(weights_only=True)``, which rebuilds tensors and plain data (dicts, lists, tuples,
numbers, strings) and refuses any other Python object, so a file planted in a shared results folder cannot run
code. What the suite writes is plain data throughout (the numpy RNG state as a tensor, ``rng_states``).

A checkpoint holds everything the rest of a run depends on: model (online and momentum encoders, BN buffers),
optimizer state, the step (which fixes the lr/momentum schedules and, through ``TensorBatches``, the data and its
augmentation), the RNG states, the monitor's curves, kNN bank and not-yet-flushed stats, and the wall time so far.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from replicate.core.config import RunConfig
from replicate.runtime.atomic import atomic_open
from replicate.runtime.precision import step_precision

# Fields that change when a run saves, not what it computes: a different interval may resume a checkpoint.
NOT_FINGERPRINTED = {"checkpoint_every"}


def config_fingerprint(cfg: RunConfig, precision: str | None = None) -> str:
    """What a checkpoint must have been computed with to be resumed: the config and how this machine multiplies
    (``precision.step_precision``; default: this process's), so a row started in bf16 never resumes in fp32."""
    precision = precision or this_precision()
    what = cfg.model_dump_json(exclude=NOT_FINGERPRINTED) + f"|precision={precision}"
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def this_precision() -> str:
    """How this process's training steps multiply (``precision.step_precision``)."""
    return step_precision("cuda" if torch.cuda.is_available() else "cpu")


def safe_load(path):
    """``torch.load`` that cannot run code: tensors and plain data only (``weights_only=True``), on the CPU."""
    with warnings.catch_warnings():  # torch warns (several lines) about the pickle protocol of non-torch files
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def load_problem(e: BaseException) -> str:
    """Why ``safe_load`` failed, in a few words for a one-line message."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\.?\n|$)", text)
        detail = f" ({found.group(1).strip()})" if found else ""
        return f"unreadable: not a plain tensor file{detail}, so it was never unpickled"
    first = text.strip().splitlines()[0][:100] if text.strip() else ""
    return f"unreadable ({type(e).__name__}{': ' + first if first else ''})"


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def rng_states() -> dict:
    """Every RNG's state as plain data (``safe_load`` reads it): numpy's key as an int64 tensor, python's as the
    tuple of ints ``random.getstate`` gives."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(states["python"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- the suite's weight files: one envelope, one writer, one reader ------------------------------------------------
# Three kinds, one layout: {"format": FORMATS[kind], "fingerprint": <what the file must match, or None>, **payload}.
# - checkpoint: a pretraining run's everything (``save_checkpoint``), resumed by the trainer;
# - state: an evaluation's or a finished pretraining's state and RNGs (``evals.resume``), resumed after a crash;
# - backbone: a ViT's weights and the config that built it (a row's ``seed<K>.backbone.pt``, the transfer cache).
FORMATS = {"checkpoint": "replicate-checkpoint/1", "state": "replicate-state/1", "backbone": "replicate-backbone/1"}


class WeightsFileError(ValueError):
    """A weight file that cannot be used here; ``str(e)`` says why in a few words."""


def save_weights(path, kind: str, payload: dict, fingerprint: str | None = None) -> None:
    """Write one of the suite's weight files, atomically (a crash never leaves half a file under the final name)."""
    atomic_torch_save({"format": FORMATS[kind], "fingerprint": fingerprint, **payload}, path)


def load_weights(path, kind: str, required: set[str] = frozenset(), fingerprint: str | None = None) -> dict:
    """Read one of the suite's weight files (``safe_load``: plain data only) and check it: its kind, the keys its
    reader needs, and, when ``fingerprint`` is given, that it was written for exactly that run. Files written before
    the envelope (no ``format`` key) are accepted when they hold the keys. ``WeightsFileError`` says why not."""
    try:
        obj = safe_load(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is treated the same way
        raise WeightsFileError(load_problem(e)) from None
    if not isinstance(obj, dict) or obj.get("format", FORMATS[kind]) != FORMATS[kind] or not required <= obj.keys():
        raise WeightsFileError(f"not a {FORMATS[kind]} file of this suite")
    if fingerprint is not None and obj.get("fingerprint") != fingerprint:
        started = obj.get("precision")
        raise WeightsFileError(f"started with {started} matmuls, and this process multiplies in {this_precision()} "
                               f"($REPLICATE_CPU_MATMUL): a run must not mix them"
                               if started not in (None, this_precision()) else "written for a different configuration")
    return obj


def save_checkpoint(path, cfg: RunConfig, model, optimizer, monitor, step: int, wall_time_s: float) -> None:
    save_weights(path, "checkpoint", {
        "step": step, "wall_time_s": wall_time_s, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "monitor": monitor.state_dict(), "rng": rng_states(), "precision": this_precision(),
    }, config_fingerprint(cfg))


class CheckpointError(RuntimeError):
    pass


REQUIRED_KEYS = {"step", "wall_time_s", "model", "optimizer", "monitor", "rng"}


def load_checkpoint(path, cfg: RunConfig) -> dict:
    """Load a checkpoint written for exactly this config. A corrupt or foreign file is moved aside (never used)
    with a warning, and a CheckpointError tells the caller to start from scratch."""
    return load_verified(path, "checkpoint", config_fingerprint(cfg), REQUIRED_KEYS)


def load_verified(path, kind: str, fingerprint: str, required: set[str]) -> dict:
    """``load_weights`` for a file a run resumes from: one that fails is moved aside as ``<name>.bad`` with a
    warning, and a CheckpointError tells the caller to start from scratch."""
    path = Path(path)
    try:
        return load_weights(path, kind, required, fingerprint)
    except WeightsFileError as e:
        bad = path.with_suffix(path.suffix + ".bad")
        os.replace(path, bad)
        print(f"warning: checkpoint {path} is {e}; moved to {bad.name}, starting from scratch", file=sys.stderr)
        raise CheckpointError(str(e)) from None
