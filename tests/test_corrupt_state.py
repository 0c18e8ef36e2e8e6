"""One bad file stays one bad file: an unreadable result, baselines file, SPEC marker or backbone is one line naming
it and what to do, and affects only the row or study owning it; nothing is re-run over it without saying so. And
the store's own hygiene: precision in the checkpoint fingerprint, crash leftovers removed, files created with the
umask, an atomic SPEC claim, a lock waiter that says what it waits for, a stopped torchrun peer that ends the run,
`evaluate` checking writability before its probe, a full disk in one line."""
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_runner import fake_run_row  # tests/ is on sys.path under pytest (rootdir conftest)

import replicate.runtime.atomic
import replicate.study.results
import replicate.study.runner
from replicate.__main__ import main
from replicate.core import distributed as D
from replicate.core.config import Setting
from replicate.core.model import build_vit
from replicate.report.render import main as render_main
from replicate.report.render import render_table
from replicate.runtime.atomic import WriteError, atomic_open, atomic_write_text, create_exclusive
from replicate.runtime.checkpoint import atomic_torch_save, config_fingerprint
from replicate.runtime.trainer import pretrain
from replicate.study.profiles import SMOKE
from replicate.study.results import ResultsError, ResultStore, UnreadableFile
from replicate.study.spec import load_spec

ROWS = "  - {name: a, label: row a}\n  - {name: b, label: row b, set: {temperature: 0.3}}\n"
CORRUPT = {  # what an operator finds: a JSON of the wrong shape, a truncated file, binary junk, an empty file
    "list": b"[]",
    "truncated": b'{"status": "ok", "metrics": {"knn": 5',
    "binary": bytes(range(256)),
    "empty": b"",
    "wrong_types": b'{"status": "ok", "metrics": "high"}',
}


def write_spec(path: Path, rows: str = ROWS, table_id: int = 96):
    path.write_text(f"id: {table_id}\ntitle: Corrupt\npaper_ref: test\nreference: a\n"
                    f"base: {{epochs: 100, warmup_epochs: 10}}\nrows:\n{rows}")
    return load_spec(path)


def fake_baselines(*args) -> dict:
    cfg = SMOKE.resolve(Setting(epochs=100, warmup_epochs=10))
    return {"dataset": "digits", "train_images": 1, "test_images": 1, "raw_pixels": {"knn": 1.0},
            "random_backbone": {"knn": 2.0}, "random_backbone_arch": "x",
            "depends_on": replicate.study.runner.baseline_key(cfg)}


@pytest.fixture
def fake_training(monkeypatch):
    """run_row and the baselines without training: which rows ran, in order."""
    trained = []
    monkeypatch.setattr(replicate.study.runner, "run_row", fake_run_row(trained))
    monkeypatch.setattr(replicate.study.runner, "compute_baselines", fake_baselines)
    return trained


# ---- result files -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(CORRUPT))
def test_an_unreadable_result_is_one_line_and_rerun_saying_so(tmp_path, fake_training, capsys, kind):
    spec = write_spec(tmp_path / "corrupt.yaml")
    results = tmp_path / "results"
    store = replicate.study.runner.run_table(spec, SMOKE, results_root=results, progress=False)
    bad = store.path(spec.key, "a", 0)
    bad.write_bytes(CORRUPT[kind])
    with pytest.raises(UnreadableFile) as e:
        store.load(spec.key, "a", 0)
    assert "\n" not in str(e.value) and str(bad) in str(e.value) and "re-run its row" in str(e.value)

    # rendering: the row is marked, the other row and the footer render, one warning line names the file
    capsys.readouterr()
    text = render_table(spec, store)
    err = capsys.readouterr().err
    assert "row a (unreadable: seed0.json)" in text and "row b" in text and "60.0" in text
    assert err.count("\n") == 1 and str(bad) in err

    # another study's run never trips over it (it looks for a twin among every study's results)
    other = write_spec(tmp_path / "other.yaml", "  - {name: a, label: a, set: {momentum: 0.9}}\n", table_id=97)
    replicate.study.runner.run_table(other, SMOKE, results_root=results, progress=False)
    assert fake_training == ["a", "b", "a"]

    # this study's next run re-runs the row over it, and says so in one line
    capsys.readouterr()
    replicate.study.runner.run_table(spec, SMOKE, results_root=results, progress=False)
    log = capsys.readouterr().err
    assert fake_training == ["a", "b", "a", "a"]
    assert f"stored result {bad} is unreadable" in log and "moved to seed0.json.bad, re-running the row" in log
    assert store.load(spec.key, "a", 0)["status"] == "ok"
    assert bad.with_name("seed0.json.bad").read_bytes() == CORRUPT[kind]  # kept for the operator to look at


