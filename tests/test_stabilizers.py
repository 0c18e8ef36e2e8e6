"""Sec. 4.2's other stabilizers of a learned patch projection (BatchNorm, WeightNorm, gradient clipping; study 13)
and the training-length study (14): the models differ from the plain learned one exactly where they should,
clipping touches only the patch projection's gradient and the monitor keeps the raw one, a frozen projection with
a stabilizer is a one-line error, and both studies resolve at every profile."""
import copy

import pytest
import torch
from torch.nn.utils import parametrize

from replicate.core.config import Setting
from replicate.core.moco import SelfSupervisedViT
from replicate.core.model import build_vit, patch_projection_weight
from replicate.core.optim import build_optimizer
from replicate.report.render import render_table
from replicate.runtime.trainer import clip_patch_projection, compute_gradients, pretrain, train_step
from replicate.study.evaluate import Checkpoint, build_loaded_backbone
from replicate.study.export import backbone_state, how_to_load, timm_create_kwargs
from replicate.study.profiles import PROFILES, SMOKE
from replicate.study.results import ResultStore
from replicate.study.show import show_table
from replicate.study.spec import SpecError, find_spec, load_spec

CPU = torch.device("cpu")
BN_KEYS = {f"patch_embed.norm.bn.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                                 "num_batches_tracked")}
WN_KEYS = {"patch_embed.proj.parametrizations.weight.original0", "patch_embed.proj.parametrizations.weight.original1"}


def smoke_config(**setting):
    return SMOKE.resolve(Setting(patch_proj="learned", **setting))


def seeded_vit(**setting):
    torch.manual_seed(0)
    return build_vit(smoke_config(**setting))


def views(cfg, n=8):
    g = torch.Generator().manual_seed(1)
    shape = (n, cfg.in_chans, cfg.image_size, cfg.image_size)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_bn_adds_exactly_a_batchnorm_after_the_projection():
    plain, bn = seeded_vit(), seeded_vit(patch_proj_norm="bn")
    assert set(bn.state_dict()) - set(plain.state_dict()) == BN_KEYS
    assert set(plain.state_dict()) <= set(bn.state_dict())
    # the patch embeddings come out normalised per channel over (batch, tokens), as BatchNorm2d after the conv
    cfg = smoke_config()
    images = torch.randn(8, cfg.in_chans, cfg.image_size, cfg.image_size) * 3 + 1
    tokens, raw = bn.patch_embed.train()(images), plain.patch_embed(images)
    assert tokens.shape == raw.shape
    torch.testing.assert_close(tokens.mean(dim=(0, 1)), torch.zeros(cfg.embed_dim), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.var(dim=(0, 1), unbiased=False), torch.ones(cfg.embed_dim), atol=1e-3, rtol=0)
    assert raw.mean(dim=(0, 1)).abs().max() > 0.01  # not vacuous: without it they are not


def test_wn_reparametrizes_only_the_projection_weight_and_keeps_its_init():
    plain, wn = seeded_vit(), seeded_vit(patch_proj_norm="wn")
    assert parametrize.is_parametrized(wn.patch_embed.proj, "weight")
    assert set(wn.state_dict()) ^ set(plain.state_dict()) == WN_KEYS | {"patch_embed.proj.weight"}
    g, v = wn.patch_embed.proj.parametrizations.weight.original0, patch_projection_weight(wn)
    assert g.shape == (v.shape[0], 1, 1, 1) and v.shape == plain.patch_embed.proj.weight.shape
    torch.testing.assert_close(wn.patch_embed.proj.weight, plain.patch_embed.proj.weight)  # same xavier init
    for key, value in plain.state_dict().items():  # every other tensor is the plain model's
        if key != "patch_embed.proj.weight":
            assert torch.equal(value, wn.state_dict()[key]), key


@pytest.mark.parametrize("norm", ["bn", "wn"])
def test_variant_trains_a_step_and_its_backbone_reloads(norm, tmp_path):
    cfg = smoke_config(patch_proj_norm=norm)
    torch.manual_seed(0)
    model = SelfSupervisedViT(cfg)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    x1, x2 = views(cfg)
    loss, _ = train_step(model, build_optimizer(cfg, model), x1, x2, 0.99, cfg.lr, False, CPU)
    assert torch.isfinite(loss)
    after = model.backbone.state_dict()
    changed = {k for k in (BN_KEYS if norm == "bn" else WN_KEYS) if not torch.equal(before[k], after[k])}
    assert changed >= ({"patch_embed.norm.bn.running_mean"} if norm == "bn" else WN_KEYS)
    # the momentum encoder mirrors the layout (the EMA pairs parameters by position)
    assert model.momentum_backbone.state_dict().keys() == after.keys()
    # what `replicate export` keeps and `replicate evaluate` rebuilds: build_vit(cfg) loads it strictly
    assert timm_create_kwargs(cfg) is None  # timm's plain ViT has neither layer: build_vit is the way in
    for fmt in ("timm", "moco-v3"):  # nor does the official vits.py: both exports say where the file loads
        assert "build_vit(cfg)" in how_to_load(fmt, tmp_path / "x.pth", cfg)
    loaded = build_loaded_backbone(cfg, Checkpoint(None, backbone_state(model.backbone), "replicate-backbone/1",
                                                   None), "test").eval()
    model.backbone.eval()
    torch.testing.assert_close(loaded(x1), model.backbone(x1))


def proj_grads(model):
    return [p.grad.clone() for p in model.backbone.patch_embed.proj.parameters()]


def other_grads(model):
    proj = {id(p) for p in model.backbone.patch_embed.proj.parameters()}
    return [(n, p.grad.clone()) for n, p in model.named_parameters() if p.grad is not None and id(p) not in proj]


@pytest.mark.parametrize("norm", ["none", "wn"])
def test_clipping_bounds_the_projection_gradient_and_leaves_the_rest(norm):
    threshold = 1e-3
    cfg = smoke_config(patch_proj_norm=norm, patch_proj_clip=threshold)
    torch.manual_seed(0)
    clipped = SelfSupervisedViT(cfg)
    raw = copy.deepcopy(clipped)  # the same state, stepped without clipping
    x1, x2 = views(cfg)
    train_step(clipped, build_optimizer(cfg, clipped), x1, x2, 0.99, cfg.lr, False, CPU, clip=threshold)
    train_step(raw, build_optimizer(cfg, raw), x1, x2, 0.99, cfg.lr, False, CPU)
    raw_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in proj_grads(raw)]))
    clipped_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in proj_grads(clipped)]))
    assert raw_norm > 10 * threshold  # not vacuous: the raw gradient is far above the threshold
    assert clipped_norm <= threshold * (1 + 1e-4)
    for a, b in zip(proj_grads(clipped), proj_grads(raw)):  # rescaled, same direction
        torch.testing.assert_close(a, b * (clipped_norm / raw_norm))
    for (name, a), (_, b) in zip(other_grads(clipped), other_grads(raw)):
        assert torch.equal(a, b), name


