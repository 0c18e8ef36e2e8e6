"""Faults a long study must survive, and bad input it must refuse with one line.

Divergence stops only the row it happens in; corrupt or foreign checkpoints are moved aside, never used; two
processes running one table share the work through the per-row lock; and every kind of bad input ends in a
single ``error: ...`` line, exit code 2, no traceback, and the result files already there untouched.
"""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import replicate.core.moco
from replicate.core.config import Setting
from replicate.runtime.checkpoint import config_fingerprint, load_checkpoint
from replicate.runtime.trainer import pretrain
from replicate.study.profiles import SMOKE
from replicate.study.runner import run_table
from replicate.study.spec import load_spec

REPO = Path(__file__).resolve().parent.parent


def small_config(seed: int = 0, **setting):
    # 256 digits at global batch 64, 2 epochs: 8 iterations
    return SMOKE.resolve(Setting(epochs=300, **setting), seed=seed).model_copy(update={"train_subset": 256})


def write_spec(path: Path, rows: str, table_id: int = 91) -> Path:
    path.write_text(f"id: {table_id}\ntitle: Fault probe\npaper_ref: test\nreference: a\n"
                    f"base: {{epochs: 100, warmup_epochs: 10}}\nrows:\n{rows}")
    return path


# ---- divergence -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_the_run_at_its_step(monkeypatch, bad):
    real = replicate.core.moco.contrastive_loss
    calls = []

    def poisoned(q, k, t):  # two calls per iteration: iteration 3 onwards returns a non-finite loss
        calls.append(1)
        loss = real(q, k, t)
        return loss * bad if len(calls) > 6 else loss

    monkeypatch.setattr(replicate.core.moco, "contrastive_loss", poisoned)
    result = pretrain(small_config(), progress=False)
    # found at the first monitor flush after the fault (iteration 4; monitor_every 5), not at the end (8)
    assert (result.status, result.diverged_at, result.iterations) == ("diverged", 3, 4)
    assert len(calls) == 2 * 5
    assert len(result.monitor["series"]["loss"]) == 3  # the curves keep the finite iterations before the fault


@pytest.mark.smoke  # baselines and two short rows through run_table: ~30 s
def test_diverged_row_is_recorded_and_the_table_goes_on(tmp_path):
    rows = ("  - {name: a, label: absurd lr, set: {base_lr: 1.0e+6}}\n"
            "  - {name: b, label: normal}\n")
    spec = load_spec(write_spec(tmp_path / "faults.yaml", rows))
    store = run_table(spec, SMOKE, results_root=tmp_path / "results", progress=False)
    a = json.loads(store.path(spec.key, "a", 0).read_text())
    b = json.loads(store.path(spec.key, "b", 0).read_text())
    assert a["status"] == "diverged" and isinstance(a["diverged_at"], int) and 0 <= a["diverged_at"] < 18
    assert a["diverged_at"] < a["iterations"] <= a["diverged_at"] + SMOKE.monitor_every and a["metrics"] == {}
    assert b["status"] == "ok" and b["diverged_at"] is None and b["iterations"] == 18
    assert set(b["metrics"]) == {"knn", "linear"}
    assert not store.checkpoint_path(spec.key, "a", 0).exists()  # a finished (diverged) row leaves no checkpoint


# ---- checkpoints ------------------------------------------------------------------------------------------------

def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_corrupt_checkpoint_is_moved_aside_and_never_used(tmp_path, capsys):
    cfg = small_config()
    ckpt = tmp_path / "row.pt"
    garbage = os.urandom(4096)
    ckpt.write_bytes(garbage)
    result = pretrain(cfg, ckpt_path=ckpt, progress=False, max_steps=2)
    assert "unreadable" in capsys.readouterr().err
    assert (tmp_path / "row.pt.bad").read_bytes() == garbage  # kept for inspection, not deleted
    assert same_weights(result.model, pretrain(cfg, progress=False, max_steps=2).model)  # trained from scratch
    assert load_checkpoint(ckpt, cfg)["step"] == 2  # and a fresh checkpoint replaced it


def test_checkpoint_of_another_config_is_moved_aside_and_never_used(tmp_path, capsys):
    ckpt = tmp_path / "row.pt"
    pretrain(small_config(seed=0), ckpt_path=ckpt, progress=False, max_steps=2)
    other = small_config(seed=1)
    result = pretrain(other, ckpt_path=ckpt, progress=False, max_steps=3)
    assert "different configuration" in capsys.readouterr().err
    foreign = torch.load(tmp_path / "row.pt.bad", weights_only=True)
    assert foreign["fingerprint"] == config_fingerprint(small_config(seed=0)) and foreign["step"] == 2
    assert result.iterations == 3 and len(result.monitor["series"]["loss"]) == 0  # started at 0 (no flush yet)
    assert same_weights(result.model, pretrain(other, progress=False, max_steps=3).model)


def test_fingerprint_ignores_only_the_checkpoint_interval():
    cfg = small_config()
    assert config_fingerprint(cfg) == config_fingerprint(cfg.model_copy(update={"checkpoint_every": 7}))
    for change in ({"seed": 1}, {"batch_size": 32}, {"lr": cfg.lr * 2}, {"train_subset": 128}):
        assert config_fingerprint(cfg) != config_fingerprint(cfg.model_copy(update=change)), change


