"""Run a study: every (row, seed) of a spec at one profile -> pretrain -> evaluate -> one result file each."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from evals.features import extract_features, extract_loader_features, pixel_features
from evals.knn import knn_accuracy
from evals.linear import linear_probe_cached, linear_probe_paper, probe_bf16
from evals.loaders import imagenet_knn_loaders, imagenet_linear_loaders
from evals.resume import load_state, remove_state, save_state
from replicate.core import distributed as D
from replicate.core.config import RunConfig, Setting
from replicate.core.data import (
    count_folder_images,
    imagenet_folder,
    is_tensor_dataset,
    load_tensor_dataset,
    pretraining_split,
)
from replicate.core.moco import SelfSupervisedViT
from replicate.core.model import build_vit
from replicate.runtime.atomic import remove_leftovers
from replicate.runtime.checkpoint import config_fingerprint
from replicate.runtime.instability import summarize
from replicate.runtime.precision import BF16_RESULTS, DEFAULT, ENV, LABELS, training_precision
from replicate.runtime.trainer import PretrainResult, pretrain
from replicate.study.export import keep_backbone, read_backbone_file
from replicate.study.finetune_row import run_finetune_row
from replicate.study.profiles import Profile
from replicate.study.results import (
    CurrentConfigs,
    ResultsError,
    ResultStore,
    UnreadableFile,
    config_changes,
    provenance,
    record_precision,
    run_results_root,
)
from replicate.study.spec import Row, Spec, SpecError, check_batch_fits, check_profile
from replicate.study.transfer_row import run_transfer_row


def log(msg: str) -> None:
    if D.is_main():
        print(msg, file=sys.stderr, flush=True)


def eval_splits(cfg: RunConfig, data_root: str | None):
    train = pretraining_split(cfg, data_root)
    test = load_tensor_dataset(cfg.dataset, "test", data_root, cfg.image_size).without_classes(cfg.exclude_classes)
    return train, test


def score_features(cfg: RunConfig, train_feats, train_labels, test_feats, test_labels) -> dict[str, float]:
    out = {}
    if "knn" in cfg.metrics:
        out["knn"] = knn_accuracy(train_feats, train_labels, test_feats, test_labels, cfg.knn_k, cfg.knn_t)
    if "linear" in cfg.metrics:
        out["linear"] = linear_probe_cached(train_feats, train_labels, test_feats, test_labels,
                                            cfg.linear_epochs, cfg.linear_batch, cfg.linear_base_lr, cfg.seed)
    return out


def evaluate_backbone(cfg: RunConfig, backbone, data_root: str | None, progress: bool = True,
                      probe_ckpt: Path | None = None) -> dict[str, float]:
    """The profile's metrics for a pretrained backbone (frozen, eval mode). In-memory data: kNN and the cached
    probe, on the calling process. ImageFolder data, which every process under torchrun must call (each gets the
    metrics): kNN on features extracted sharded and gathered (DINO's ``eval_knn.py``; faiss, on the GPU when
    faiss-gpu is there), and the official linear probe (``linear`` after the last epoch, ``linear_best``), which
    checkpoints every epoch to ``probe_ckpt`` and resumes from it."""

    device = next(backbone.parameters()).device
    if is_tensor_dataset(cfg.dataset):
        train, test = eval_splits(cfg, data_root)
        ftr, ytr = extract_features(backbone, train, cfg.dataset, device=device)
        fte, yte = extract_features(backbone, test, cfg.dataset, device=device)
        return score_features(cfg, ftr, ytr, fte, yte)

    out = {}
    if "knn" in cfg.metrics:
        train, val = (extract_loader_features(backbone, loader, device) for loader in imagenet_knn_loaders(cfg, data_root))
        out["knn"] = D.broadcast_from_main(knn_accuracy(*train, *val, cfg.knn_k, cfg.knn_t) if D.is_main() else None,
                                           "rank 0's kNN evaluation")
    if "linear" in cfg.metrics:
        train_loader, val_loader = imagenet_linear_loaders(cfg, data_root)
        out.update(linear_probe_paper(backbone, cfg.embed_dim, cfg.num_classes, train_loader, val_loader,
                                      cfg.linear_epochs, cfg.linear_batch, cfg.linear_base_lr, device, progress,
                                      seed=cfg.seed, amp=probe_bf16(), ckpt_path=probe_ckpt))
    return out


def baseline_key(cfg: RunConfig) -> dict:
    """What the baselines depend on: the evaluation split and the random backbone's shape."""
    return {k: getattr(cfg, k) for k in ("dataset", "image_size", "train_subset", "embed_dim", "depth", "num_heads",
                                         "patch_size", "knn_k", "knn_t", "linear_epochs")}


