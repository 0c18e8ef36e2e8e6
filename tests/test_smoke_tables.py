"""End to end: every study runs at smoke scale, writes its result files, and renders beside the paper."""
import json

import pytest

from replicate.report.render import render_table
from replicate.study.profiles import SMOKE
from replicate.study.runner import run_table
from replicate.study.spec import all_specs

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def results_root(tmp_path_factory):
    return tmp_path_factory.mktemp("results")


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.key)
def test_table_runs_at_smoke_and_renders(spec, results_root):
    store = run_table(spec, SMOKE, seeds=1, results_root=results_root, progress=False)
    for row in spec.rows:
        record = json.loads(store.path(spec.key, row.name, 0).read_text())
        assert record["status"] in ("ok", "diverged")
        stored = record["config"]["setting"]  # the row's own overrides win over the spec's base, as written in YAML
        assert all(stored[k] == v for k, v in {**spec.base, **row.set}.items()), row.name
        assert record["provenance"]["packages"]["torch"] and record["provenance"]["cpu"]
        if record["status"] == "ok":
            assert record["metrics"] and all(0.0 <= v <= 100.0 for v in record["metrics"].values())
        if spec.kind == "transfer" and spec.setting(row).init == "pretrained":  # above chance: 20% (5 classes)
            assert list(record["metrics"]) == list(SMOKE.transfer_targets)
            assert all(v > 20.0 for v in record["metrics"].values()), record["metrics"]
        if spec.kind == "finetune" and record["status"] == "ok":  # top-1 after fine-tuning on the pretraining labels
            assert list(record["metrics"]) == ["finetune"]
    assert not list((store.profile_dir / "ckpt" / spec.key).rglob("*.pt"))  # checkpoints cleaned up
    text = render_table(spec, store, write=True)
    assert (store.profile_dir / f"{spec.key}.md").exists()
    if spec.kind == "transfer":
        assert "ours digits_disjoint" in text
    for row in spec.rows:
        assert row.label in text


def test_rerun_skips_finished_rows(results_root, capsys):
    spec = next(s for s in all_specs() if s.id == 8)
    run_table(spec, SMOKE, seeds=1, results_root=results_root, progress=False)
    before = {r.name: (results_root / "smoke" / spec.key / r.name / "seed0.json").stat().st_mtime_ns
              for r in spec.rows}
    run_table(spec, SMOKE, seeds=1, results_root=results_root, progress=False)
    after = {r.name: (results_root / "smoke" / spec.key / r.name / "seed0.json").stat().st_mtime_ns
             for r in spec.rows}
    assert before == after
    assert "done already" in capsys.readouterr().err
