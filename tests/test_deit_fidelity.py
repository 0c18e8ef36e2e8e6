"""Fine-tuning against DeiT's code (facebookresearch/deit main.py at 0282d2a with timm 0.3.2, which the paper's
Sec. 6.3 "DeiT codebase with all its default settings" runs): the lr of every iteration against values written out
by hand and against timm's own scheduler driven by DeiT's loop, the loop's lrs, and DeiT's model init."""
import math
from argparse import Namespace
from dataclasses import replace

import numpy as np
import pytest
import timm.optim
import torch
from timm.scheduler import create_scheduler
from torch import nn

from evals.finetune import (
    PAPER_IMAGENET_FINETUNE,
    PAPER_TRANSFER_RECIPES,
    SMALL_TRANSFER_RECIPES,
    build_classifier,
    deit_lr_schedule,
    train_classifier,
)
from replicate.core.config import Setting
from replicate.core.data import TensorSplit
from replicate.core.model import build_vit, sincos_2d_position_embedding
from replicate.study.finetune_row import e2e_recipe
from replicate.study.profiles import PAPER, REDUCED, SMOKE
from replicate.study.spec import find_spec, load_spec

E2E = load_spec(find_spec("table15"))


def schedule(recipe, ipe, peak=None):
    return deit_lr_schedule(peak or recipe.lr, recipe.min_lr, recipe.warmup_lr, recipe.epochs, recipe.warmup_epochs,
                            ipe, recipe.lr_steps_per_epoch)


def deit_main_lrs(epochs, warmup_epochs, lr, min_lr=1e-5, warmup_lr=1e-6, iters_per_epoch=1):
    """The lr of every iteration of DeiT's main.py: its argparse defaults into timm's ``create_scheduler``, the
    optimizer at the scaled lr, ``train_one_epoch`` at whatever lr the scheduler left, ``lr_scheduler.step(epoch)``
    after each epoch (main.py lines ~270-360 at 0282d2a, re-typed)."""
    args = Namespace(sched="cosine", epochs=epochs, lr=lr, lr_noise=None, lr_noise_pct=0.67, lr_noise_std=1.0,
                     warmup_lr=warmup_lr, min_lr=min_lr, decay_epochs=30, warmup_epochs=warmup_epochs,
                     cooldown_epochs=10, patience_epochs=10, decay_rate=0.1, seed=0)
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=args.lr)
    lr_scheduler, _ = create_scheduler(args, optimizer)  # DeiT drops the length with the 10 cooldown epochs
    seen = []
    for epoch in range(0, args.epochs):
        seen += [optimizer.param_groups[0]["lr"]] * iters_per_epoch  # train_one_epoch
        lr_scheduler.step(epoch)
    return np.array(seen)


def test_paper_schedule_by_hand():
    """DeiT-B fine-tuning: peak 5e-4 x 1024/512 = 1e-3; epochs 0 and 1 at the warmup lr 1e-6, then the linear warmup
    (1e-6 + t (1e-3 - 1e-6) / 5 at t = epoch - 1), then the cosine over t / 150 from t = 0: at t = 5 it is already
    below the peak, at t = 75 it is (peak + min_lr) / 2, and the last epoch trains at t = 148."""
    lrs = schedule(PAPER_IMAGENET_FINETUNE, 3)
    per_epoch = lrs[::3]
    assert np.array_equal(lrs, np.repeat(per_epoch, 3))  # constant within an epoch
    by_hand = {0: 1e-6, 1: 1e-6, 2: 2.008e-4, 3: 4.006e-4, 4: 6.004e-4, 5: 8.002e-4,
               6: 1e-5 + 0.495e-3 * (1 + 0.9945218953682733),  # cos(pi 5 / 150)
               76: 5.05e-4, 149: 1e-5 + 0.495e-3 * (1 - 0.9991228300988584)}  # cos(pi 2 / 150)
    for epoch, lr in by_hand.items():
        assert per_epoch[epoch] == pytest.approx(lr, rel=1e-9), epoch
    assert len(per_epoch) == 150 and per_epoch.max() < 1e-3


@pytest.mark.parametrize("epochs, warmup, lr", [(150, 5, 1e-3), (300, 5, 1e-3), (100, 3, 6e-4), (10, 0, 5e-4)],
                         ids=["moco-vit-b", "deit-b-scratch", "transfer", "no-warmup"])
def test_schedule_is_timms_scheduler_in_deits_loop(epochs, warmup, lr):
    ours = deit_lr_schedule(lr, 1e-5, 1e-6, epochs, warmup, iters_per_epoch=4)
    np.testing.assert_allclose(ours, deit_main_lrs(epochs, warmup, lr, iters_per_epoch=4), rtol=1e-12, atol=0)


def test_paper_recipes_are_deits_schedule():
    for recipe in (PAPER_IMAGENET_FINETUNE, *PAPER_TRANSFER_RECIPES.values()):
        assert (recipe.warmup_lr, recipe.min_lr, recipe.lr_steps_per_epoch) == (1e-6, 1e-5, 1)
    recipe = e2e_recipe(E2E.setting(E2E.row("mocov3_vit_b")), PAPER)
    np.testing.assert_allclose(schedule(recipe, 2), deit_main_lrs(150, 5, 1e-3, iters_per_epoch=2), rtol=1e-12)