def compute_baselines(cfg: RunConfig, data_root: str | None) -> dict:
    """kNN/linear on raw pixels and on a randomly initialised backbone (``cfg``: the reference row's), same splits."""
    train, test = eval_splits(cfg, data_root)
    torch.manual_seed(0)
    rand = build_vit(cfg)
    return {
        "dataset": cfg.dataset, "train_images": len(train), "test_images": len(test),
        "raw_pixels": score_features(cfg, *pixel_features(train), *pixel_features(test)),
        "random_backbone": score_features(cfg, *extract_features(rand, train, cfg.dataset),
                                          *extract_features(rand, test, cfg.dataset)),
        "random_backbone_arch": f"{cfg.embed_dim}w x {cfg.depth} blocks, patch {cfg.patch_size}",
        "depends_on": baseline_key(cfg),
    }


def pretrain_kept(cfg: RunConfig, data_root: str | None, ckpt: Path, kept: Path | None,
                  progress: bool = True) -> PretrainResult:
    """``pretrain``, or the finished pretraining kept at ``kept`` by an earlier attempt of this row.

    ImageFolder rows keep their finished pretraining until evaluated: the long linear probe's checkpoint names this
    exact backbone, so a crash in the probe resumes the probe instead of pretraining again (``pretrain`` does not
    checkpoint its last steps, and re-running them on a GPU gives other weights)."""

    tag = config_fingerprint(cfg)
    saved = load_state(kept, tag) if kept is not None else None
    if saved is not None:
        model = SelfSupervisedViT(cfg).to(D.init_from_env())
        model.load_state_dict(saved.pop("model"))
        return PretrainResult(model=model, **{**saved, "resumed_s": saved["wall_time_s"]})  # all of it before
    result = pretrain(cfg, data_root, ckpt, progress)
    if kept is not None and result.status == "ok":
        save_state(kept, tag, {**vars(result), "model": result.model.state_dict()})
    return result


def run_row(spec: Spec, row: Row, profile: Profile, seed: int, store: ResultStore, data_root: str | None,
            progress: bool = True) -> dict:
    cfg = profile.resolve(spec.setting(row), seed=seed)
    t0 = time.perf_counter()
    record: dict = {"table": spec.key, "row": row.name, "seed": seed, "profile": profile.name}
    if spec.kind == "transfer":
        metrics = run_transfer_row(cfg, profile, data_root, store.checkpoint_path(spec.key, row.name, seed),
                                   progress)
        record.update(status="ok", metrics=metrics, curves=None)
    elif spec.kind == "finetune":
        # "_backbone": the pretrained ViT (None from scratch), kept by run_table like a pretraining row's
        record.update(run_finetune_row(cfg, profile, data_root, store, store.checkpoint_path(spec.key, row.name, seed),
                                       progress))
    else:
        ckpt, folder = store.checkpoint_path(spec.key, row.name, seed), not is_tensor_dataset(cfg.dataset)
        kept = ckpt.with_suffix(".pretrained.pt") if folder else None
        result = pretrain_kept(cfg, data_root, ckpt, kept, progress)
        record.update(status=result.status, diverged_at=result.diverged_at, iterations=result.iterations,
                      pretrain_s=round(result.wall_time_s, 1), curves=result.monitor)
        record["_pretrained_before_s"] = result.resumed_s  # run_table names it in the finish line, then pops it
        record["instability"] = summarize(result.monitor)
        record["_backbone"] = result.model.backbone  # run_table keeps it (replicate.study.export) and pops the key
        # ImageFolder rows: every process runs the probe on its share of the data; in-memory rows: rank 0 alone
        metrics = {}
        if result.status == "ok" and (folder or D.is_main()):
            metrics = evaluate_backbone(cfg, result.model.backbone, data_root, progress,
                                        probe_ckpt=ckpt.with_suffix(".probe.pt") if folder else None)
        record["metrics"] = metrics if D.is_main() else {}
        if folder:
            record["probe_precision"] = "bf16" if probe_bf16() and torch.cuda.is_available() else "fp32"
        if kept is not None:
            remove_state(kept)
    device = "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    record.update(wall_time_s=round(time.perf_counter() - t0, 1), config=cfg.model_dump(mode="json"),
                  provenance=provenance(device))
    return record


