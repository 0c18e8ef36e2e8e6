"""Study 15 (paper Table 5, end-to-end fine-tuning): the recipe at each scale, the spec kind, and a smoke run in
which scratch rows never pretrain and pretrained rows fine-tune from their pretrained backbone."""
import json

import pytest
import torch

import evals.finetune
import replicate.runtime.trainer
import replicate.study.transfer_row
from evals.finetune import PAPER_IMAGENET_FINETUNE, PAPER_IMAGENET_FINETUNE_LARGE
from replicate.study.export import export_row
from replicate.study.finetune_row import e2e_recipe, pretraining_run
from replicate.study.profiles import PAPER, PAPER_SMOKE, REDUCED, SMOKE
from replicate.study.results import ResultsError
from replicate.study.runner import run_table
from replicate.study.show import show_table
from replicate.study.spec import SpecError, find_spec, load_spec

SPEC = load_spec(find_spec("table15"))


def setting(row: str):
    return SPEC.setting(SPEC.row(row))


def test_paper_recipe_is_deits_with_the_rows_epochs_and_drop_path():
    assert e2e_recipe(setting("mocov3_vit_b"), PAPER) == PAPER_IMAGENET_FINETUNE  # 150 epochs, drop path 0.1
    assert e2e_recipe(setting("mocov3_vit_l"), PAPER) == PAPER_IMAGENET_FINETUNE_LARGE  # 100 epochs, drop path 0.5
    scratch = e2e_recipe(setting("scratch_vit_l"), PAPER)
    assert (scratch.epochs, scratch.drop_path, scratch.rand_augment) == (300, 0.1, "rand-m9-mstd0.5-inc1")
    assert [r.paper for r in SPEC.rows] == [83.2, 81.8, 84.1, None]  # DeiT-L diverged: no number


def test_small_recipes_scale_epochs_batch_and_lr_like_pretraining():
    b, s = e2e_recipe(setting("mocov3_vit_b"), REDUCED), e2e_recipe(setting("scratch_vit_b"), REDUCED)
    assert (b.epochs, s.epochs, b.batch) == (10, 20, 32)  # 150 / 300 epochs x 20/300; 1024 / 32
    assert b.lr == pytest.approx(5e-4 * 160 * 32 / 512)  # the profile's lr scale on DeiT's lr x batch / 512
    assert b.min_lr / b.lr == pytest.approx(1e-5 / PAPER_IMAGENET_FINETUNE.lr)  # the floor keeps its fraction
    assert (b.mixup, b.cutmix, b.reprob, b.rand_augment, b.crop_scale) == (0.0, 0.0, 0.0, None, (0.35, 1.0))
    assert e2e_recipe(setting("mocov3_vit_l"), SMOKE).drop_path == 0.5  # the row's meaning survives the scale


def test_pretraining_run_is_the_default_rows_config():
    """A pretrained row's pretraining is the same run as the default ViT-B row of a pretraining study."""
    default = load_spec(find_spec("table8"))
    cfg = REDUCED.resolve(setting("mocov3_vit_b"))
    assert pretraining_run(cfg) == REDUCED.resolve(default.setting(default.row("with_pred")))
    assert cfg != pretraining_run(cfg)


