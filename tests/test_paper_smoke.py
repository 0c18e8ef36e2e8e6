"""The paper-smoke profile: the paper's ImageFolder code path end to end, on a generated ImageFolder, in seconds."""
import json
import time

import pytest

from replicate.study.profiles import PAPER, PAPER_SMOKE
from replicate.study.runner import run_table
from replicate.study.show import show_table
from replicate.study.spec import all_specs, find_spec, load_spec
from tools.synthetic import main as synthetic_main


def test_every_study_resolves_at_paper_smoke():
    for spec in all_specs():
        text = show_table(spec, PAPER_SMOKE)
        assert all(row.name in text for row in spec.rows), spec.key
    spec = load_spec(find_spec("table5"))
    cfg = PAPER_SMOKE.resolve(spec.setting(spec.row(spec.reference)))
    # the paper's code path: the ImageFolder dataset key, DataLoader workers, the official probe, the queue monitor
    assert (cfg.dataset, cfg.linear_protocol, cfg.metrics) == (PAPER.dataset, "paper", PAPER.metrics)
    assert cfg.num_workers == 2 and cfg.monitor_probe == 0 and cfg.in_chans == 3
    assert (cfg.batch_size, cfg.epochs, cfg.image_size, cfg.patch_size) == (16, 2, 32, 8)


@pytest.mark.smoke  # three rows with DataLoader workers: ~30 s on one busy core
def test_table5_runs_on_a_generated_image_folder(tmp_path):
    data = tmp_path / "data"
    assert synthetic_main([str(data)]) == 0  # the CLI a user or CI runs first
    assert sorted(p.name for p in (data / "train").iterdir()) == ["class0", "class1", "class2", "class3"]
    spec = load_spec(find_spec("table5"))
    t0 = time.perf_counter()
    store = run_table(spec, PAPER_SMOKE, seeds=1, data_root=str(data), results_root=tmp_path / "results",
                      progress=False)
    print(f"paper-smoke table5: {time.perf_counter() - t0:.1f} s")
    for row in spec.rows:
        record = json.loads(store.path(spec.key, row.name, 0).read_text())
        assert record["status"] == "ok", row.name
        assert 0.0 <= record["metrics"]["linear"] <= record["metrics"]["linear_best"] <= 100.0, row.name
        assert 0.0 <= record["metrics"]["knn"] <= 100.0, row.name  # features extracted through the eval loaders
        assert record["config"]["dataset"] == "imagenet" and record["config"]["num_workers"] == 2
        assert record["probe_precision"] == "fp32"  # the official probe's precision, recorded
        assert record["curves"]["knn_acc"], row.name  # App. A's queue monitor ran during pretraining
    assert not list((store.profile_dir / "ckpt").rglob("*.pt"))  # periodic checkpoints, cleaned up at the end


@pytest.mark.smoke  # one paper-smoke row, run three times: ~30 s on one core
def test_a_crash_in_the_probe_resumes_the_probe_not_the_pretraining(tmp_path, monkeypatch):
    """An ImageFolder row keeps its finished pretraining until it is evaluated: after a crash in the linear probe,
    the re-run restores that backbone instead of pretraining again, and scores what an uninterrupted run scores."""
    import replicate.study.runner as runner
    from evals import linear

    data = tmp_path / "data"
    synthetic_main([str(data), "--train-per-class", "16", "--val-per-class", "4"])
    (tmp_path / "one.yaml").write_text("id: 94\ntitle: One row\npaper_ref: test\nreference: ref\n"
                                       "base: {epochs: 300}\nrows:\n  - {name: ref, label: reference}\n")
    spec = load_spec(tmp_path / "one.yaml")

    def run(results):
        store = run_table(spec, PAPER_SMOKE, data_root=str(data), results_root=tmp_path / results, progress=False)
        return json.loads(store.path(spec.key, "ref", 0).read_text())

    uninterrupted = run("a")
    real_top1 = linear._top1
    monkeypatch.setattr(linear, "_top1", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))  # dies in epoch 0
    with pytest.raises(KeyboardInterrupt):
        run("b")
    kept = list((tmp_path / "b").rglob("*.pretrained.pt"))
    assert len(kept) == 1
    monkeypatch.setattr(linear, "_top1", real_top1)
    monkeypatch.setattr(runner, "pretrain", lambda *a, **k: pytest.fail("pretraining ran again"))
    resumed = run("b")
    assert resumed["metrics"] == uninterrupted["metrics"]
    assert resumed["iterations"] == uninterrupted["iterations"]
    assert not kept[0].exists()  # removed once the row is evaluated


def test_a_batch_beyond_an_image_folder_is_refused_before_any_write(tmp_path):
    """ImageFolder data is counted (as far as the largest batch) before anything is written: 8 images cannot feed
    paper-smoke's 16 images per step."""
    from replicate.study.results import CurrentConfigs
    from replicate.study.runner import check_inputs

    data = tmp_path / "data"
    synthetic_main([str(data), "--train-per-class", "2", "--val-per-class", "1"])
    spec = load_spec(find_spec("table5"))
    with pytest.raises(Exception, match=r"16 images per step at profile paper-smoke, more than its 8 training images"):
        check_inputs(CurrentConfigs(spec, PAPER_SMOKE), str(data))
    synthetic_main([str(data / "big"), "--train-per-class", "4", "--val-per-class", "1"])
    check_inputs(CurrentConfigs(spec, PAPER_SMOKE), str(data / "big"))  # 16 images: one full batch
