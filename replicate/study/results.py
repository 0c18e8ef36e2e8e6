"""The results store: one JSON file per (profile, study, row, seed), written atomically.

Layout: ``<root>/<profile>/<spec file name>/<row>/seed<K>.json`` (e.g. ``results/reduced/05_position_embedding/
sincos/seed0.json``). Each file holds the metrics, the run's status, the fully resolved RunConfig, the monitor
curves, provenance (git commit, package versions, device, wall time) and, for a finished pretraining row, the name
of its backbone file ``seed<K>.backbone.pt`` beside it (``replicate.study.export``). A record is current only while its
stored config equals what its spec resolves to now (``config_changes``); the runner re-runs a row whose config
changed. Each study folder records which spec file owns it (``SPEC``), so two specs never share a folder.
A per-row lock file serialises two processes that run the same row, so concurrent table runs never corrupt
the store or train the same row twice.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy
import timm
import torch

from replicate.core.config import RunConfig, Setting
from replicate.runtime.atomic import atomic_open, atomic_write_text, create_exclusive
from replicate.runtime.checkpoint import NOT_FINGERPRINTED  # when a run saves, not what it computes
from replicate.runtime.hardware import cpu_info
from replicate.runtime.precision import BF16_RESULTS, cpu_matmul_precision, training_precision

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "results"
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


class UnreadableFile(ResultsError):
    """A file of the store that is not what it should be (truncated, binary, another layout); ``str(e)`` is one
    line naming it, why, and what to do."""

    def __init__(self, path: Path, why: str, fix: str):
        super().__init__(f"{path} is unreadable: {why}" + (f"; {fix}" if fix else ""))
        self.path, self.why = path, why


def record_problem(record) -> str | None:
    """Why a parsed result file is not a result record, or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a result record"
    for key, kind in (("config", dict), ("metrics", dict), ("provenance", dict), ("status", str), ("seed", int)):
        if record.get(key) is not None and not isinstance(record[key], kind):
            return f"its {key} is not a {kind.__name__}"
    metrics = record.get("metrics") or {}
    if any(isinstance(v, bool) or not isinstance(v, (int, float, type(None))) for v in metrics.values()):
        return "a metric is not a number"
    return None


def baselines_problem(record) -> str | None:
    """Why a parsed baselines.json is not one (``runner.compute_baselines``), or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not the baselines"
    for key, kind in (("raw_pixels", dict), ("random_backbone", dict), ("dataset", str), ("train_images", int),
                      ("test_images", int)):
        if not isinstance(record.get(key), kind):
            return f"no {key} in it"
    if not isinstance(record.get("depends_on", {}), dict):  # absent in files from before it was recorded
        return "its depends_on is not a mapping"
    return None


def read_json(path: Path, check, fix: str):
    """A JSON file of the store, checked by ``check`` (a reason or None); None if the file does not exist; an
    UnreadableFile (one line: the file, why, and ``fix``) if it cannot be read or is not what it should be."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        why = "binary, not JSON text"
    except json.JSONDecodeError as e:
        why = "empty" if not e.doc.strip() else f"not valid JSON (truncated? {e.msg} at line {e.lineno})"
    except OSError as e:
        why = f"cannot be read ({e.strerror})"
    else:
        why = check(data)
        if why is None:
            return data
    raise UnreadableFile(path, why, fix)


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


@functools.cache
def _field_defaults() -> dict:
    """Flattened defaults of RunConfig (and its Setting): a record written before a field existed ran with them."""
    from pydantic_core import PydanticUndefined


    out = {name: f.default for name, f in RunConfig.model_fields.items() if f.default is not PydanticUndefined}
    out.update({f"setting.{name}": f.default for name, f in Setting.model_fields.items()})
    return out


class CurrentConfigs:
    """The one "current or stale" decision: what ``spec``'s rows resolve to now under ``profile`` (a ``Profile``),
    each (row, seed) resolved once however many records ask, and whether a stored run was made with it."""

    def __init__(self, spec, profile):
        self.spec, self.profile = spec, profile
        self._configs: dict[tuple[str, int], RunConfig] = {}
        self._dumps: dict[tuple[str, int], dict] = {}

    def config(self, row, seed: int = 0) -> RunConfig:
        """``row`` resolved at the profile for ``seed``."""
        key = (row.name, seed)
        if key not in self._configs:
            self._configs[key] = self.profile.resolve(self.spec.setting(row), seed=seed)
        return self._configs[key]

    def now(self, row, seed: int = 0) -> dict:
        """The same as a record stores it (JSON types); callers must not modify it."""
        key = (row.name, seed)
        if key not in self._dumps:
            self._dumps[key] = self.config(row, seed).model_dump(mode="json")
        return self._dumps[key]

    def changes(self, record: dict, row) -> list[str]:
        """How ``record``'s stored config differs from what its row and seed resolve to now (``config_changes``); a
        row that no longer resolves at the profile (a user's spec edited since) differs in that, and nothing else."""
        try:
            now = self.now(row, record.get("seed", 0))
        except ValueError as e:  # profiles.ResolveError, or a config the resolved values fail
            return [f"the row does not resolve at profile {self.profile.name} now ({e})"]
        return config_changes(record.get("config"), now)

    def is_current(self, record: dict, row) -> bool:
        """Whether the stored run was made with the config ``row`` resolves to now; a record without a stored
        config is not."""
        return record.get("config") is not None and not self.changes(record, row)


