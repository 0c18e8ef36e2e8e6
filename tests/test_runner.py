"""Rows that are the same run in two studies are trained once: the second copies the first's record."""
import json

import pytest

import replicate.runner
from replicate.spec import load_spec


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
    store = replicate.runner.run_table(first, "smoke", results_root=results, progress=False)
    original = json.loads(store.path(first.key, "ref", 0).read_text())

    trained = []
    real_run_row = replicate.runner.run_row

    def counting_run_row(spec, row, *args, **kwargs):
        trained.append(row.name)
        return real_run_row(spec, row, *args, **kwargs)

    monkeypatch.setattr(replicate.runner, "run_row", counting_run_row)
    replicate.runner.run_table(second, "smoke", results_root=results, progress=False)
    assert trained == ["m0"]  # the shared row was not trained again; the different one was
    copy = json.loads(store.path(second.key, "ref", 0).read_text())
    assert copy["reused_from"] == f"{first.key}/ref/seed0" and copy["row"] == "ref" and copy["table"] == second.key
    assert copy["metrics"] == original["metrics"] and copy["config"] == original["config"]

    # the premise: a run is a deterministic function of its config, so --force reproduces the copied numbers
    replicate.runner.run_table(second, "smoke", results_root=results, progress=False, force=True)
    rerun = json.loads(store.path(second.key, "ref", 0).read_text())
    assert "reused_from" not in rerun and rerun["metrics"] == original["metrics"]
    assert rerun["curves"]["series"]["loss"] == original["curves"]["series"]["loss"]


def test_only_a_finished_pretraining_record_of_the_same_config_is_reused(tmp_path):
    from replicate.config import Setting
    from replicate.profiles import SMOKE
    from replicate.results import ResultStore

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