def test_the_renderer_renders_every_other_study(tmp_path, fake_training, capsys):
    results = tmp_path / "results"
    store = ResultStore(results, "smoke")
    store.save("05_position_embedding", "sincos", 0, {"status": "ok", "metrics": {"knn": 10.0, "linear": 11.0}})
    store.path("06_class_token", "cls", 0).parent.mkdir(parents=True)
    store.path("06_class_token", "cls", 0).write_bytes(b"[]")
    assert render_main(["--profile", "smoke", "--results", str(results)]) == 0
    out, err = capsys.readouterr()
    assert "w/ [CLS] (after final LN) (unreadable: seed0.json)" in out and "| sin-cos (2-D, fixed)" in out
    warnings = [line for line in err.splitlines() if not line.startswith("rendered from ")]  # + the summary line
    assert len(warnings) == 1 and "06_class_token/cls/seed0.json is unreadable" in warnings[0]


def test_a_row_that_no_longer_resolves_renders_as_stale(tmp_path, capsys):
    """A user's spec edited after its runs so that a row no longer resolves at the profile (patch 3 has no size at
    smoke): the table renders, that row's runs are stale and say why, no traceback."""
    spec = write_spec(tmp_path / "edited.yaml", rows=ROWS + "  - {name: c, label: row c, set: {patch_size: 3}}\n")
    store = ResultStore(tmp_path / "results", "smoke")
    for row in ("a", "b", "c"):
        store.save(spec.key, row, 0, {"status": "ok", "metrics": {"knn": 10.0, "linear": 11.0}, "seed": 0,
                                      "config": SMOKE.resolve(Setting(epochs=100, warmup_epochs=10)).model_dump(
                                          mode="json")})
    text = render_table(spec, store)
    assert "row c (stale)" in text and "row a (stale)" not in text and "row b (stale)" in text  # b: temperature
    current = replicate.study.results.CurrentConfigs(spec, SMOKE)
    assert current.changes(store.load(spec.key, "c", 0), spec.row("c")) == [
        "the row does not resolve at profile smoke now (profile smoke has no patch size for the paper's patch 3: use "
        "one of 16, 14, 7 (or null for the arch's))"]


# ---- baselines ----------------------------------------------------------------------------------------------------

def test_an_unreadable_baselines_file_is_recomputed_saying_so_and_rendered_as_such(tmp_path, fake_training, capsys):
    spec = write_spec(tmp_path / "corrupt.yaml")
    results = tmp_path / "results"
    store = replicate.study.runner.run_table(spec, SMOKE, results_root=results, progress=False)
    baselines = results / "smoke" / "baselines.json"
    baselines.write_text('{"dataset": "digits", "raw_pix')  # truncated
    capsys.readouterr()
    text = render_table(spec, store)
    err = capsys.readouterr().err
    assert "Baselines: baselines.json is unreadable (not valid JSON" in text and "row b" in text
    assert err.count("\n") == 1 and str(baselines) in err
    replicate.study.runner.run_table(spec, SMOKE, results_root=results, progress=False)  # rows done: only baselines
    log = capsys.readouterr().err
    assert f"baselines {baselines} unreadable (not valid JSON" in log and "computing them again" in log
    assert store.load_baselines()["raw_pixels"] == {"knn": 1.0} and fake_training == ["a", "b"]


# ---- SPEC markers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, what", [(b"", "is empty"), (b"\xff\xfe\x00garbage", "is binary"),
                                           (b"tables/a.yaml\ntables/b.yaml\n", "not a single file name")])
