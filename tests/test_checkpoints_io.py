"""Checkpoints in and out: a finished row keeps its backbone, `replicate export` writes it in timm's and the official
moco-v3 layout, and `replicate evaluate` scores those files (and the official checkpoint's layout) to the row's
recorded metrics."""
import json
from pathlib import Path

import pytest
import timm
import torch

import replicate.study.runner
from replicate.__main__ import main
from replicate.core.config import Setting
from replicate.core.model import build_vit
from replicate.study.evaluate import build_loaded_backbone, read_checkpoint, row_config
from replicate.study.export import BACKBONE_FORMAT, keep_backbone, timm_create_kwargs
from replicate.study.profiles import SMOKE
from replicate.study.results import ResultStore
from replicate.study.spec import SpecError, load_spec

ROW = "  - {name: ref, label: reference}\n"


def write_spec(path, table_id: int):
    path.write_text(f"id: {table_id}\ntitle: Checkpoints\npaper_ref: test\nreference: ref\n"
                    f"base: {{epochs: 100, warmup_epochs: 10}}\nrows:\n{ROW}")
    return load_spec(path)


@pytest.fixture(scope="module")
def finished_row(tmp_path_factory):
    """One smoke row run by the runner into a private results root (~15 s, shared by the tests below)."""
    root = tmp_path_factory.mktemp("ckpt_io")
    spec_path = root / "ckpt_io.yaml"
    spec = write_spec(spec_path, 94)
    results = root / "results"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPLICATE_COMPILE", "0")  # on a GPU the row would evaluate a compiled forward, `evaluate` an eager one
        store = replicate.study.runner.run_table(spec, SMOKE, results_root=results, progress=False)
    record = json.loads(store.path(spec.key, "ref", 0).read_text())
    return spec, spec_path, results, store, record


def test_a_finished_row_keeps_its_backbone_beside_its_result(finished_row):
    spec, _, _, store, record = finished_row
    path = store.backbone_path(spec.key, "ref", 0)
    assert record["status"] == "ok" and record["backbone"] == path.name == "seed0.backbone.pt"
    assert "_backbone" not in record
    saved = torch.load(path, weights_only=True)
    assert saved["format"] == BACKBONE_FORMAT and saved["config"] == record["config"]
    cfg = SMOKE.resolve(spec.setting(spec.row("ref")))
    assert saved["backbone"].keys() == build_vit(cfg).state_dict().keys()  # timm keys, no head
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in saved["backbone"].values())