def test_clipping_above_the_gradient_norm_changes_nothing():
    cfg = smoke_config(patch_proj_clip=1e6)
    torch.manual_seed(0)
    model = SelfSupervisedViT(cfg)
    optimizer = build_optimizer(cfg, model)
    compute_gradients(model, optimizer, *views(cfg), 0.99, cfg.lr, False, CPU)
    before = proj_grads(model)
    clip_patch_projection(model, cfg.setting.patch_proj_clip)
    assert all(torch.equal(a, b) for a, b in zip(before, proj_grads(model)))


def small_run(**setting):
    cfg = smoke_config(**setting).model_copy(update={"train_subset": 256, "monitor_every": 1})
    return pretrain(cfg, progress=False, max_steps=2)


def test_monitor_records_the_raw_gradient_under_clipping():
    """Fig. 4 shows raw gradients: the first step's recorded gradient (same state, same batch) is the unclipped
    one, while the weights after it differ (clipping did act)."""
    raw, clipped = small_run(patch_proj_norm="wn"), small_run(patch_proj_norm="wn", patch_proj_clip=1e-9)
    assert clipped.status == raw.status == "ok"
    assert clipped.monitor["series"]["grad_first"][0] == raw.monitor["series"]["grad_first"][0] > 1e-6
    assert not torch.equal(patch_projection_weight(clipped.model.backbone), patch_projection_weight(raw.model.backbone))