def backbone_readable(store: ResultStore, twin: dict, log, head: str) -> bool:
    """Whether a twin's backbone file can be shared as it is: a damaged one is said now, once, and not linked to a
    second name (the reused result then keeps no backbone; re-running the twin writes it again)."""
    path = store.backbone_path(twin["table"], twin["row"], twin["seed"])
    if not path.exists():
        return False
    try:
        read_backbone_file(path, f"re-run {twin['table']} row {twin['row']} with --force")
    except ResultsError as e:
        log(f"{head}: warning: {e}; this row's reused result keeps no backbone file")
        return False
    return True


def check_inputs(current: CurrentConfigs, data_root: str | None) -> None:
    """Everything a run reads must be there before anything is written: a DataError here leaves no trace, nor does
    a row whose batch exceeds the data (an ImageFolder is counted only as far as the largest batch). ``current``:
    the study's rows as the run resolves them."""
    spec, profile = current.spec, current.profile
    cfg = current.config(spec.row(spec.reference))

    def batch_of(row) -> int:
        return current.config(row).batch_size

    if is_tensor_dataset(cfg.dataset):
        check_batch_fits(spec, profile, batch_of, len(pretraining_split(cfg, data_root)))
    else:
        train, _ = imagenet_folder(data_root, "train"), imagenet_folder(data_root, "val")
        largest = max(batch_of(row) for row in spec.rows)
        check_batch_fits(spec, profile, batch_of, count_folder_images(train, at_most=largest))


# the README's line on CPU precision, named by the refusal below
PRECISION_README = (f"README, 'CPU precision': CPU runs multiply in {DEFAULT} unless {ENV}=bf16, whose results go to "
                    f"results/{BF16_RESULTS}/ when no --results is given")


def check_precision(current: CurrentConfigs, store: ResultStore, precision: str) -> None:
    """Refuse to add runs that multiply in ``precision`` to a study whose current rows multiplied otherwise: a
    study's deltas must not mix bf16 and fp32 pretraining. Without ``--results`` the two never meet (bf16 CPU runs
    default to ``results/cpu-bf16/``, ``run_results_root``); this guards an explicit ``--results`` folder (and a GPU
    run's bf16 autocast beside CPU runs). ``current``: the study's rows as they resolve now."""
    spec = current.spec
    records = store.table_records(spec.key)
    other = {}
    for row in spec.rows:
        for rec in records.get(row.name, []):
            if current.is_current(rec, row) and record_precision(rec) != precision:
                other.setdefault(record_precision(rec), []).append(f"{row.name}/seed{rec.get('seed', 0)}")
    if other:
        theirs, runs = next(iter(other.items()))
        match = {LABELS["fp32"]: f"unset {ENV} (or {ENV}=fp32)", LABELS["bf16"]: f"{ENV}=bf16"}.get(theirs)
        raise ResultsError(
            f"{store.profile_dir / spec.key}: {len(runs)} stored run(s) ({', '.join(runs[:3])}"
            f"{', ...' if len(runs) > 3 else ''}) pretrained in {theirs}, this run would pretrain in {precision}: a "
            f"study must not mix them ({PRECISION_README}). To match, "
            f"{'run with ' + match if match else 'run on the same kind of device'}; or pass another --results DIR")