@pytest.mark.parametrize("fmt", ["timm", "moco-v3", "backbone"])
def test_export_then_evaluate_reproduces_the_rows_metrics(finished_row, tmp_path, capsys, fmt):
    spec, spec_path, results, store, record = finished_row
    if fmt == "backbone":  # our own file: its stored config builds the model, no --row needed
        out, row_args = store.backbone_path(spec.key, "ref", 0), []
    else:
        out, row_args = tmp_path / f"export.{fmt}.pth", ["--row", f"{spec_path}:ref"]
        assert main(["export", str(spec_path), "ref", "--profile", "smoke", "--format", fmt, "-o", str(out),
                     "--results", str(results)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--profile", "smoke", *row_args, "--results", str(results), "--quiet"]) == 0
    printed = capsys.readouterr()
    written = Path(printed.err.strip().splitlines()[-1].removeprefix("-> "))
    assert written.parent == results / "smoke" / "evaluations"
    evaluation = json.loads(written.read_text())
    # the same weights, the same evaluation split and the probe seeded by the row's seed: identical numbers
    assert evaluation["metrics"] == record["metrics"]
    assert printed.out.strip() == ", ".join(f"{k} {v:.2f}" for k, v in record["metrics"].items())
    expected_format = {"timm": "timm", "moco-v3": "moco-v3", "backbone": BACKBONE_FORMAT}[fmt]
    assert evaluation["checkpoint"]["format"] == expected_format
    assert evaluation["config"] == record["config"] and "git_commit" in evaluation["provenance"]


def test_moco_v3_export_has_the_official_layout(finished_row, tmp_path):
    spec, spec_path, results, store, record = finished_row
    out = tmp_path / "official.pth.tar"
    assert main(["export", str(spec_path), "ref", "--profile", "smoke", "--format", "moco-v3", "-o", str(out),
                 "--results", str(results)]) == 0
    ckpt = torch.load(out, weights_only=True)
    backbone = torch.load(store.backbone_path(spec.key, "ref", 0), weights_only=True)["backbone"]
    assert ckpt["arch"] == "vit_base" and ckpt["epoch"] == record["config"]["epochs"]
    assert ckpt["state_dict"].keys() == {f"module.base_encoder.{k}" for k in backbone}
    # what the official main_lincls.py keeps: base_encoder keys without the head, prefix removed
    kept = {k[len("module.base_encoder."):]: v for k, v in ckpt["state_dict"].items()
            if k.startswith("module.base_encoder") and not k.startswith("module.base_encoder.head")}
    assert kept.keys() == backbone.keys()


def test_timm_export_loads_into_build_vit_and_timm_create_model(finished_row, tmp_path):
    spec, spec_path, results, _, record = finished_row
    out = tmp_path / "backbone.pth"
    assert main(["export", str(spec_path), "ref", "--profile", "smoke", "--format", "timm", "-o", str(out),
                 "--results", str(results)]) == 0
    cfg = SMOKE.resolve(spec.setting(spec.row("ref")))
    ours = build_vit(cfg)
    ours.load_state_dict(torch.load(out))
    kwargs = timm_create_kwargs(cfg)
    theirs = timm.create_model(kwargs.pop("model_name"), **kwargs, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(out)))
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in ours.state_dict().items())
    x = torch.randn(3, cfg.in_chans, cfg.image_size, cfg.image_size)
    assert torch.equal(ours.eval()(x), theirs.eval()(x))


@pytest.mark.parametrize("changes", [{}, {"pooling": "gap_ln"}, {"pooling": "gap"}, {"pos_embed": "none"},
                                     {"pos_embed": "learned"}], ids=str)
def test_timm_create_kwargs_build_the_same_vit(changes):
    cfg = SMOKE.resolve(Setting(**changes))
    ours = build_vit(cfg).eval()
    kwargs = timm_create_kwargs(cfg)
    theirs = timm.create_model(kwargs.pop("model_name"), **kwargs).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, cfg.in_chans, cfg.image_size, cfg.image_size)
    assert torch.equal(ours(x), theirs(x))
    assert timm_create_kwargs(SMOKE.resolve(Setting(norm_mlp="bn"))) is None  # ViT-BN: build_vit only