@pytest.mark.parametrize("profile", [REDUCED, SMOKE], ids=lambda p: p.name)
def test_small_profile_steps_deits_scheduler_once_per_scaled_epoch(profile):
    """A profile that turns DeiT's 150 epochs into 150 x epoch_scale steps the scheduler 1/epoch_scale times per
    epoch: the lr as a fraction of the peak, scheduler step by scheduler step, is DeiT's epoch by epoch."""
    recipe = e2e_recipe(E2E.setting(E2E.row("mocov3_vit_b")), profile)
    k = recipe.lr_steps_per_epoch
    assert k == round(1 / profile.epoch_scale) and recipe.epochs * k == 150
    assert recipe.warmup_lr / recipe.lr == pytest.approx(1e-6 / 1e-3) and recipe.min_lr / recipe.lr == pytest.approx(1e-2)
    ipe = 2 * k  # two iterations per scheduler step
    ours = schedule(recipe, ipe)[::2] / recipe.lr
    np.testing.assert_allclose(ours, deit_main_lrs(150, 5, 1e-3) / 1e-3, rtol=1e-9)


def test_small_transfer_recipes_have_about_deits_number_of_steps():
    for name, recipe in SMALL_TRANSFER_RECIPES.items():
        assert (recipe.warmup_lr, recipe.min_lr) == (1e-6, 1e-5), name
        assert 90 <= recipe.epochs * recipe.lr_steps_per_epoch <= 110, name  # the paper's 100 epochs
        lrs = schedule(recipe, 5 * recipe.lr_steps_per_epoch)
        assert (lrs == recipe.warmup_lr).mean() <= 0.03, name  # 2 steps of ~100; stepped per epoch, 2 of 10 epochs


def test_the_loop_trains_each_iteration_at_the_schedules_lr(monkeypatch):
    """train_classifier's optimizer steps at exactly deit_lr_schedule's lrs (caught at every optimizer.step)."""
    seen = []
    real = timm.optim.create_optimizer_v2

    def recording(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, *_: seen.append([g["lr"] for g in opt.param_groups]))
        return optimizer

    monkeypatch.setattr(timm.optim, "create_optimizer_v2", recording)
    cfg = SMOKE.resolve(Setting())
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.rand(64, 1, cfg.image_size, cfg.image_size, generator=g), torch.arange(64) % 4)
    recipe = replace(SMALL_TRANSFER_RECIPES["smoke"], epochs=3, batch=16, lr_steps_per_epoch=2)
    model = build_classifier(cfg, 4, 0.0, None)
    train_classifier(model, recipe, cfg, split, 4, torch.device("cpu"), progress=False)
    expected = schedule(recipe, 4)  # 64 images / 16
    assert len(seen) == len(expected) == 12
    assert all(set(lrs) == {lr} for lrs, lr in zip(seen, expected))  # every parameter group, every step
    assert seen[0][0] == seen[2][0] == 1e-6  # scheduler steps 0 and 1 (two iterations each) at the warmup lr


# The model DeiT fine-tunes and trains from scratch ---------------------------------------------------------------

def test_head_is_deits_trunc_normal_and_the_backbone_is_loaded_as_is():
    """DeiT builds its model (every Linear, the head included, trunc-normal(0.02), zero bias), then loads the
    converted MoCo checkpoint, which has no head: the head keeps DeiT's init, not xavier-uniform."""
    cfg = REDUCED.resolve(Setting())
    torch.manual_seed(1)
    backbone = build_vit(cfg).state_dict()
    torch.manual_seed(2)
    model = build_classifier(cfg, 100, 0.1, backbone)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in backbone.items())  # sin-cos table and MoCo weights as pretrained
    w = model.head.weight.detach()  # (100, 96)
    assert w.std().item() == pytest.approx(0.02, rel=0.05) and abs(w.mean().item()) < 0.002
    xavier_std = math.sqrt(2.0 / (100 + 96))  # ~0.1: what the head had before
    assert w.std().item() < 0.3 * xavier_std
    assert torch.equal(model.head.bias, torch.zeros(100))
    assert all(p.requires_grad for p in model.parameters())  # everything trains, the frozen sin-cos table included


def test_a_row_from_scratch_is_deits_model():
    """DeiT from scratch: learned position embedding and [CLS] trunc-normal(0.02), Linears trunc-normal(0.02) with
    zero bias, LayerNorm 1/0, patch projection PyTorch's conv default U(+-1/sqrt(fan_in)); not the MoCo init (xavier,
    [CLS] N(0, 1e-6), the frozen sin-cos table)."""
    cfg = REDUCED.resolve(Setting())  # the default row: sin-cos position embedding, random patch projection
    torch.manual_seed(0)
    model = build_classifier(cfg, 10, 0.1, None)
    pos = model.pos_embed.detach()[0]
    assert pos.std().item() == pytest.approx(0.02, rel=0.05) and model.pos_embed.requires_grad
    table = sincos_2d_position_embedding(*model.patch_embed.grid_size, cfg.embed_dim)
    assert not torch.allclose(pos[1:], table, atol=0.1)
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.25)  # 96 values
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.1), name
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    proj = model.patch_embed.proj
    fan_in = cfg.in_chans * cfg.patch_size ** 2  # 49
    assert proj.weight.abs().max().item() <= 1 / math.sqrt(fan_in)
    assert proj.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.1)
    assert 0 < proj.bias.abs().max().item() <= 1 / math.sqrt(fan_in)
    assert proj.weight.requires_grad and proj.bias.requires_grad


def test_scratch_init_under_weight_norm_goes_through_the_parametrization():
    cfg = REDUCED.resolve(Setting(patch_proj="learned", patch_proj_norm="wn"))
    model = build_classifier(cfg, 10, 0.0, None)
    w = model.patch_embed.proj.weight.detach()  # g |v| recomputed: the init survives the parametrization
    assert w.abs().max().item() <= 1 / 10 + 1e-6 and w.std().item() == pytest.approx(1 / math.sqrt(3 * 100), rel=0.1)