def run_table(spec: Spec, profile: Profile, seeds: int | Sequence[int] = 1, force: bool = False,
              data_root: str | None = None, results_root=None, progress: bool = True,
              keep_stale: bool = False, rows: Sequence[str] | None = None) -> ResultStore:
    """Run every (row, seed) that has no current result. A stored result is current while its resolved config
    equals what the spec resolves to now; otherwise the row is re-run (``keep_stale``: kept, and the renderer marks
    it stale), and the log names the fields that changed. ``rows``: only these (by name), in table order."""
    check_profile(spec, profile)  # every row resolves at this profile (a SpecError names row and key)
    if rows is not None and not rows:
        raise SpecError("--rows names no row (give row names, comma-separated; `replicate show` lists them)")
    wanted = {spec.row(name).name for name in rows} if rows is not None else None  # a SpecError names the rows
    D.init_from_env()  # under torchrun, join the group first: rank-0-only writing and the row lock need ranks
    precision = training_precision("cuda" if torch.cuda.is_available() else "cpu")
    if results_root is None and precision == LABELS["bf16"] and D.is_main():
        log(f"[{profile.name}] {ENV}=bf16: results go to {run_results_root(None)}, apart from the fp32 ones "
            "(README, CPU precision)")
    store = ResultStore(run_results_root(results_root), profile.name)
    current = CurrentConfigs(spec, profile)  # each (row, seed) resolved once for the whole run
    if D.is_main():
        store.check_writable()
        check_inputs(current, data_root)
        if not force:
            check_precision(current, store, precision)
        store.claim(spec.key, spec.source)
    baselines = None
    if D.is_main():
        try:
            baselines = store.load_baselines()
        except UnreadableFile as e:  # derived data: computed again below, and said so
            log(f"[{profile.name}] baselines {e.path} unreadable ({e.why}): computing them again")
    reference = current.config(spec.row(spec.reference))  # resolved once: baselines, their key, the inputs check
    now = baseline_key(reference)
    if (spec.kind == "pretrain" and is_tensor_dataset(profile.dataset) and D.is_main()
            and (baselines is None or baselines.get("depends_on") != now)):
        log(f"[{profile.name}] computing baselines (raw pixels, random backbone) ...")
        store.save_baselines(compute_baselines(reference, data_root))
    jobs = [(row, seed) for row in spec.rows if wanted is None or row.name in wanted
            for seed in (range(seeds) if isinstance(seeds, int) else seeds)]
    cost = {row.name: relative_cost(spec, current.config(row)) for row in spec.rows}
    eta = StudyEta([cost[row.name] for row, seed in jobs
                    if force or not _stored_and_kept(store, current, row, seed, keep_stale)] if D.is_main() else [])
    if D.is_main():
        log(f"[{profile.name} {spec.name}] {len(jobs)} run(s): {len(jobs) - eta.todo} with results already, "
            f"{eta.todo} to run")
    for n, (row, seed) in enumerate(jobs, 1):
        head = f"[{profile.name} {spec.name} {n}/{len(jobs)}] {row.name} seed {seed}"
        config = current.now(row, seed)
        # only rank 0 takes the row lock (the others would wait on it forever) and tells them whether to skip
        with store.lock(spec.key, row.name, seed) if D.is_main() else contextlib.nullcontext():
            skip = False
            if D.is_main():  # temp files a crash mid-write left (a checkpoint's may be GBs): no one else writes them now
                gone = [name for folder in (store.row_dir(spec.key, row.name),
                                            store.checkpoint_path(spec.key, row.name, seed).parent)
                        for name in remove_leftovers(folder, f"seed{seed}")]
                if gone:
                    log(f"{head}: removed {len(gone)} temp file(s) an interrupted write left: {', '.join(gone)}")
            if D.is_main() and not force:
                try:
                    old = store.load(spec.key, row.name, seed)
                except UnreadableFile as e:  # never taken for a missing result in silence, nor lost
                    kept = e.path.with_name(e.path.name + ".bad")
                    os.replace(e.path, kept)
                    log(f"{head}: stored result {e.path} is unreadable ({e.why}): moved to {kept.name}, re-running "
                        "the row")
                    old = None
                changes = config_changes(old.get("config"), config) if old is not None else None
                if changes == []:
                    log(f"{head}: done already (use --force to re-run)")
                    skip = True
                elif changes and keep_stale:
                    log(f"{head}: stale, kept (--keep-stale): {'; '.join(changes)}")
                    skip = True
                elif changes:
                    log(f"{head}: config changed since the stored result ({'; '.join(changes)}): re-running")
            if D.broadcast_from_main(skip, "rank 0 (the baselines, the row's lock, its stored result)"):
                continue
            reuse = spec.kind == "pretrain" and not force and D.is_main()
            twin = store.find_same_run(config, precision) if reuse else None
            if D.broadcast_from_main(twin is not None):
                if D.is_main():
                    source = twin.get("reused_from") or f"{twin['table']}/{twin['row']}/seed{twin['seed']}"
                    copy = {**twin, "table": spec.key, "row": row.name, "reused_from": source}
                    copy.pop("backbone", None)  # named again only if the twin's file is there to share
                    if backbone_readable(store, twin, log, head) and store.share_backbone(
                            (twin["table"], twin["row"], twin["seed"]), (spec.key, row.name, seed)):
                        copy["backbone"] = store.backbone_path(spec.key, row.name, seed).name
                    store.save(spec.key, row.name, seed, copy)
                    eta.reused(cost[row.name])
                    log(f"{head}: the same run as {source} (identical config): result reused "
                        "(--force re-runs it)")
                continue
            log(f"{head}: running ({eta.progress()})")
            t_row = time.perf_counter()
            try:
                record = run_row(spec, row, profile, seed, store, data_root, progress)
            except KeyboardInterrupt:
                ckpt = store.checkpoint_path(spec.key, row.name, seed)
                kept = ckpt.with_suffix(".pretrained.pt")
                if kept.exists():
                    then = "keeps its finished pretraining and evaluates it"
                elif ckpt.exists():
                    then = f"resumes from its last checkpoint ({ckpt})"
                else:
                    then = "starts over (it had not reached its first checkpoint)"
                log(f"{head}: interrupted; the next run of this study {then}")
                raise
            backbone = record.pop("_backbone", None)  # the trained ViT, handed back by run_row; never serialised
            before = record.pop("_pretrained_before_s", 0.0)  # a resumed row's pretraining before this process
            eta.finished(time.perf_counter() - t_row, cost[row.name])
            if D.is_main():
                keep_backbone(store, (spec.key, row.name, seed), record, backbone)
                path = store.save(spec.key, row.name, seed, record)
                store.checkpoint_path(spec.key, row.name, seed).unlink(missing_ok=True)
                shown = ", ".join(f"{k} {v:.2f}" for k, v in record["metrics"].items())
                status = record["status"] if record["status"] != "ok" else shown
                took = f"{record['wall_time_s']:.0f}s"
                if before:
                    took = (f"pretraining {record['pretrain_s']:.0f}s in total, {before:.0f}s of it before the "
                            f"resume; {took} in this run")
                log(f"{head}: {status} ({took}; {eta.progress()}) -> {path}")
    return store