def is_current(record: dict, spec, row, profile) -> bool:
    """``CurrentConfigs(spec, profile).is_current(record, row)``, for a single record."""
    return CurrentConfigs(spec, profile).is_current(record, row)


class StudyRecords:
    """A study's stored runs under one profile, read once per command and shared by whatever asks about them (the
    table, the README's counts, the docs' blocks): by row, the unreadable files by row, and ``current`` (None where
    the profile is not known here: then no run is judged stale)."""

    def __init__(self, spec, store: "ResultStore", profile=None):
        self.spec, self.store, self.profile = spec, store, profile
        self.records, self.unreadable = store.scan(spec.key)
        self.current = CurrentConfigs(spec, profile) if profile is not None else None

    @property
    def targets(self) -> tuple[str, ...] | None:
        """A transfer study's metrics: its profile's transfer targets (None where the profile is not known here)."""
        return self.profile.transfer_targets if self.profile is not None else None

    def shown(self) -> dict[str, list[dict]]:
        """The runs a study's table shows, per row: once a row's re-run has begun, only its runs made with the
        config the spec resolves to now (a mean never mixes two configs); a row with none shows its stale runs."""
        out = {row: list(recs) for row, recs in self.records.items()}
        if self.current is None:
            return out
        for row in self.spec.rows:
            current = [r for r in out.get(row.name, []) if self.current.is_current(r, row)]
            if current:
                out[row.name] = current
        return out

    def stale(self, records: dict[str, list[dict]] | None = None) -> dict[str, list[str]]:
        """Rows with a run (of ``records``, default ``shown()``) whose stored config is not what the spec resolves to
        now -> how it differs (first such run). Records without a stored config are not judged."""
        if self.current is None:
            return {}
        records = self.shown() if records is None else records
        out = {}
        for row in self.spec.rows:
            for rec in records.get(row.name, []):
                if rec.get("config") is not None and not self.current.is_current(rec, row):
                    out[row.name] = self.current.changes(rec, row)
                    break
        return out

    def current_finished(self, row) -> list[dict]:
        """``row``'s finished runs (``ok`` or ``diverged``) made with the config it resolves to now, by seed."""
        recs = [r for r in self.records.get(row.name, []) if r.get("status") in ("ok", "diverged")
                and self.current is not None and self.current.is_current(r, row)]
        return sorted(recs, key=lambda r: r["seed"])


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
        self._read: dict[Path, tuple[tuple[int, int, int], dict | None]] = {}  # find_same_run: file stamp, record

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
        """A finished row's final backbone (``replicate.study.export``), beside its result file; not committed."""
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
        """Record that spec file ``source`` owns ``<profile>/<table>``; refuse if another spec already does.

        The marker is created whole or not at all, and only if absent (a hard link of a complete temp file, which
        fails if the name exists), so of two specs racing for one folder exactly one claims it."""
        marker = self.profile_dir / table / "SPEC"
        if not marker.exists() and create_exclusive(marker, source + "\n"):
            return
        owner = self.spec_owner(marker, source)
        if owner != source:
            raise ResultsError(f"{marker.parent} holds the results of {owner}, not of {source}; rename your spec "
                               "file or pass --results DIR")

    @staticmethod
    def spec_owner(marker: Path, source: str) -> str:
        """The spec file a SPEC marker names; a damaged marker is one line saying how to repair it."""
        fix = (f"it should name the spec file that owns {marker.parent}: if that is {source}, write it there "
               f"(echo {source} > {marker}), else delete the folder or pass --results DIR")
        for attempt in range(3):
            try:
                data = marker.read_bytes()
            except OSError as e:
                raise ResultsError(f"SPEC marker {marker} cannot be read ({e.strerror}); {fix}") from None
            try:
                owner = data.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ResultsError(f"SPEC marker {marker} is binary, not a spec file's name; {fix}") from None
            if owner or attempt == 2:
                break
            time.sleep(0.2)  # created empty by O_EXCL on a filesystem without hard links: its writer is on it
        if not owner or "\n" in owner or "\x00" in owner:
            raise ResultsError(f"SPEC marker {marker} is {'empty' if not owner else 'not a single file name'}; {fix}")
        return owner

    def exists(self, table: str, row: str, seed: int) -> bool:
        """Whether the row has a readable record."""
        try:
            return self.load(table, row, seed) is not None
        except UnreadableFile:
            return False

    def load(self, table: str, row: str, seed: int) -> dict | None:
        """The row's record, None if it has none; an unreadable file is an ``UnreadableFile`` (never taken for a
        missing result in silence: the runner says it re-runs the row over it)."""
        return read_json(self.path(table, row, seed), record_problem,
                         "restore it (git checkout, a backup) or re-run its row with `replicate run`")

    def scan(self, table: str) -> tuple[dict[str, list[dict]], dict[str, list[UnreadableFile]]]:
        """(row name -> its readable seed records, any order; row name -> why each unreadable one is)."""
        out: dict[str, list[dict]] = {}
        bad: dict[str, list[UnreadableFile]] = {}
        tdir = self.profile_dir / table
        if not tdir.is_dir():
            return out, bad
        for f in sorted(tdir.glob("*/seed*.json")):
            try:
                record = read_json(f, record_problem, "restore it (git checkout, a backup) or re-run its row with "
                                                      "`replicate run`")
            except UnreadableFile as e:
                bad.setdefault(f.parent.name, []).append(e)
                continue
            if record is not None:
                out.setdefault(f.parent.name, []).append(record)
        return out, bad

    def save(self, table: str, row: str, seed: int, record: dict) -> Path:
        p = self.path(table, row, seed)
        atomic_write_text(p, json.dumps(record, indent=1, sort_keys=False) + "\n")
        return p

    @contextlib.contextmanager
    def lock(self, table: str, row: str, seed: int):
        """Hold the row's lock. A process that finds it held says, in one line, what it waits for and who holds it
        (the lock file names its holder), then waits: the holder may be a long row still running."""
        lock_path = self.profile_dir / ".locks" / f"{table}.{row}.seed{seed}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip()[:200] or "another process"
                print(f"waiting for {table}/{row} seed {seed}: {holder} is running it (lock {lock_path}); a stopped "
                      "holder keeps the lock until it ends", file=sys.stderr, flush=True)
                fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {platform.node()}\n")
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def table_records(self, table: str) -> dict[str, list[dict]]:
        """row name -> its readable seed records (any order; ``scan`` also says which files are not)."""
        return self.scan(table)[0]

    def find_same_run(self, config: dict, precision: str | None = None) -> dict | None:
        """A finished (status ok) pretraining record of this profile whose config equals ``config``, from any table.

        Studies share runs: every Sec. 6 ablation's reference row is the same ViT-B, 300-epoch default recipe. Such
        a row is the same experiment (on in-memory data bit for bit: tests/test_runner.py), so it is copied, not
        trained again. ``precision``: only a run that multiplied that way (``record_precision``)."""
        for f in sorted(self.profile_dir.glob("*/*/seed*.json")):
            rec = self._read_unchanged(f)
            if rec is None:
                continue
            # a transfer row stores its pretraining config too, but its metrics are fine-tuning accuracies
            if (rec.get("status") == "ok" and not config_changes(rec.get("config"), config)
                    and set(rec.get("metrics") or ()) == set(config["metrics"])
                    and precision in (None, record_precision(rec))):
                return rec
        return None

    def _read_unchanged(self, f: Path) -> dict | None:
        """``f``'s record, parsed again only if the file changed since this store last read it (a study asks once per
        row: without this, every row re-read every result of the profile); None for an unreadable one, which is
        another row's business (its run and render say so)."""
        try:
            st = f.stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # atomic writes replace the inode: a rewrite always shows
        if f not in self._read or self._read[f][0] != stamp:
            try:
                rec = read_json(f, record_problem, "")
            except UnreadableFile:
                rec = None
            self._read[f] = (stamp, rec)
        return self._read[f][1]

    def load_baselines(self) -> dict | None:
        """The profile's baselines, None if not computed yet; an unreadable file is an ``UnreadableFile``."""
        return read_json(self.profile_dir / "baselines.json", baselines_problem,
                         "`replicate run` of a pretraining study computes them again")

    def save_baselines(self, record: dict) -> None:
        atomic_write_text(self.profile_dir / "baselines.json", json.dumps(record, indent=1) + "\n")