def official_checkpoint(backbone: torch.nn.Module) -> dict:
    """The layout facebookresearch/moco-v3's main_moco.py saves: the whole MoCo model under DDP's ``module.``."""
    sd = {f"module.base_encoder.{k}": v for k, v in backbone.state_dict().items()}
    for enc in ("base_encoder", "momentum_encoder"):
        sd[f"module.{enc}.head.0.weight"] = torch.randn(64, 32)
        sd[f"module.{enc}.head.1.running_mean"] = torch.zeros(64)
    sd.update({f"module.momentum_encoder.{k}": v.clone() for k, v in backbone.state_dict().items()})
    sd["module.predictor.0.weight"] = torch.randn(64, 32)
    return {"epoch": 300, "arch": "vit_base", "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0}}


def test_an_official_moco_v3_checkpoint_loads_with_no_missing_keys(tmp_path):
    cfg = SMOKE.resolve(Setting())
    torch.manual_seed(1)
    source = build_vit(cfg)
    path = tmp_path / "vit-b-300ep.pth.tar"
    torch.save(official_checkpoint(source), path)
    ckpt = read_checkpoint(path)
    assert ckpt.format == "moco-v3" and ckpt.config is None
    assert ckpt.state.keys() == source.state_dict().keys()  # heads, momentum encoder, predictor dropped
    loaded = build_loaded_backbone(cfg, ckpt, "the default vit_base")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


def test_a_checkpoint_that_does_not_fit_is_one_line_naming_the_key(tmp_path, capsys):
    narrow = build_vit(SMOKE.resolve(Setting(arch="vit_small")))  # 24 wide; the default vit_base is 32
    path = tmp_path / "narrow.pth"
    torch.save(narrow.state_dict(), path)
    results = tmp_path / "results"
    assert main(["evaluate", str(path), "--profile", "smoke", "--results", str(results), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "cls_token has shape (1, 1, 24) in the checkpoint, the model expects (1, 1, 32)" in err
    assert not results.exists()


def test_a_missing_key_is_named(tmp_path):
    cfg = SMOKE.resolve(Setting())
    state = build_vit(cfg).state_dict()
    del state["norm.weight"]
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"norm\.weight is missing from the checkpoint \(the model expects shape "
                                         r"\(32,\)\)"):
        build_loaded_backbone(cfg, read_checkpoint(path), "the default vit_base")


def test_export_without_a_result_says_to_run_the_table(tmp_path, capsys):
    code = main(["export", "table5", "sincos", "--profile", "smoke", "--format", "timm", "-o",
                 str(tmp_path / "x.pth"), "--results", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "seed0.json" in err and "run the table first: replicate run table5 --profile smoke" in err
    # a result without its backbone file (made before backbones were kept, or copied without them)
    store = ResultStore(tmp_path / "results", "smoke")
    store.save("05_position_embedding", "sincos", 0, {"status": "ok", "metrics": {}})
    assert main(["export", "table5", "sincos", "--profile", "smoke", "--format", "timm", "-o",
                 str(tmp_path / "x.pth"), "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seed0.backbone.pt is missing" in err
    assert f"replicate run table5 --profile smoke --results {tmp_path / 'results'} --force" in err
    # the committed results never had backbones: the fix runs into a folder of the user's own, not --force
    default = ResultStore(None, "reduced-aligned")
    assert default.load("05_position_embedding", "sincos", 0) is not None  # committed
    if not default.backbone_path("05_position_embedding", "sincos", 0).exists():
        assert main(["export", "table5", "sincos", "--profile", "reduced-aligned", "--format", "timm", "-o",
                     str(tmp_path / "x.pth")]) == 2
        err = capsys.readouterr().err
        assert "not committed" in err and "--results my-results" in err and "--force" not in err
    assert not (tmp_path / "x.pth").exists()


def test_an_unknown_row_is_one_line_naming_the_studys_rows(tmp_path, capsys):
    assert main(["export", "table5", "nosuch", "--profile", "smoke", "--format", "timm", "-o", str(tmp_path / "x.pth"),
                 "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "table5 has no row 'nosuch'; its rows: sincos, learned, none" in err
    with pytest.raises(SpecError, match=r"^--row table5:nosuch: table5 has no row 'nosuch'; its rows: sincos"):
        row_config("table5:nosuch", "smoke", 0)
    assert not (tmp_path / "results").exists() and not (tmp_path / "x.pth").exists()


def test_a_reused_row_shares_its_twins_backbone(finished_row, tmp_path):
    spec, _, results, store, record = finished_row
    twin = write_spec(tmp_path / "ckpt_io_twin.yaml", 95)
    replicate.study.runner.run_table(twin, SMOKE, results_root=results, progress=False)
    copy = json.loads(store.path(twin.key, "ref", 0).read_text())
    assert copy["reused_from"] == f"{spec.key}/ref/seed0" and copy["backbone"] == "seed0.backbone.pt"
    assert store.backbone_path(twin.key, "ref", 0).read_bytes() == store.backbone_path(spec.key, "ref", 0).read_bytes()


def test_a_row_that_did_not_finish_keeps_no_backbone(tmp_path):
    store = ResultStore(tmp_path, "smoke")
    where = ("t", "r", 0)
    cfg = SMOKE.resolve(Setting())
    ok = {"status": "ok", "config": cfg.model_dump(mode="json")}
    keep_backbone(store, where, ok, build_vit(cfg))
    assert ok["backbone"] == "seed0.backbone.pt" and store.backbone_path(*where).exists()
    diverged = {"status": "diverged", "config": ok["config"]}  # a re-run that diverged: the old file must go
    keep_backbone(store, where, diverged, build_vit(cfg))
    assert "backbone" not in diverged and not store.backbone_path(*where).exists()