def test_a_damaged_spec_marker_is_one_line_for_its_study_only(tmp_path, fake_training, capsys, content, what):
    spec = write_spec(tmp_path / "corrupt.yaml")
    results = tmp_path / "results"
    marker = results / "smoke" / spec.key / "SPEC"
    marker.parent.mkdir(parents=True)
    marker.write_bytes(content)
    assert main(["run", str(spec.path), "--profile", "smoke", "--results", str(results), "--no-render"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(marker) in err and what in err and f"echo {spec.source} > {marker}" in err
    assert fake_training == [] and marker.read_bytes() == content
    other = write_spec(tmp_path / "other.yaml", table_id=97)  # another study runs
    replicate.study.runner.run_table(other, SMOKE, results_root=results, progress=False)
    assert fake_training == ["a", "b"]


def _claim(store: ResultStore, start: threading.Barrier, outcome: dict, source: str) -> None:
    start.wait()
    try:
        store.claim("study", source)
        outcome[source] = "claimed"
    except ResultsError:
        outcome[source] = "refused"


def test_two_specs_racing_for_one_folder_never_both_claim_it(tmp_path):
    for attempt in range(20):
        store = ResultStore(tmp_path / str(attempt), "smoke")
        start, outcome = threading.Barrier(2), {}
        threads = [threading.Thread(target=_claim, args=(store, start, outcome, f"specs{i}/study.yaml"))
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcome.values()) == ["claimed", "refused"], outcome
        owner = (store.profile_dir / "study" / "SPEC").read_text().strip()
        assert outcome[owner] == "claimed"
    assert not list(tmp_path.rglob("*.tmp"))


def test_create_exclusive_writes_once():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x"
        assert create_exclusive(path, "first\n") and not create_exclusive(path, "second\n")
        assert path.read_text() == "first\n"


# ---- backbone files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"PK\x03\x04" + bytes(60)])
def test_a_garbage_backbone_is_one_line_for_export_and_skipped_by_reuse(tmp_path, capsys, content):
    from replicate.study.finetune_row import reused_pretraining

    results = tmp_path / "results"
    cfg = SMOKE.resolve(Setting(epochs=300, warmup_epochs=40, batch_size=4096))
    store = ResultStore(results, "smoke")
    spec = load_spec(Path(__file__).resolve().parent.parent / "tables" / "05_position_embedding.yaml")
    store.save(spec.key, "sincos", 0, {"table": spec.key, "row": "sincos", "seed": 0, "status": "ok",
                                       "metrics": {m: 1.0 for m in cfg.metrics}, "backbone": "seed0.backbone.pt",
                                       "config": cfg.model_dump(mode="json"), "provenance": {"precision": "fp32"}})
    path = store.backbone_path(spec.key, "sincos", 0)
    path.write_bytes(content)
    assert main(["export", "table5", "sincos", "--profile", "smoke", "--format", "timm", "-o",
                 str(tmp_path / "x.pth"), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"backbone file {path} is unreadable" in err and "--force" in err
    with pytest.MonkeyPatch.context() as m:
        m.setenv("REPLICATE_CPU_MATMUL", "fp32")
        twin = store.find_same_run(cfg.model_dump(mode="json"), "fp32")
        assert twin is not None and twin["row"] == "sincos"
        assert reused_pretraining(store, cfg) == (None, None)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "pretraining this row instead" in err


def test_a_garbage_backbone_is_not_linked_to_a_reusing_row(tmp_path, fake_training, capsys, monkeypatch):
    """A row that reuses a twin's result checks the twin's backbone before sharing it: a damaged one is one warning
    line now, and the reused result names no backbone (instead of a second name for the garbage)."""
    monkeypatch.setenv("REPLICATE_CPU_MATMUL", "fp32")
    results = tmp_path / "results"
    first = write_spec(tmp_path / "first.yaml", rows="  - {name: a, label: row a}\n", table_id=96)
    second = write_spec(tmp_path / "second.yaml", rows="  - {name: a, label: row a}\n", table_id=95)
    store = replicate.study.runner.run_table(first, SMOKE, results_root=results, progress=False)
    record = store.load(first.key, "a", 0)
    path = store.backbone_path(first.key, "a", 0)
    path.write_bytes(b"garbage" * 100)
    store.save(first.key, "a", 0, {**record, "backbone": path.name})
    capsys.readouterr()
    replicate.study.runner.run_table(second, SMOKE, results_root=results, progress=False)
    log = capsys.readouterr().err
    reused = store.load(second.key, "a", 0)
    assert reused["reused_from"] == f"{first.key}/a/seed0" and "backbone" not in reused
    assert not store.backbone_path(second.key, "a", 0).exists()
    assert log.count(f"backbone file {path} is unreadable") == 1 and "keeps no backbone file" in log
    assert fake_training == ["a"]  # the first study trained it; the second reused it


# ---- precision in the fingerprint -----------------------------------------------------------------------------

def small_config():
    # 256 digits at global batch 64, 2 epochs: 8 iterations
    return SMOKE.resolve(Setting(epochs=300), seed=0).model_copy(update={"train_subset": 256})


def test_a_row_started_in_bf16_never_resumes_in_fp32(tmp_path, monkeypatch, capsys):
    cfg, ckpt = small_config(), tmp_path / "seed0.pt"
    assert config_fingerprint(cfg, "bf16") != config_fingerprint(cfg, "fp32")
    monkeypatch.setenv("REPLICATE_CPU_MATMUL", "bf16")
    pretrain(cfg, ckpt_path=ckpt, progress=False, max_steps=2)
    assert torch.load(ckpt, weights_only=True)["precision"] == "bf16"
    monkeypatch.setenv("REPLICATE_CPU_MATMUL", "fp32")
    capsys.readouterr()
    resumed = pretrain(cfg, ckpt_path=ckpt, progress=False, max_steps=3)
    err = capsys.readouterr().err
    assert "started with bf16 matmuls, and this process multiplies in fp32" in err and "resuming" not in err
    fresh = pretrain(cfg, progress=False, max_steps=3)  # fp32 from step 0: what the "resumed" run must equal
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), fresh.model.state_dict().values()))
    assert (tmp_path / "seed0.pt.bad").exists()


# ---- leftovers, permissions, locks ----------------------------------------------------------------------------

def test_crash_leftovers_are_removed_on_the_rows_next_run(tmp_path, fake_training, capsys):
    spec = write_spec(tmp_path / "corrupt.yaml")
    results = tmp_path / "results"
    store = ResultStore(results, "smoke")
    ckpt_dir, row_dir = store.checkpoint_path(spec.key, "a", 0).parent, store.row_dir(spec.key, "a")
    ckpt_dir.mkdir(parents=True)
    row_dir.mkdir(parents=True)
    mine = [ckpt_dir / ".seed0.pt.k3j2.tmp", ckpt_dir / ".seed0.probe.pt.x1.tmp", row_dir / ".seed0.json.ab.tmp",
            row_dir / ".seed0.backbone.pt.q.tmp"]
    others = [ckpt_dir / ".seed1.pt.k3j2.tmp", ckpt_dir / ".seed01.pt.z.tmp", row_dir / "notes.tmp"]
    for p in mine + others:
        p.write_bytes(b"half a file")
    replicate.study.runner.run_table(spec, SMOKE, results_root=results, progress=False)
    log = capsys.readouterr().err
    assert not any(p.exists() for p in mine) and all(p.exists() for p in others)
    assert log.count("removed 4 temp file(s) an interrupted write left") == 1


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_files_are_created_with_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}\n")
        atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "b.pt")
        create_exclusive(tmp_path / "SPEC", "x\n")
    finally:
        os.umask(old)
    for name in ("a.json", "b.pt", "SPEC"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_a_lock_waiter_says_what_it_waits_for(tmp_path, capsys):
    store = ResultStore(tmp_path, "smoke")
    entered = threading.Event()

    def second():
        with store.lock("study", "row", 0):
            entered.set()

    with store.lock("study", "row", 0):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.5)
        assert not entered.is_set()  # it waits ...
    waiter.join(timeout=10)
    assert entered.is_set()  # ... until the holder is done
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"waiting for study/row seed 0: pid {os.getpid()}" in err


