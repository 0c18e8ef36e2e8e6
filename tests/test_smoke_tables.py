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
        assert record["status"] == "ok", row.name  # no row diverges at smoke scale (seeds 0-3 checked)
        stored = record["config"]["setting"]  # the row's own overrides win over the spec's base, as written in YAML
        assert all(stored[k] == v for k, v in {**spec.base, **row.set}.items()), row.name
        assert record["provenance"]["packages"]["torch"] and record["provenance"]["cpu"]
        metrics = record["metrics"]
        assert metrics and all(0.0 <= v <= 100.0 for v in metrics.values()), row.name
        # what each kind shows at smoke scale (seeds 0-3: kNN/linear 64-89%, transfer 64-82%, fine-tuning 10-45%)
        if spec.kind == "pretrain":  # 10 digits, chance 10%: a collapsed or label-shuffled backbone scores ~10%
            assert list(metrics) == ["knn", "linear"] and min(metrics.values()) > 50.0, (row.name, metrics)
        if spec.kind == "transfer":  # chance 20% (digits 5-9) and 10% (all ten digits), from every initialisation
            assert list(metrics) == list(SMOKE.transfer_targets) and min(metrics.values()) > 40.0, (row.name, metrics)
        if spec.kind == "finetune":  # one or two epochs of fine-tuning: near chance at smoke, so only its presence
            assert list(metrics) == ["finetune"]
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


def test_same_seed_gives_identical_metrics(results_root, tmp_path):
    """A study run again from scratch with the same seed gives bit-identical metrics (smoke runs of every study were
    compared so, twice; here the two-row default study, against the module's first run)."""
    spec = next(s for s in all_specs() if s.id == 8)
    first = run_table(spec, SMOKE, seeds=1, results_root=results_root, progress=False)
    second = run_table(spec, SMOKE, seeds=1, results_root=tmp_path, progress=False)
    for row in spec.rows:
        a, b = (json.loads(store.path(spec.key, row.name, 0).read_text())["metrics"] for store in (first, second))
        assert a == b, row.name