def _stored_and_kept(store: ResultStore, current: CurrentConfigs, row: Row, seed: int, keep_stale: bool) -> bool:
    """Whether the loop will skip (row, seed): a current stored result, or a stale one kept by ``--keep-stale``
    (an unreadable one is re-run, and the loop says so)."""
    try:
        old = store.load(current.spec.key, row.name, seed)
    except UnreadableFile:
        return False
    if old is None:
        return False
    return keep_stale or current.is_current(old, row)


def duration(seconds: float) -> str:
    """45s, 12 min, 2.5 h."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def relative_cost(spec: Spec, cfg: RunConfig) -> float:
    """A row's cost relative to its study's other rows, for the time-left estimate: pretraining epochs x tokens x
    depth x width^2 (the linear layers' work per image; the images per epoch are the profile's, alike for every row),
    so that a ViT-L row or a 600-epoch row counts as the larger share it is. Fine-tuning and transfer studies weigh
    their rows alike (their cost has parts, pretraining or not, reused or not, that one config does not say)."""
    if spec.kind != "pretrain":
        return 1.0
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    return float(cfg.epochs * tokens * cfg.depth * cfg.embed_dim ** 2)


class StudyEta:
    """The study's progress for the log: runs finished of those to run, and the time left: the seconds per unit of
    ``relative_cost`` of the rows this process trained, times the cost of the runs left (a rough guide that sharpens
    as rows finish; a reused row takes no time)."""

    def __init__(self, costs: list[float]):  # the relative cost of each run to do
        self.todo, self.done, self.left, self.spent, self.worked = len(costs), 0, sum(costs), 0.0, 0.0

    def finished(self, seconds: float, cost: float) -> None:
        self.reused(cost)  # done, as a reused run is; and its time measures the rate
        self.spent += seconds
        self.worked += cost

    def reused(self, cost: float) -> None:
        self.done += 1
        self.left -= cost

    def progress(self) -> str:
        text = f"study: {self.done}/{self.todo} run"
        if self.worked and self.done < self.todo:
            text += f", about {duration(self.left * self.spent / self.worked)} left"
        return text


def resolved_settings(spec: Spec, profile: Profile) -> list[tuple[Row, Setting, RunConfig]]:
    check_profile(spec, profile)
    return [(row, spec.setting(row), profile.resolve(spec.setting(row))) for row in spec.rows]
