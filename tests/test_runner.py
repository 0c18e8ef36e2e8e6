"""Rows that are the same run in two studies are trained once: the second copies the first's record."""
import json

import pytest

import replicate.study.results
import replicate.study.runner
from replicate.runtime.precision import training_precision
from replicate.study.profiles import SMOKE
from replicate.study.results import ResultsError, ResultStore
from replicate.study.spec import find_spec, load_spec


def write_spec(path, table_id: int, rows: str):
    path.write_text(f"id: {table_id}\ntitle: Shared rows\npaper_ref: test\nreference: ref\n"
                    f"base: {{epochs: 100, warmup_epochs: 10}}\nrows:\n{rows}")
    return load_spec(path)


@pytest.mark.smoke  # three short smoke rows: ~40 s
def test_identical_row_is_reused_and_identical_on_rerun(tmp_path, monkeypatch):
    first = write_spec(tmp_path / "a.yaml", 92, "  - {name: ref, label: reference}\n")
    second = write_spec(tmp_path / "b.yaml", 93, "  - {name: ref, label: reference}\n"
                                                 "  - {name: m0, label: m=0, set: {momentum: 0.0}}\n")
    results = tmp_path / "results"
    store = replicate.study.runner.run_table(first, SMOKE, results_root=results, progress=False)
    original = json.loads(store.path(first.key, "ref", 0).read_text())

    trained = []
    real_run_row = replicate.study.runner.run_row

    def counting_run_row(spec, row, *args, **kwargs):
        trained.append(row.name)
        return real_run_row(spec, row, *args, **kwargs)

    monkeypatch.setattr(replicate.study.runner, "run_row", counting_run_row)
    replicate.study.runner.run_table(second, SMOKE, results_root=results, progress=False)
    assert trained == ["m0"]  # the shared row was not trained again; the different one was
    copy = json.loads(store.path(second.key, "ref", 0).read_text())
    assert copy["reused_from"] == f"{first.key}/ref/seed0" and copy["row"] == "ref" and copy["table"] == second.key
    assert copy["metrics"] == original["metrics"] and copy["config"] == original["config"]

    # the premise: a run is a deterministic function of its config, so --force reproduces the copied numbers
    replicate.study.runner.run_table(second, SMOKE, results_root=results, progress=False, force=True)
    rerun = json.loads(store.path(second.key, "ref", 0).read_text())
    assert "reused_from" not in rerun and rerun["metrics"] == original["metrics"]
    assert rerun["curves"]["series"]["loss"] == original["curves"]["series"]["loss"]


def test_only_a_finished_pretraining_record_of_the_same_config_is_reused(tmp_path):
    from replicate.core.config import Setting
    from replicate.study.profiles import SMOKE

    store = ResultStore(tmp_path, "smoke")
    config = SMOKE.resolve(Setting()).model_dump(mode="json")
    other = SMOKE.resolve(Setting(momentum=0.9)).model_dump(mode="json")
    # a transfer row keeps its pretraining config but scores fine-tuning; a diverged row has no metrics
    store.save("table11", "mocov3", 0, {"status": "ok", "config": config, "metrics": {"digits": 70.0}})
    store.save("table2", "a", 0, {"status": "diverged", "config": config, "metrics": {}})
    store.save("table3", "b", 0, {"status": "ok", "config": other, "metrics": {"knn": 1.0, "linear": 2.0}})
    assert store.find_same_run(config) is None
    store.save("table5", "sincos", 0, {"status": "ok", "config": config, "metrics": {"knn": 1.0, "linear": 2.0}})
    assert store.find_same_run(config)["metrics"] == {"knn": 1.0, "linear": 2.0}
    # a record rewritten since (same size, same second) is read again; the unchanged ones are not
    store.save("table5", "sincos", 0, {"status": "ok", "config": config, "metrics": {"knn": 3.0, "linear": 4.0}})
    reads = []
    real = replicate.study.results.read_json
    with pytest.MonkeyPatch.context() as m:
        m.setattr(replicate.study.results, "read_json", lambda f, *a: reads.append(f.parent.parent.name) or real(f, *a))
        assert store.find_same_run(config)["metrics"] == {"knn": 3.0, "linear": 4.0}
        assert reads == ["table5"]