@pytest.mark.parametrize("kind, row_set, problem", [
    ("pretrain", "{finetune_epochs: 100}", "finetune_epochs applies to a `kind: finetune` study only"),
    ("transfer", "{finetune_drop_path: 0.5}", "finetune_drop_path applies to a `kind: finetune` study only"),
    ("finetune", "{init: supervised}", "a fine-tuning row starts from `pretrained` or `random`"),
])
def test_keys_a_kind_never_reads_are_one_line_errors(tmp_path, kind, row_set, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(f"id: 5\ntitle: t\npaper_ref: r\nkind: {kind}\nreference: a\n"
                    f"rows: [{{name: a, label: A, set: {row_set}}}]\n")
    with pytest.raises(SpecError, match="rows\\[0\\] \\(a\\)") as e:
        load_spec(path)
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_show_at_paper_scale_lists_the_fine_tuning_recipe():
    out = show_table(SPEC, PAPER)  # what `python -m replicate show table15 --profile paper` prints
    head = [c.strip() for c in out.splitlines()[1].strip("|").split("|")]
    rows = {cells[0]: dict(zip(head, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()[3:])}
    assert {r: rows[r]["ft epochs"] for r in rows} == {"mocov3_vit_b": "150", "scratch_vit_b": "300",
                                                       "mocov3_vit_l": "100", "scratch_vit_l": "300"}
    assert rows["mocov3_vit_l"]["drop path"] == "0.5" and rows["mocov3_vit_b"]["drop path"] == "0.1"
    assert rows["scratch_vit_b"]["start"] == "scratch" and rows["scratch_vit_b"]["epochs"] == "—"  # no pretraining
    assert rows["mocov3_vit_b"]["epochs"] == "300" and rows["mocov3_vit_b"]["ft batch"] == "1024"


@pytest.mark.smoke  # a one-row pretraining study, then study 15's four tiny rows: ~25 s on one core
def test_smoke_run_pretrains_only_the_pretrained_rows_and_fine_tunes_their_backbone(tmp_path, monkeypatch):
    """Scratch rows never pretrain; a pretrained row fine-tunes from exactly its pretrained backbone: ViT-B's is
    the kept backbone of an identical default row another study finished first, ViT-L's is pretrained by the row."""
    (tmp_path / "ref.yaml").write_text("id: 93\ntitle: Default row\npaper_ref: test\nreference: ref\n"
                                       "rows:\n  - {name: ref, label: default ViT-B}\n")
    store = run_table(load_spec(tmp_path / "ref.yaml"), SMOKE, results_root=tmp_path, progress=False)
    default_vit_b = torch.load(store.backbone_path("ref", "ref", 0), weights_only=True)["backbone"]
    real_pretrain, real_build = replicate.runtime.trainer.pretrain, evals.finetune.build_classifier
    pretrained, started = [], []

    def pretrain(cfg, *args, **kwargs):  # only mocov3_vit_l may get here
        assert cfg.setting.arch == "vit_large" and not pretrained, "a row pretrained that should not"
        result = real_pretrain(cfg, *args, **kwargs)
        pretrained.append({k: v.clone() for k, v in result.model.backbone.state_dict().items()})
        return result

    def build_classifier(cfg, num_classes, drop_path, backbone_state):  # the weights fine-tuning starts from
        model = real_build(cfg, num_classes, drop_path, backbone_state)
        started.append((backbone_state is not None, drop_path, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr(replicate.study.transfer_row, "pretrain", pretrain)
    monkeypatch.setattr(evals.finetune, "build_classifier", build_classifier)
    store = run_table(SPEC, SMOKE, results_root=tmp_path, progress=False)
    records = {r.name: json.loads(store.path(SPEC.key, r.name, 0).read_text()) for r in SPEC.rows}
    assert len(pretrained) == 1  # mocov3_vit_l; mocov3_vit_b reused the default row; scratch rows never pretrain
    assert [(loaded, dp) for loaded, dp, _ in started] == [(True, 0.1), (False, 0.1), (True, 0.5), (False, 0.1)]
    for backbone, (_, _, start) in ((default_vit_b, started[0]), (pretrained[0], started[2])):
        assert all(torch.equal(start[k], v) for k, v in backbone.items())  # every backbone weight, as pretrained
    assert [records[n]["pretrained_from"] for n in records] == ["ref/ref/seed0", None, "this row", None]
    for name, rec in records.items():
        assert rec["status"] == "ok" and list(rec["metrics"]) == ["finetune"], name
        assert 0.0 <= rec["metrics"]["finetune"] <= 100.0, name
    assert [records[n]["finetune_recipe"]["epochs"] for n in records] == [1, 2, 1, 2]  # 150/300/100/300 at smoke
    # the pretrained backbone is kept for `replicate export`, a scratch row keeps none; no checkpoint is left behind
    kept = torch.load(store.backbone_path(SPEC.key, "mocov3_vit_l", 0), weights_only=True)["backbone"]
    assert all(torch.equal(kept[k], v) for k, v in pretrained[0].items())
    assert not store.backbone_path(SPEC.key, "scratch_vit_b", 0).exists()
    with pytest.raises(ResultsError, match="trains from scratch"):
        export_row(SPEC, "scratch_vit_b", SMOKE, 0, "timm", tmp_path / "x.pth", results_root=tmp_path)
    assert not list((store.profile_dir / "ckpt").rglob("*.pt"))


def test_deits_rand_augment_survives_posterize_at_full_magnitude():
    """inc1 posterize keeps 0 bits at magnitude 10 (m9 +- 0.5 reaches it): a black image, as old Pillow gave, where
    the Pillow installed now raises and would end a paper-scale fine-tuning epoch."""
    from PIL import Image

    from evals.loaders import finetune_transforms

    train, _ = finetune_transforms(PAPER_IMAGENET_FINETUNE, 32)
    op = next(op for step in train.transforms for op in getattr(step, "ops", ()) if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
    out = op(Image.new("RGB", (32, 32), (200, 120, 40)))
    assert out.size == (32, 32) and out.getextrema() == ((0, 0), (0, 0), (0, 0))
    op.magnitude = 5  # 4 - int(2.0) = 2 bits: the real posterize, unchanged
    assert op(Image.new("RGB", (8, 8), (200, 120, 40))).getpixel((0, 0)) == (192, 64, 0)


@pytest.mark.smoke  # two rows on a generated 64-image ImageFolder, DataLoader workers: ~6 s on one busy core
def test_paper_path_fine_tunes_with_deits_data_pipeline(tmp_path):
    """At paper-smoke the rows take the paper's path: ImageFolder loaders with RandAugment, Mixup/CutMix, random
    erasing and repeated augmentation, scored on val/."""
    from tools.synthetic import main as synthetic_main

    synthetic_main([str(tmp_path / "data"), "--train-per-class", "16", "--val-per-class", "4"])
    text = find_spec("table15").read_text()
    rows = [line for line in text.splitlines() if "_vit_l," in line]
    (tmp_path / "two.yaml").write_text("\n".join(line for line in text.splitlines() if line not in rows) + "\n")
    spec = load_spec(tmp_path / "two.yaml")
    assert [r.name for r in spec.rows] == ["mocov3_vit_b", "scratch_vit_b"]
    store = run_table(spec, PAPER_SMOKE, data_root=str(tmp_path / "data"), results_root=tmp_path / "res",
                      progress=False)
    for row in spec.rows:
        rec = json.loads(store.path(spec.key, row.name, 0).read_text())
        assert rec["status"] == "ok" and 0.0 <= rec["metrics"]["finetune"] <= 100.0, row.name
        recipe = rec["finetune_recipe"]
        assert recipe["rand_augment"] and recipe["repeated_aug"] and (recipe["mixup"], recipe["cutmix"]) == (0.8, 1.0)
        assert recipe["batch"] == 4 and rec["config"]["dataset"] == "imagenet"


def test_a_diverged_fine_tuning_is_a_diverged_row_not_a_crash(tmp_path, monkeypatch):
    """DeiT-L from scratch diverges under DeiT's defaults (Sec. 6.3): such a row is recorded and rendered as
    diverged at its iteration, and the study goes on."""
    from dataclasses import replace

    import replicate.study.finetune_row
    from replicate.report.render import render_table

    monkeypatch.setattr(replicate.study.finetune_row, "PAPER_IMAGENET_FINETUNE",
                        replace(PAPER_IMAGENET_FINETUNE, base_lr=1e9, warmup_epochs=0))
    (tmp_path / "one.yaml").write_text("id: 92\ntitle: Diverges\npaper_ref: test\nkind: finetune\nmetric: finetune\n"
                                       "reference: deit\nrows:\n  - {name: deit, label: scratch, "
                                       "set: {init: random, finetune_epochs: 150}}\n")
    spec = load_spec(tmp_path / "one.yaml")
    store = run_table(spec, SMOKE, results_root=tmp_path, progress=False)
    rec = json.loads(store.path(spec.key, "deit", 0).read_text())
    assert (rec["status"], rec["diverged_in"], rec["metrics"]) == ("diverged", "finetuning", {})
    assert rec["diverged_at"] == 1  # the first step at lr 1e9 already overflows
    assert "diverged @1" in render_table(spec, store)


@pytest.mark.smoke  # one pretrained row, run twice: ~3 s on one core
def test_a_crash_while_fine_tuning_keeps_the_pretraining(tmp_path, monkeypatch):
    """The pretrained backbone is cached beside the row's checkpoint until the row is done: after a crash in
    fine-tuning, the re-run fine-tunes from the same weights without pretraining again, then drops the cache."""
    import replicate.study.finetune_row
    import replicate.study.transfer_row

    (tmp_path / "one.yaml").write_text("id: 91\ntitle: One row\npaper_ref: test\nkind: finetune\nmetric: finetune\n"
                                       "reference: moco\nrows:\n  - {name: moco, label: MoCo v3, "
                                       "set: {init: pretrained, finetune_epochs: 150}}\n")
    spec = load_spec(tmp_path / "one.yaml")
    real_finetune, starts = replicate.study.finetune_row.finetune, []

    def crash(state, *args, **kwargs):
        starts.append({k: v.clone() for k, v in state.items()})
        raise KeyboardInterrupt

    monkeypatch.setattr(replicate.study.finetune_row, "finetune", crash)
    with pytest.raises(KeyboardInterrupt):
        run_table(spec, SMOKE, results_root=tmp_path, progress=False)
    monkeypatch.setattr(replicate.study.transfer_row, "pretrain", lambda *a, **k: pytest.fail("pretraining ran again"))
    monkeypatch.setattr(replicate.study.finetune_row, "finetune",
                        lambda state, *a, **k: starts.append(state) or real_finetune(state, *a, **k))
    store = run_table(spec, SMOKE, results_root=tmp_path, progress=False)
    assert json.loads(store.path(spec.key, "moco", 0).read_text())["status"] == "ok"
    assert all(torch.equal(starts[1][k], v) for k, v in starts[0].items())
    assert not list((store.profile_dir / "ckpt").rglob("*.pt"))