def _stalled_peer(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), REPLICATE_PEER_TIMEOUT="2")
    D.init_from_env()
    if rank == 1:  # stopped: never reaches the collective while rank 0 waits
        time.sleep(6)
        return
    t0, line = time.perf_counter(), None
    try:
        D.barrier()
    except RuntimeError as e:
        line = D.peer_failure(e)
    Path(out).write_text(json.dumps({"line": line, "waited": time.perf_counter() - t0}))


def test_a_stopped_peer_ends_the_run_within_the_timeout(tmp_path):
    from test_distributed import free_port

    out = tmp_path / "rank0.json"
    mp.spawn(_stalled_peer, args=(free_port(), str(out)), nprocs=2, join=True)
    got = json.loads(out.read_text())
    assert got["line"] is not None and "another process of this run stopped answering" in got["line"]
    assert "2 s ($REPLICATE_PEER_TIMEOUT)" in got["line"] and 1.5 < got["waited"] < 5.5


def test_a_bad_peer_timeout_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("REPLICATE_PEER_TIMEOUT", "soon")
    assert main(["run", "table5", "--profile", "smoke", "--results", "/nonexistent/x"]) == 2
    assert "$REPLICATE_PEER_TIMEOUT='soon'" in capsys.readouterr().err


# ---- evaluate, full disks ---------------------------------------------------------------------------------------