def fake_run_row(trained):
    """run_row without the training: records which rows ran, with the config the runner resolved."""
    def run_row(spec, row, profile, seed, store, data_root, progress=True):
        trained.append(row.name)
        cfg = profile.resolve(spec.setting(row), seed=seed)
        return {"table": spec.key, "row": row.name, "seed": seed, "profile": profile.name, "status": "ok",
                "metrics": {"knn": 50.0, "linear": 60.0}, "wall_time_s": 0.0, "config": cfg.model_dump(mode="json"),
                "provenance": {"precision": training_precision("cpu")}}
    return run_row


def test_a_row_reruns_when_its_resolved_config_changed(tmp_path, monkeypatch, capsys):
    trained = []
    monkeypatch.setattr(replicate.study.runner, "run_row", fake_run_row(trained))
    monkeypatch.setattr(replicate.study.runner, "compute_baselines", lambda *a: {})
    path, results = tmp_path / "lr.yaml", tmp_path / "results"
    rows = "  - {name: ref, label: reference}\n  - {name: other, label: other, set: {momentum: 0.9}}\n"
    spec = write_spec(path, 5, rows)
    replicate.study.runner.run_table(spec, SMOKE, results_root=results, progress=False)
    assert trained == ["ref", "other"]
    replicate.study.runner.run_table(spec, SMOKE, results_root=results, progress=False)
    assert trained == ["ref", "other"]  # unchanged spec: both cached
    assert capsys.readouterr().err.count("done already") == 2

    path.write_text(path.read_text().replace("warmup_epochs: 10}", "warmup_epochs: 10, base_lr: 5.0e-4}"))
    edited = load_spec(path)
    replicate.study.runner.run_table(edited, SMOKE, results_root=results, progress=False, keep_stale=True)
    assert trained == ["ref", "other"]  # kept on request
    assert "stale, kept" in capsys.readouterr().err
    replicate.study.runner.run_table(edited, SMOKE, results_root=results, progress=False)
    assert trained == ["ref", "other", "ref", "other"]  # the edit re-ran both rows
    err = capsys.readouterr().err
    assert "config changed" in err and "setting.base_lr: 0.00015 -> 0.0005" in err
    stored = json.loads(ResultStore(results, "smoke").path(edited.key, "ref", 0).read_text())
    assert stored["config"]["setting"]["base_lr"] == 5.0e-4


