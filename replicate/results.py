"""The results store: one JSON file per (profile, study, row, seed), written atomically.

Layout: ``<root>/<profile>/<spec file name>/<row>/seed<K>.json`` (e.g. ``results/reduced/05_position_embedding/
sincos/seed0.json``). Each file holds the metrics, the run's status, the fully resolved RunConfig, the monitor
curves, provenance (git commit, package versions, device, wall time) and, for a finished pretraining row, the name
of its backbone file ``seed<K>.backbone.pt`` beside it (``replicate.export``). A record is current only while its
stored config equals what its spec resolves to now (``config_changes``); the runner re-runs a row whose config
changed. Each study folder records which spec file owns it (``SPEC``), so two specs never share a folder.
A per-row lock file serialises two processes that run the same row, so concurrent table runs never corrupt
the store or train the same row twice.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from .atomic import atomic_open, atomic_write_text
from .checkpoint import NOT_FINGERPRINTED  # when a run saves, not what it computes
from .hardware import cpu_info

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "results"
# which results root the last `replicate run` used (the renderer's default); one small file, not committed
LAST_RUN_ENV = "REPLICATE_LAST_RUN"


class ResultsError(RuntimeError):
    pass


def run_results_root(root: str | Path | None) -> Path:
    """Where a run on this machine writes (and ``replicate export`` / ``evaluate`` look) without ``--results``:
    ``results/``, or ``results/cpu-bf16/`` for a CPU run with the opt-in bf16 matmuls (``REPLICATE_CPU_MATMUL=bf16``),
    whose results are kept apart from the fp32 ones (README, CPU precision)."""
    if root:
        return Path(root)
    import torch

    from .precision import BF16_RESULTS, cpu_matmul_precision

    if not torch.cuda.is_available() and cpu_matmul_precision() == "bf16":
        return DEFAULT_ROOT / BF16_RESULTS
    return DEFAULT_ROOT


def last_run_file() -> Path:
    return Path(os.environ.get(LAST_RUN_ENV) or DEFAULT_ROOT / ".last-run.json")


def remember_run(root: str | Path, profile: str, table: str) -> None:
    """Record the results root, profile and study of the run that just finished (``python -m replicate.render``
    defaults to that root). Best effort: a read-only checkout just has no memory."""
    try:
        atomic_write_text(last_run_file(), json.dumps({"results": str(Path(root).resolve()), "profile": profile,
                                                       "table": table}) + "\n")
    except OSError:
        pass


def last_run() -> dict | None:
    """What ``remember_run`` recorded, or None (never run here, or the folder is gone)."""
    try:
        rec = json.loads(last_run_file().read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and Path(str(rec.get("results"))).is_dir() else None


def record_precision(record: dict) -> str:
    """How a stored run's pretraining multiplied, in words (``precision.LABELS``; results from before provenance
    recorded it ran in fp32 on CPUs)."""
    return record.get("provenance", {}).get("precision", "fp32")




def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _field_defaults() -> dict:
    """Flattened defaults of RunConfig (and its Setting): a record written before a field existed ran with them."""
    from pydantic_core import PydanticUndefined

    from .config import RunConfig, Setting

    out = {name: f.default for name, f in RunConfig.model_fields.items() if f.default is not PydanticUndefined}
    out.update({f"setting.{name}": f.default for name, f in Setting.model_fields.items()})
    return out


def is_current(record: dict, spec, row, profile) -> bool:
    """Whether a stored run was made with the config that ``row`` of ``spec`` resolves to now under ``profile`` (a
    ``Profile``); a record without a stored config is not."""
    now = profile.resolve(spec.setting(row), seed=record.get("seed", 0)).model_dump(mode="json")
    return record.get("config") is not None and not config_changes(record["config"], now)


def config_changes(stored: dict | None, current: dict) -> list[str]:
    """How a record's stored config differs from the current one, as 'field: old -> new' (empty: same run).
    A field missing from the record counts as its default (the record predates the field)."""
    if not stored:
        return ["config: (not recorded) -> current"]
    a, b, defaults = _flatten(stored), _flatten(current), _field_defaults()
    for key, value in defaults.items():
        a.setdefault(key, value.value if hasattr(value, "value") else value)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in NOT_FINGERPRINTED or a.get(key) == b.get(key):
            continue
        old = a.get(key, "(absent)")
        new = b.get(key, "(absent)")
        out.append(f"{key}: {old} -> {new}")
    return out


def provenance(device: str) -> dict:
    import faiss
    import numpy
    import timm
    import torch

    from .precision import training_precision

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except Exception:  # noqa: BLE001 - provenance is best effort outside a git checkout
            return None

    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "packages": {"torch": torch.__version__, "timm": timm.__version__, "numpy": numpy.__version__,
                     "faiss": getattr(faiss, "__version__", "?")},
        "device": device,
        "cpu": cpu_info()[0],  # wall times only compare on the same CPU
        "cpu_threads": torch.get_num_threads(),
        "precision": training_precision(device.split(":")[0]),  # how pretraining multiplied (absent: fp32 on CPU)
        "host": platform.node(),
    }


class ResultStore:
    def __init__(self, root: str | Path | None, profile: str):
        self.root = Path(root) if root else DEFAULT_ROOT
        self.profile = profile

    @property
    def profile_dir(self) -> Path:
        return self.root / self.profile

    def row_dir(self, table: str, row: str) -> Path:
        return self.profile_dir / table / row

    def path(self, table: str, row: str, seed: int) -> Path:
        return self.row_dir(table, row) / f"seed{seed}.json"

    def checkpoint_path(self, table: str, row: str, seed: int) -> Path:
        return self.profile_dir / "ckpt" / table / row / f"seed{seed}.pt"

    def backbone_path(self, table: str, row: str, seed: int) -> Path:
        """A finished row's final backbone (``replicate.export``), beside its result file; not committed."""
        return self.row_dir(table, row) / f"seed{seed}.backbone.pt"

    def evaluation_path(self, name: str) -> Path:
        """The result of ``replicate evaluate`` on one checkpoint (outside every study's folder)."""
        return self.profile_dir / "evaluations" / f"{name}.json"

    def share_backbone(self, source: tuple[str, str, int], target: tuple[str, str, int]) -> bool:
        """Give a row that reuses another's result that row's backbone file too: a hard link (no second copy; a
        later re-run of either row replaces its own name only), else a copy. False if the source has none."""
        src, dst = self.backbone_path(*source), self.backbone_path(*target)
        if not src.exists() or src == dst:
            return src.exists()
        dst.unlink(missing_ok=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # a filesystem without hard links
            with open(src, "rb") as f, atomic_open(dst, "wb") as out:
                shutil.copyfileobj(f, out)
        return True

    def check_writable(self) -> None:
        """Fail early if results could not be written, without creating anything (bad input writes nothing)."""
        target = self.profile_dir
        existing = next(p for p in (target, *target.parents) if p.exists())
        try:
            if not existing.is_dir():
                raise NotADirectoryError(20, "not a folder")
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            raise ResultsError(f"results folder {target} is not writable ({existing}: {e.strerror}); "
                               "pass --results DIR to write elsewhere") from None

    def claim(self, table: str, source: str) -> None:
        """Record that spec file ``source`` owns ``<profile>/<table>``; refuse if another spec already does."""
        marker = self.profile_dir / table / "SPEC"
        try:
            owner = marker.read_text().strip()
        except FileNotFoundError:
            atomic_write_text(marker, source + "\n")
            return
        if owner != source:
            raise ResultsError(f"{marker.parent} holds the results of {owner}, not of {source}; rename your spec "
                               "file or pass --results DIR")

    def exists(self, table: str, row: str, seed: int) -> bool:
        return self.load(table, row, seed) is not None

    def load(self, table: str, row: str, seed: int) -> dict | None:
        p = self.path(table, row, seed)
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None  # a foreign/truncated file counts as missing; it is overwritten on the next run

    def save(self, table: str, row: str, seed: int, record: dict) -> Path:
        p = self.path(table, row, seed)
        atomic_write_text(p, json.dumps(record, indent=1, sort_keys=False) + "\n")
        return p

    @contextlib.contextmanager
    def lock(self, table: str, row: str, seed: int):
        lock_path = self.profile_dir / ".locks" / f"{table}.{row}.seed{seed}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def table_records(self, table: str) -> dict[str, list[dict]]:
        """row name -> its seed records (any order)."""
        out: dict[str, list[dict]] = {}
        tdir = self.profile_dir / table
        if not tdir.is_dir():
            return out
        for f in sorted(tdir.glob("*/seed*.json")):
            try:
                out.setdefault(f.parent.name, []).append(json.loads(f.read_text()))
            except json.JSONDecodeError:
                continue
        return out

    def find_same_run(self, config: dict, precision: str | None = None) -> dict | None:
        """A finished (status ok) pretraining record of this profile whose config equals ``config``, from any table.

        Studies share runs: every Sec. 6 ablation's reference row is the same ViT-B, 300-epoch default recipe. Such
        a row is the same experiment (on in-memory data bit for bit: tests/test_runner.py), so it is copied, not
        trained again. ``precision``: only a run that multiplied that way (``record_precision``)."""
        for f in sorted(self.profile_dir.glob("*/*/seed*.json")):
            try:
                rec = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            # a transfer row stores its pretraining config too, but its metrics are fine-tuning accuracies
            if (rec.get("status") == "ok" and not config_changes(rec.get("config"), config)
                    and set(rec.get("metrics") or ()) == set(config["metrics"])
                    and precision in (None, record_precision(rec))):
                return rec
        return None

    def load_baselines(self) -> dict | None:
        p = self.profile_dir / "baselines.json"
        return json.loads(p.read_text()) if p.exists() else None

    def save_baselines(self, record: dict) -> None:
        atomic_write_text(self.profile_dir / "baselines.json", json.dumps(record, indent=1) + "\n")