def test_evaluate_checks_writability_before_the_probe(tmp_path, monkeypatch, capsys):
    path = tmp_path / "vit.pth"
    torch.save(build_vit(SMOKE.resolve(Setting())).state_dict(), path)
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")

    def probe(*args, **kwargs):
        raise AssertionError("the probe ran before the output was checked")

    monkeypatch.setattr(replicate.study.runner, "evaluate_backbone", probe)
    assert main(["evaluate", str(path), "--profile", "smoke", "--results", str(not_a_dir / "sub"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not writable" in err


@pytest.fixture
def full_disk(monkeypatch):
    """Every atomic write goes to /dev/full (writes fail with ENOSPC), as on a full disk."""
    def temp(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open("/dev/full", os.O_WRONLY), str(path.parent / f".{path.name}.full.tmp")

    monkeypatch.setattr(replicate.runtime.atomic, "_temp", temp)


@pytest.mark.parametrize("write", ["text", "torch"])
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, full_disk, write):
    target = tmp_path / "out" / "seed0.pt"
    with pytest.raises(WriteError) as e:
        if write == "text":
            atomic_write_text(target, "x" * 100_000)
        else:
            atomic_torch_save({"w": torch.randn(100_000)}, target)
    assert "\n" not in str(e.value) and str(target) in str(e.value) and "no space left on device" in str(e.value)
    assert not target.exists()


def test_a_full_disk_in_the_cli_is_exit_2(tmp_path, full_disk, capsys):
    spec = write_spec(tmp_path / "corrupt.yaml")
    code = main(["run", str(spec.path), "--profile", "smoke", "--results", str(tmp_path / "results"), "--no-render"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "SPEC" in err and "no space left on device" in err


def test_atomic_open_keeps_other_errors(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with atomic_open(tmp_path / "x", "w") as f:
            f.write("a")
            raise ZeroDivisionError
    assert not list(tmp_path.iterdir())


def test_every_committed_result_and_baselines_file_is_readable():
    """The checks that flag a damaged file never flag a committed one (older layouts included)."""
    from replicate.study.results import baselines_problem, read_json, record_problem

    repo = Path(__file__).resolve().parent.parent
    files = 0
    for root in (repo / "results", repo / "docs" / "reduced-scale" / "runs"):
        for f in root.rglob("seed*.json"):
            assert read_json(f, record_problem, "") is not None
            files += 1
        for f in root.rglob("baselines.json"):
            assert read_json(f, baselines_problem, "") is not None
            files += 1
    assert files > 100