def test_a_study_never_mixes_bf16_and_fp32_pretraining(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(replicate.study.runner, "run_row", fake_run_row(trained))
    monkeypatch.setattr(replicate.study.runner, "compute_baselines", lambda *a: {})
    results = tmp_path / "results"
    spec = write_spec(tmp_path / "mix.yaml", 5, "  - {name: ref, label: reference}\n  - {name: other, label: other, "
                                                "set: {momentum: 0.9}}\n")
    monkeypatch.setenv("REPLICATE_CPU_MATMUL", "fp32")
    replicate.study.runner.run_table(spec, SMOKE, results_root=results, progress=False)
    store = ResultStore(results, "smoke")
    store.path(spec.key, "other", 0).unlink()  # one row left to run, now on a machine that defaults to bf16
    monkeypatch.setenv("REPLICATE_CPU_MATMUL", "bf16")  # the opt-in, into an explicit --results folder of fp32 runs
    with pytest.raises(ResultsError, match="ref/seed0.*in fp32, .*README, 'CPU precision'.* To match, run with "
                                           "unset REPLICATE_CPU_MATMUL"):
        replicate.study.runner.run_table(spec, SMOKE, results_root=results, progress=False)
    assert trained == ["ref", "other"]
    # ... nor reuses a run of another study that multiplied otherwise
    assert store.find_same_run(json.loads(store.path(spec.key, "ref", 0).read_text())["config"],
                               "bf16 matmul, fp32 accumulate") is None
    replicate.study.runner.run_table(spec, SMOKE, results_root=results, progress=False, force=True)  # all rows in bf16
    assert trained == ["ref", "other", "ref", "other"]
    monkeypatch.setenv("REPLICATE_CPU_MATMUL", "fp32")
    with pytest.raises(ResultsError, match="in bf16 matmul, fp32 accumulate, this run would pretrain in fp32.*"
                                           "REPLICATE_CPU_MATMUL=bf16; or pass another --results DIR"):
        replicate.study.runner.run_table(spec, SMOKE, results_root=results, progress=False)


def test_two_specs_with_one_number_never_share_results(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(replicate.study.runner, "run_row", fake_run_row(trained))
    monkeypatch.setattr(replicate.study.runner, "compute_baselines", lambda *a: {})
    results = tmp_path / "results"
    mine = write_spec(tmp_path / "my_momentum.yaml", 9, "  - {name: ref, label: reference}\n")
    theirs = write_spec(tmp_path / "other_study.yaml", 9, "  - {name: ref, label: reference}\n")
    replicate.study.runner.run_table(mine, SMOKE, results_root=results, progress=False)
    replicate.study.runner.run_table(theirs, SMOKE, results_root=results, progress=False)
    assert mine.key != theirs.key
    assert (results / "smoke" / mine.key / "ref" / "seed0.json").exists()
    assert (results / "smoke" / theirs.key / "ref" / "seed0.json").exists()
    # a spec file of the same name elsewhere would write the first one's folder: refused
    (tmp_path / "elsewhere").mkdir()
    clash = write_spec(tmp_path / "elsewhere" / "my_momentum.yaml", 9, "  - {name: ref, label: reference}\n")
    with pytest.raises(ResultsError, match="holds the results of"):
        replicate.study.runner.run_table(clash, SMOKE, results_root=results, progress=False)


def test_rows_runs_only_the_named_rows_and_refuses_an_unknown_one_before_any_write(tmp_path, monkeypatch, capsys):
    from replicate.__main__ import main

    trained = []
    monkeypatch.setattr(replicate.study.runner, "run_row", fake_run_row(trained))
    monkeypatch.setattr(replicate.study.runner, "compute_baselines", lambda *a: {})
    path, results = tmp_path / "rows.yaml", tmp_path / "results"
    write_spec(path, 5, "  - {name: ref, label: reference}\n  - {name: a, label: a, set: {momentum: 0.9}}\n"
                        "  - {name: b, label: b, set: {momentum: 0.9, base_lr: 5.0e-4}}\n")
    run = ["run", str(path), "--profile", "smoke", "--results", str(results), "--quiet", "--no-render"]
    assert main([*run, "--rows", "b,ref", "--seeds", "2"]) == 0
    assert trained == ["ref", "ref", "b", "b"]  # table order, whatever order --rows names them in
    for bad, why in (("a,nosuch", "has no row 'nosuch'; its rows: ref, a, b"), (",", "--rows names no row")):
        capsys.readouterr()
        before = sorted(tmp_path.rglob("*"))
        assert main([*run, "--rows", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err and sorted(tmp_path.rglob("*")) == before
    assert trained == ["ref", "ref", "b", "b"]


def test_missing_data_root_writes_nothing(tmp_path, monkeypatch, capsys):
    from replicate.__main__ import main

    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    code = main(["run", "table5", "--profile", "reduced", "--data-root", str(tmp_path / "nonexistent"),
                 "--results", str(tmp_path / "res"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nonexistent: no such folder" in err
    assert sorted(tmp_path.rglob("*")) == before


def test_unknown_profile_is_one_line(capsys):
    from replicate.__main__ import main

    assert main(["run", "table5", "--profile", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown profile 'nosuch'" in err


def test_a_record_older_than_a_config_field_counts_it_at_its_default():
    from replicate.core.config import Setting
    from replicate.study.profiles import SMOKE
    from replicate.study.results import config_changes

    now = SMOKE.resolve(Setting()).model_dump(mode="json")
    old = {k: v for k, v in now.items() if k not in ("monitor_probe", "monitor_bank")}  # written before they existed
    assert config_changes(old, {**now, "monitor_probe": 0, "monitor_bank": 0}) == []
    assert config_changes(old, now) == [f"monitor_bank: 0 -> {now['monitor_bank']}",
                                        f"monitor_probe: 0 -> {now['monitor_probe']}"]
    assert config_changes(now, {**now, "checkpoint_every": 7}) == []  # when a run saves is not what it computes


def test_bf16_without_results_writes_apart_and_fp32_needs_no_variable(tmp_path, monkeypatch, capsys):
    """The committed fp32 results and a bf16 CPU never meet: no variable is needed to add to the first, and the
    opt-in writes to its own folder without --results."""
    trained = []
    monkeypatch.setattr(replicate.study.runner, "run_row", fake_run_row(trained))
    monkeypatch.setattr(replicate.study.runner, "compute_baselines", lambda *a: {})
    monkeypatch.setattr(replicate.study.results, "DEFAULT_ROOT", tmp_path / "results")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    spec = write_spec(tmp_path / "mix.yaml", 5, "  - {name: ref, label: reference}\n")
    monkeypatch.delenv("REPLICATE_CPU_MATMUL", raising=False)
    store = replicate.study.runner.run_table(spec, SMOKE, progress=False)
    assert store.root == tmp_path / "results" and trained == ["ref"]
    monkeypatch.setenv("REPLICATE_CPU_MATMUL", "bf16")
    store = replicate.study.runner.run_table(spec, SMOKE, seeds=2, progress=False)  # no mixing error: its own folder
    assert store.root == tmp_path / "results" / "cpu-bf16" and trained == ["ref", "ref", "ref"]
    assert "results/cpu-bf16" in capsys.readouterr().err
    monkeypatch.delenv("REPLICATE_CPU_MATMUL")
    replicate.study.runner.run_table(spec, SMOKE, seeds=2, progress=False)  # back to fp32: adds seed 1 to results/
    assert trained == ["ref", "ref", "ref", "ref"]


def test_progress_counts_the_runs_left_and_estimates_the_time(tmp_path, monkeypatch, capsys):
    trained = []
    monkeypatch.setattr(replicate.study.runner, "run_row", fake_run_row(trained))
    monkeypatch.setattr(replicate.study.runner, "compute_baselines", lambda *a: {})
    clock = iter(range(0, 10_000, 100))  # every perf_counter call 100 s later: each row takes 100 s
    monkeypatch.setattr(replicate.study.runner.time, "perf_counter", lambda: next(clock))
    spec = write_spec(tmp_path / "eta.yaml", 5, "  - {name: ref, label: reference}\n"
                                                "  - {name: other, label: other, set: {momentum: 0.9}}\n")
    results = tmp_path / "results"
    replicate.study.runner.run_table(spec, SMOKE, seeds=1, results_root=results, progress=False)
    capsys.readouterr()
    replicate.study.runner.run_table(spec, SMOKE, seeds=3, results_root=results, progress=False)
    err = capsys.readouterr().err
    assert "6 run(s): 2 with results already, 4 to run" in err
    assert "seed 1: running (study: 0/4 run)" in err  # nothing finished yet: no estimate
    assert "(0s; study: 1/4 run, about 5 min left)" in err  # 3 rows left at 100 s each (the fake says 0 s)
    assert "study: 4/4 run)" in err and "left)" not in err.splitlines()[-1]


def test_the_time_left_weighs_each_row_by_its_relative_cost(tmp_path, monkeypatch, capsys):
    """A row of twice the work counts twice: after the reference took 100 s, 'large' (smoke: twice the depth) is
    200 s away (3 min), not the 100 s (2 min) a mean over rows would say; a fine-tuning study's rows weigh alike."""
    monkeypatch.setattr(replicate.study.runner, "run_row", fake_run_row([]))
    monkeypatch.setattr(replicate.study.runner, "compute_baselines", lambda *a: {})
    clock = iter(range(0, 10_000, 100))
    monkeypatch.setattr(replicate.study.runner.time, "perf_counter", lambda: next(clock))
    spec = write_spec(tmp_path / "eta.yaml", 5, "  - {name: ref, label: reference}\n"
                                                "  - {name: large, label: large, set: {arch: vit_large}}\n")
    ref, large = (SMOKE.resolve(spec.setting(row)) for row in spec.rows)
    assert replicate.study.runner.relative_cost(spec, large) == 2 * replicate.study.runner.relative_cost(spec, ref) > 0
    replicate.study.runner.run_table(spec, SMOKE, seeds=1, results_root=tmp_path / "results", progress=False)
    assert "(0s; study: 1/2 run, about 3 min left)" in capsys.readouterr().err
    assert replicate.study.runner.relative_cost(load_spec(find_spec("table15")), large) == 1.0


def test_a_resumed_row_reports_its_whole_pretraining_time(tmp_path, monkeypatch, capsys):
    def resumed_run_row(spec, row, profile, seed, store, data_root, progress=True):
        record = fake_run_row([])(spec, row, profile, seed, store, data_root)
        return {**record, "wall_time_s": 120.0, "pretrain_s": 500.0, "_pretrained_before_s": 400.0}

    monkeypatch.setattr(replicate.study.runner, "run_row", resumed_run_row)
    monkeypatch.setattr(replicate.study.runner, "compute_baselines", lambda *a: {})
    spec = write_spec(tmp_path / "resumed.yaml", 5, "  - {name: ref, label: reference}\n")
    store = replicate.study.runner.run_table(spec, SMOKE, results_root=tmp_path / "results", progress=False)
    assert "(pretraining 500s in total, 400s of it before the resume; 120s in this run;" in capsys.readouterr().err
    assert "_pretrained_before_s" not in json.loads(store.path(spec.key, "ref", 0).read_text())


@pytest.mark.parametrize("checkpoint", [True, False])
def test_an_interrupted_row_says_where_it_picks_up(tmp_path, monkeypatch, capsys, checkpoint):
    from replicate.__main__ import main

    def interrupted(spec, row, profile, seed, store, data_root, progress=True):
        if checkpoint:
            path = store.checkpoint_path(spec.key, row.name, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(replicate.study.runner, "run_row", interrupted)
    monkeypatch.setattr(replicate.study.runner, "compute_baselines", lambda *a: {})
    assert main(["run", "table8", "--profile", "smoke", "--results", str(tmp_path), "--no-render"]) == 130
    err = capsys.readouterr().err
    said = "resumes from its last checkpoint" if checkpoint else "starts over (it had not reached its first checkpoint)"
    assert f"with_pred seed 0: interrupted; the next run of this study {said}" in err
    assert err.strip().endswith("interrupted: finished rows are saved; the same command continues the study")


def test_the_reduced_profile_is_the_frozen_v3_choice():
    """docs/reduced-scale.md, stage v3-3: `reduced` is candidate t40-n10k-e20 at lr scale 160 (the stage-2
    fallback), written out here so that no edit of the candidates moves it silently; the aligned profile stays
    what its committed results were made with."""
    from dataclasses import replace

    from replicate.study.profiles import PROFILES, REDUCED, REDUCED_ALIGNED, calibration_candidate

    assert replace(REDUCED, name="x", notes="") == replace(calibration_candidate("t40-n10k-e20-lr160"), name="x", notes="")
    assert (REDUCED.dataset, REDUCED.image_size, REDUCED.train_subset, REDUCED.patch_map[16], REDUCED.lr_scale,
            REDUCED.epoch_scale, REDUCED.batch_scale, REDUCED.archs["vit_base"]) == (
        "fashion_mnist_translated", 40, 10_000, 10, 160.0, 20 / 300, 1 / 32, (96, 4, 4))
    assert (REDUCED_ALIGNED.dataset, REDUCED_ALIGNED.image_size, REDUCED_ALIGNED.lr_scale,
            REDUCED_ALIGNED.epoch_scale) == ("fashion_mnist", 28, 20.0, 10 / 300)
    assert {"reduced", "reduced-aligned"} <= set(PROFILES)