# ---- two processes, one table -----------------------------------------------------------------------------------

@pytest.mark.smoke  # two concurrent CLI runs of a two-row table: ~45 s on 2 cores
def test_concurrent_runs_of_one_table_train_each_row_once(tmp_path):
    rows = "  - {name: a, label: a}\n  - {name: b, label: b, set: {temperature: 0.3}}\n"
    spec = write_spec(tmp_path / "shared.yaml", rows, table_id=92)
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "replicate", "run", str(spec), "--profile", "smoke", "--results", str(results),
           "--quiet", "--no-render"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    log = "".join(err for _, err in outs)
    for row in ("a", "b"):
        assert log.count(f"] {row} seed 0: running") == 1, log  # trained by exactly one of the two processes
        assert log.count(f"] {row} seed 0: done already") == 1, log  # and skipped by the other
        record = json.loads((results / "smoke" / "shared" / row / "seed0.json").read_text())
        assert record["status"] == "ok" and record["row"] == row
    assert not list(results.rglob("*.tmp"))  # no half-written files left behind


# ---- bad input --------------------------------------------------------------------------------------------------

GOOD_ROWS = "  - {name: a, label: a}\n"
# The CLI with Debian's Fashion-MNIST hidden, so a missing dataset is missing even on a machine that has it.
def bad_input_cases(tmp: Path, results: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (CLI arguments after `python -m replicate`, text the one error line must contain)."""
    specs = {
        "unknown_key": GOOD_ROWS.replace("label: a}", "label: a, set: {pos_embd: learned}}"),
        "wrong_type": GOOD_ROWS.replace("label: a}", "label: a, set: {batch_size: big}}"),
    }
    paths = {name: write_spec(tmp / f"{name}.yaml", rows) for name, rows in specs.items()}
    missing = tmp / "missing_field.yaml"
    missing.write_text("id: 93\ntitle: t\npaper_ref: p\nrows:\n" + GOOD_ROWS)  # no `reference`
    empty = tmp / "empty_data"
    empty.mkdir()
    garbage = tmp / "garbage_data"
    garbage.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (garbage / name).write_bytes(b"\x89PNG not an idx file" * 10)
    not_a_dir = tmp / "file.txt"
    not_a_dir.write_text("a file, so nothing can be created under it (even by root)\n")
    res = ["--results", str(results), "--quiet"]
    return {
        "unknown_key": (["run", str(paths["unknown_key"]), "--profile", "smoke", *res], "pos_embd: unknown key"),
        "wrong_type": (["run", str(paths["wrong_type"]), "--profile", "smoke", *res], "batch_size"),
        "missing_field": (["run", str(missing), "--profile", "smoke", *res], "reference: required key is missing"),
        "unknown_table": (["run", "table99", "--profile", "smoke", *res], "no study 'table99'"),
        "unknown_profile": (["run", "table5", "--profile", "huge", *res], "unknown profile 'huge'"),
        "missing_dataset": (["run", "table5", "--profile", "reduced", "--data-root", str(empty), *res],
                            "Fashion-MNIST not found"),
        "malformed_data": (["run", "table5", "--profile", "reduced", "--data-root", str(garbage), *res],
                           "not an IDX file"),
        "unwritable_results": (["run", "table5", "--profile", "smoke", "--results", str(not_a_dir / "sub")],
                               "is not writable"),
    }


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """Every bad-input case through the CLI's ``main``, in this process (a subprocess would add only start-up time),
    with Debian's Fashion-MNIST hidden and torchvision's download failing at once as offline."""
    from replicate.__main__ import main

    tmp = tmp_path_factory.mktemp("bad_input")
    results = tmp / "results"
    for profile in ("smoke", "reduced"):  # results a user already has, which no failed run may touch
        old = results / profile / "table5" / "sincos" / "seed0.json"
        old.parent.mkdir(parents=True)
        old.write_text(json.dumps({"status": "ok", "metrics": {"knn": 50.0}}))
    (results / "smoke" / "baselines.json").write_text("{}")
    before = snapshot(results)
    cases = bad_input_cases(tmp, results)

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("replicate.core.data.DEBIAN_FASHION_MNIST", Path("/nonexistent"))
        mp.setattr("torchvision.datasets.FashionMNIST.__init__", offline)
        for name, (args, _) in cases.items():
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(args)
            runs[name] = (code, out.getvalue(), err.getvalue())
    return cases, runs, before, snapshot(results)


@pytest.mark.parametrize("name", ["unknown_key", "wrong_type", "missing_field", "unknown_table", "unknown_profile",
                                  "missing_dataset", "malformed_data", "unwritable_results"])
def test_bad_input_is_one_error_line_and_exit_2(name, bad_input_runs):
    cases, runs, _, _ = bad_input_runs
    code, out, err = runs[name]
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    # one error line, last; before it at most the runner's progress lines ("[reduced] computing ...")
    assert lines[-1].startswith("error: ") and all(line.startswith("[") for line in lines[:-1]), err
    assert cases[name][1] in lines[-1]


def test_bad_input_leaves_existing_results_untouched(bad_input_runs):
    _, _, before, after = bad_input_runs
    assert {k: v for k, v in after.items() if k in before} == before
    assert not [k for k in after if k not in before and k.endswith(".json")]