@pytest.mark.parametrize("extra", [{"patch_proj_norm": "bn"}, {"patch_proj_norm": "wn"}, {"patch_proj_clip": 0.1}])
def test_a_frozen_projection_with_a_stabilizer_is_a_one_line_error(tmp_path, extra):
    key, value = next(iter(extra.items()))
    path = tmp_path / "bad.yaml"
    path.write_text(f"id: 50\ntitle: t\npaper_ref: r\nreference: a\nrows: [{{name: a, label: A, set: "
                    f"{{patch_proj: random, {key}: {value}}}}}]\n")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    msg = str(e.value)
    assert "\n" not in msg and f"rows[0].set.{key}" in msg and "learned patch projection" in msg
    Setting(patch_proj="learned", **extra)  # the same with a learned projection is fine


def test_study_13_spans_learned_to_frozen_and_renders_without_paper_numbers(tmp_path):
    spec = load_spec(find_spec("table13"))
    settings = {r.name: spec.setting(r) for r in spec.rows}
    assert settings[spec.reference].patch_proj == "random"
    assert {s.patch_proj_norm for s in settings.values()} == {"none", "bn", "wn"}
    clips = sorted(s.patch_proj_clip for s in settings.values() if s.patch_proj_clip is not None)
    assert len(clips) >= 3 and clips[-1] / clips[0] >= 1e6  # from "no effect" to "effectively frozen"
    stabilizers = [r for r in spec.rows if settings[r.name].patch_proj_norm != "none"
                   or settings[r.name].patch_proj_clip is not None]
    assert stabilizers and all(r.paper is None and "Sec. 4.2" in r.note for r in stabilizers)
    text = render_table(spec, ResultStore(tmp_path, "smoke"))
    for row in stabilizers:
        line = next(x for x in text.splitlines() if x.startswith(f"| {row.label}"))
        assert "| n/a " in line and "no paper" in line


def test_training_length_keeps_the_warmup_and_scales_both_lengths_alike():
    spec = load_spec(find_spec("table14"))
    for arch in ("vit_s", "vit_b"):
        short, long = spec.row(f"{arch}_300ep"), spec.row(f"{arch}_600ep")
        assert long.vs == short.name and (short.paper, long.paper) == {"vit_s": (72.5, 73.4),
                                                                      "vit_b": (76.5, 76.7)}[arch]
        for profile in PROFILES.values():
            a, b = (profile.resolve(spec.setting(r)) for r in (short, long))
            assert b.epochs == 2 * a.epochs and b.warmup_epochs == a.warmup_epochs  # warmup: 40 paper epochs
    paper = PROFILES["paper"].resolve(spec.setting(spec.row("vit_b_600ep")))
    assert (paper.epochs, paper.warmup_epochs) == (600, 40)
    assert PROFILES["reduced"].resolve(spec.setting(spec.row("vit_b_600ep"))).epochs == 40


@pytest.mark.parametrize("table", ["table13", "table14"])
@pytest.mark.parametrize("profile", list(PROFILES))
def test_new_studies_resolve_at_every_profile(table, profile):
    spec = load_spec(find_spec(table))
    text = show_table(spec, PROFILES[profile])  # builds every row's backbone (on the meta device)
    assert all(f"| {r.name} " in text for r in spec.rows)
