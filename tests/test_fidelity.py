"""Pins every MoCo v3 semantic the suite claims (paper text and official ``facebookresearch/moco-v3`` code).

Each test compares against a reference written out here (formula, official code re-typed, or a hand computation),
never against the implementation itself. Tiny SMOKE-profile models keep the whole file to seconds; the paper-scale
models are only ever built on the meta device.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm.optim
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from replicate.core.config import RunConfig, Setting
from replicate.core.moco import SelfSupervisedViT, build_model, contrastive_loss
from replicate.core.model import TokenBatchNorm, build_vit, count_parameters, sincos_2d_position_embedding
from replicate.core.optim import build_optimizer
from replicate.core.schedules import lr_schedule, momentum_schedule
from replicate.runtime import trainer
from replicate.study.profiles import PAPER, REDUCED, SMOKE
from replicate.study.spec import all_specs

SPECS = all_specs()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core box: intra-op threads only contend (measured 8 s -> 0.4 s per pretrain)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smoke(**kw) -> RunConfig:
    return SMOKE.resolve(Setting(**kw))


def images(cfg: RunConfig, n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g)


def model_for(cfg: RunConfig, seed: int = 0) -> SelfSupervisedViT:
    torch.manual_seed(seed)
    return SelfSupervisedViT(cfg)


def has_bn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def perturb_key_encoder(model: SelfSupervisedViT, scale: float = 0.05) -> None:
    """Make f_k differ from f_q so that tests can tell which one produced the keys."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.momentum_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def reference_ctr(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 1 / Alg. 1 written out: -mean_i log softmax_j(q_i . k_j / tau)[i], times 2 tau."""
    q = q / q.norm(dim=1, keepdim=True)
    k = k / k.norm(dim=1, keepdim=True)
    logits = q @ k.T / tau
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
    return -log_prob.diagonal().mean() * (2 * tau)


# 1-2. The loss --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_contrastive_loss_matches_written_out_infonce(tau):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    expected = reference_ctr(q.double(), k.double(), tau)
    torch.testing.assert_close(contrastive_loss(q, k, tau).double(), expected, rtol=1e-5, atol=1e-6)
    # l2-normalised inputs: rescaling q or k changes nothing
    torch.testing.assert_close(contrastive_loss(3 * q, 0.5 * k, tau), contrastive_loss(q, k, tau))


def test_forward_is_symmetrised_ctr_with_keys_from_the_just_updated_key_encoder():
    cfg = smoke()
    model = model_for(cfg).train()
    perturb_key_encoder(model)
    x1, x2 = images(cfg, seed=1), images(cfg, seed=2)
    k_before = model.keys(x2).detach()
    loss, _ = model(x1, x2, 0.5)
    with torch.no_grad():  # train-mode BN uses batch statistics, so re-running the modules reproduces forward
        q1 = model.predictor(model.projector(model.backbone(x1)))
        q2 = model.predictor(model.projector(model.backbone(x2)))
        k1 = model.momentum_projector(model.momentum_backbone(x1))
        k2 = model.momentum_projector(model.momentum_backbone(x2))
    tau = cfg.setting.temperature
    expected = reference_ctr(q1, k2, tau) + reference_ctr(q2, k1, tau)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the keys come from the encoder *after* this call's momentum update (official builder.py order)
    assert not torch.allclose(k_before, k2, atol=1e-4)


def test_m0_keys_are_the_online_projections():
    cfg = smoke(momentum=0.0, momentum_schedule="constant")
    model = model_for(cfg).train()
    perturb_key_encoder(model)
    x1, x2 = images(cfg, seed=1), images(cfg, seed=2)
    loss, _ = model(x1, x2, 0.0)
    with torch.no_grad():
        z1, z2 = model.projector(model.backbone(x1)), model.projector(model.backbone(x2))
        q1, q2 = model.predictor(z1), model.predictor(z2)
    tau = cfg.setting.temperature
    assert loss.item() == pytest.approx((reference_ctr(q1, z2, tau) + reference_ctr(q2, z1, tau)).item(), rel=1e-5)


# 3-4. The momentum encoder --------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [0.0, 1.0, 0.9])
def test_momentum_update_is_lerp_over_parameters(m):
    model = model_for(smoke())
    perturb_key_encoder(model)
    online = [p.detach().clone() for p in model.online_parameters()]
    key_before = [p.detach().clone() for p in model.momentum_parameters()]
    bn_stats = model.momentum_projector[1].running_mean.clone()
    with torch.no_grad():
        model.projector[1].running_mean.add_(1.0)
    model.update_momentum_encoder(m)
    key_after = [p.detach() for p in model.momentum_parameters()]
    for q, k0, k1 in zip(online, key_before, key_after, strict=True):
        if m == 0.0:
            assert torch.equal(k1, q)
        elif m == 1.0:
            assert torch.equal(k1, k0)
        else:
            torch.testing.assert_close(k1, m * k0 + (1 - m) * q)
    for q, p in zip(online, model.online_parameters(), strict=True):
        assert torch.equal(q, p)  # the query encoder is untouched
    # buffers (BN running statistics) are not averaged, as the official code (parameters only)
    assert torch.equal(model.momentum_projector[1].running_mean, bn_stats)


def test_momentum_parameters_pair_with_online_ones_by_name():
    model = model_for(smoke())
    online = [(n, p.shape) for n, p in [*model.backbone.named_parameters(), *model.projector.named_parameters()]]
    key = [(n, p.shape) for n, p in [*model.momentum_backbone.named_parameters(),
                                     *model.momentum_projector.named_parameters()]]
    assert online == key
    assert len(model.momentum_parameters()) == len(model.online_parameters())


def test_key_encoder_has_no_predictor_and_is_not_optimised():
    cfg = smoke()
    model = model_for(cfg)
    momentum = {id(p) for p in model.momentum_parameters()}
    predictor = {id(p) for p in model.predictor.parameters()}
    online = {id(p) for p in model.online_parameters()}
    assert predictor and not predictor & momentum
    assert {n for n, _ in model.named_children()} == {
        "backbone", "projector", "predictor", "momentum_backbone", "momentum_projector"}
    # every parameter is exactly one of: online encoder, predictor, key encoder (no hidden momentum predictor)
    assert len(list(model.parameters())) == len(momentum) + len(predictor) + len(online)
    assert momentum == {id(p) for m in (model.momentum_backbone, model.momentum_projector) for p in m.parameters()}
    assert all(not p.requires_grad for p in model.momentum_parameters())
    x = images(cfg)
    # builder.py copies f_q into f_k at construction: the keys are the online projections, not the predictions
    with torch.no_grad():
        z = model.projector(model.backbone(x))
        torch.testing.assert_close(model.keys(x), z, rtol=0, atol=0)
        assert not torch.allclose(model.keys(x), model.predictor(z), atol=1e-3)

    opt = build_optimizer(cfg, model)
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not in_opt & momentum
    assert predictor <= in_opt
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}

    loss, _ = model.train()(x, images(cfg, seed=1), 0.99)
    loss.backward()
    assert all(p.grad is None for p in model.momentum_parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())


# 5. Frozen random patch projection ------------------------------------------------------------------------------

@pytest.mark.parametrize("patch_proj", ["random", "learned"])
def test_patch_projection_frozen_only_when_random_through_pretrain(patch_proj, monkeypatch):
    initial = []

    def recording_model(cfg):
        model = build_model(cfg)
        initial.append(copy.deepcopy(model.state_dict()))
        return model

    monkeypatch.setattr(trainer, "build_model", recording_model)
    cfg = smoke(patch_proj=patch_proj, batch_size=1024)  # smoke batch 16
    result = trainer.pretrain(cfg, progress=False, max_steps=3)  # step 0 has lr 0 (warmup); steps 1-2 move
    before, after = initial[0], result.model.state_dict()
    proj = ["backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias",
            "momentum_backbone.patch_embed.proj.weight"]
    if patch_proj == "random":
        assert all(torch.equal(before[k], after[k]) for k in proj)
    else:
        assert not torch.equal(before[proj[0]], after[proj[0]])
        assert not torch.equal(before[proj[2]], after[proj[2]])
    assert torch.equal(before["backbone.pos_embed"], after["backbone.pos_embed"])  # sin-cos is frozen too
    for k in ("backbone.blocks.0.attn.qkv.weight", "backbone.cls_token", "projector.0.weight",
              "predictor.0.weight", "momentum_backbone.blocks.0.attn.qkv.weight"):
        assert not torch.equal(before[k], after[k]), k


# 6. Position embedding ------------------------------------------------------------------------------------------

# sin and cos of the angles below, to 10 digits (a calculator's, not the code's)
S1, C1, S01, C01 = 0.8414709848, 0.5403023059, 0.0998334166, 0.9950041653  # 1, 0.1
S001, C001, S0001, C0001 = 0.0099998333, 0.9999500004, 0.0009999998, 0.9999995000  # 0.01, 0.001
S2, C2, S02, C02 = 0.9092974268, -0.4161468365, 0.1986693308, 0.9800665778  # 2, 0.2
S002, C002, S0002, C0002 = 0.0199986667, 0.9998000067, 0.0019999987, 0.9999980000  # 0.02, 0.002


def test_sincos_table_by_hand_2x2_dim8():
    """Official formula by hand: omega_i = 1 / 10000^(i / (dim/4)) = [1, 0.01] for dim 8; a row is
    [sin(w omega), cos(w omega), sin(h omega), cos(h omega)]; rows from meshgrid(w, h) 'ij', flattened w-major:
    (w, h) = (0, 0), (0, 1), (1, 0), (1, 1)."""
    zero_w, zero_h = [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]
    one_w, one_h = [S1, S001, C1, C001], [S1, S001, C1, C001]
    expected = torch.tensor([zero_w + zero_h, zero_w + one_h, one_w + zero_h, one_w + one_h])
    torch.testing.assert_close(sincos_2d_position_embedding(2, 2, 8), expected, rtol=0, atol=1e-7)


def test_sincos_row_by_hand_3x3_dim16():
    """dim 16: omega = 10000^-(i/4) = [1, 0.1, 0.01, 0.001]; row 5 of a 3x3 grid is (w, h) = (1, 2)."""
    table = sincos_2d_position_embedding(3, 3, 16)
    expected = torch.tensor([S1, S01, S001, S0001, C1, C01, C001, C0001,
                             S2, S02, S002, S0002, C2, C02, C002, C0002])
    assert table.shape == (9, 16)
    torch.testing.assert_close(table[5], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("pooling", ["cls", "gap"])
def test_built_vit_has_frozen_sincos_with_zero_cls_row(pooling):
    cfg = smoke(pos_embed="sincos", pooling=pooling)
    vit = build_vit(cfg)
    g, q = vit.patch_embed.grid_size[0], cfg.embed_dim // 4
    assert vit.patch_embed.grid_size == (g, g)
    table = vit.pos_embed[0].detach()
    if pooling == "cls":
        assert torch.equal(table[0], torch.zeros(cfg.embed_dim))  # the [CLS] row
        table = table[1:]
    assert table.shape == (g * g, cfg.embed_dim)
    torch.testing.assert_close(table, sincos_2d_position_embedding(g, g, cfg.embed_dim), rtol=0, atol=0)
    # by hand: row g is (w, h) = (1, 0); the first channel of each quarter has omega = 1
    torch.testing.assert_close(table[g, [0, q, 2 * q, 3 * q]], torch.tensor([S1, C1, 0.0, 1.0]), rtol=0, atol=1e-7)
    assert not vit.pos_embed.requires_grad


def test_learned_and_no_position_embedding():
    cfg = smoke(pos_embed="learned")
    model = model_for(cfg)
    pe = model.backbone.pos_embed
    assert pe.requires_grad and pe.shape == (1, 1 + model.backbone.patch_embed.num_patches, cfg.embed_dim)
    assert id(pe) in {id(p) for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
    assert build_vit(smoke(pos_embed="none")).pos_embed is None


# 7. Pooling -----------------------------------------------------------------------------------------------------

def test_cls_pooling_is_final_ln_cls_token():
    cfg = smoke(pooling="cls")
    vit = build_vit(cfg).eval()
    x = images(cfg)
    tokens = vit.forward_features(x)
    assert isinstance(vit.norm, nn.LayerNorm) and vit.cls_token is not None
    assert tokens.shape[1] == 1 + vit.patch_embed.num_patches
    torch.testing.assert_close(vit(x), tokens[:, 0])


def test_gap_ln_pooling_averages_final_ln_tokens_without_cls():
    cfg = smoke(pooling="gap_ln")
    vit = build_vit(cfg).eval()
    x = images(cfg)
    assert vit.cls_token is None and isinstance(vit.norm, nn.LayerNorm)
    tokens = vit.forward_features(x)
    assert tokens.shape[1] == vit.patch_embed.num_patches
    torch.testing.assert_close(vit(x), tokens.mean(1))


def test_gap_pooling_averages_tokens_without_final_ln():
    cfg = smoke(pooling="gap")
    vit = build_vit(cfg).eval()
    x = images(cfg)
    assert vit.cls_token is None
    with torch.no_grad():
        tokens = vit.blocks(vit.patch_embed(x) + vit.pos_embed)  # no [CLS], no final LN
        expected = tokens.mean(1)
        with_ln = F.layer_norm(tokens, (cfg.embed_dim,), eps=1e-6).mean(1)
        out = vit(x)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, with_ln, atol=1e-3)  # the check can tell the two apart


# 8. ViT-BN ------------------------------------------------------------------------------------------------------

def test_vit_bn_replaces_only_the_mlp_block_norm():
    cfg = smoke(norm_mlp="bn", arch="vit_large")  # 2 blocks
    vit = build_vit(cfg)
    assert len(vit.blocks) == 2
    for block in vit.blocks:
        assert isinstance(block.norm1, nn.LayerNorm)
        assert has_bn(block.norm2)
        assert not isinstance(block.norm2, nn.LayerNorm)
    assert isinstance(vit.norm, nn.LayerNorm)
    ln = build_vit(smoke(arch="vit_large"))
    assert not has_bn(ln)


def test_token_batchnorm_normalises_each_channel_over_batch_and_tokens():
    x = torch.randn(4, 5, 8) * 3 + 1
    out = TokenBatchNorm(8).train()(x)
    mean, var = x.mean(dim=(0, 1)), x.var(dim=(0, 1), unbiased=False)
    torch.testing.assert_close(out, (x - mean) / torch.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)


def test_vit_bn_survives_syncbn_conversion():
    # the trainer converts BN to SyncBN under DDP; token BN must still normalise channels, not tokens
    cfg = smoke(norm_mlp="bn")
    vit = build_vit(cfg).eval()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(vit)).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    x = images(cfg)
    with torch.no_grad():
        torch.testing.assert_close(synced(x), vit(x))


# 9. Heads -------------------------------------------------------------------------------------------------------

def layer_types(seq: nn.Sequential) -> list[type]:
    return [type(m) for m in seq]


def test_heads_follow_official_build_mlp():
    cfg = smoke()
    model = model_for(cfg)
    L, B, R = nn.Linear, nn.BatchNorm1d, nn.ReLU
    assert layer_types(model.projector) == [L, B, R, L, B, R, L, B]
    assert layer_types(model.predictor) == [L, B, R, L, B]
    for head in (model.projector, model.predictor):
        linears = [m for m in head if isinstance(m, nn.Linear)]
        bns = [m for m in head if isinstance(m, nn.BatchNorm1d)]
        assert all(m.bias is None for m in linears)
        assert all(m.affine for m in bns[:-1]) and not bns[-1].affine
    dims = [(m.in_features, m.out_features) for m in model.projector if isinstance(m, nn.Linear)]
    assert dims == [(cfg.embed_dim, cfg.head_hidden), (cfg.head_hidden, cfg.head_hidden),
                    (cfg.head_hidden, cfg.head_out)]
    dims = [(m.in_features, m.out_features) for m in model.predictor if isinstance(m, nn.Linear)]
    assert dims == [(cfg.head_out, cfg.head_hidden), (cfg.head_hidden, cfg.head_out)]


def test_heads_without_bn_predictor_and_simclr():
    no_bn = model_for(smoke(head_bn=False))
    for head in (no_bn.projector, no_bn.predictor, no_bn.momentum_projector):
        assert not has_bn(head)
        assert sum(isinstance(m, nn.Linear) for m in head) >= 2
    no_pred = model_for(smoke(predictor=False))
    assert isinstance(no_pred.predictor, nn.Identity) and hasattr(no_pred, "momentum_backbone")
    simclr = model_for(smoke(framework="simclr"))
    assert isinstance(simclr.predictor, nn.Identity)
    assert not hasattr(simclr, "momentum_backbone") and not hasattr(simclr, "momentum_projector")
    byol = model_for(smoke(framework="byol"))
    assert not isinstance(byol.predictor, nn.Identity) and hasattr(byol, "momentum_backbone")


# 10. Schedules --------------------------------------------------------------------------------------------------

def official_lr(peak, epochs, warmup, t):  # main_moco.py adjust_learning_rate at fractional epoch t
    if t < warmup:
        return peak * t / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / (epochs - warmup)))


def official_momentum(m0, epochs, t):  # main_moco.py adjust_moco_momentum
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * t / epochs)) * (1.0 - m0)


def test_lr_schedule_warmup_then_cosine():
    peak, epochs, warmup, ipe = 0.6, 10, 2, 50
    lrs = lr_schedule(peak, epochs, warmup, ipe)
    assert len(lrs) == epochs * ipe
    assert lrs[0] == 0.0
    assert lrs[warmup * ipe] == pytest.approx(peak) and lrs.max() == pytest.approx(peak)
    assert lrs[-1] < 1e-3 * peak
    assert np.all(np.diff(lrs[: warmup * ipe + 1]) > 0) and np.all(np.diff(lrs[warmup * ipe:]) <= 0)
    expected = [official_lr(peak, epochs, warmup, i / ipe) for i in range(epochs * ipe)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12, atol=1e-15)
    # by hand: half-way through warmup (epoch 1) peak/2; half-way through the cosine (epoch 2 + 8/2) peak/2
    assert lrs[25] == pytest.approx(0.15) and lrs[50] == pytest.approx(0.3) and lrs[300] == pytest.approx(0.3)


def test_momentum_schedules():
    epochs, ipe = 10, 50
    ms = momentum_schedule(0.99, epochs, ipe, cosine=True)
    assert ms[0] == pytest.approx(0.99) and 1 - ms[-1] < 1e-6 and np.all(np.diff(ms) >= 0)
    np.testing.assert_allclose(ms, [official_momentum(0.99, epochs, i / ipe) for i in range(epochs * ipe)])
    assert ms[250] == pytest.approx(0.995)  # by hand: half-way (epoch 5 of 10), 1 - (1 - 0.99) / 2
    for m0 in (0.0, 0.99):
        assert np.all(momentum_schedule(m0, epochs, ipe, cosine=False) == m0)


# 11. Optimizers -------------------------------------------------------------------------------------------------

def test_optimizers_are_the_library_ones():
    cfg = smoke()
    model = model_for(cfg)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    adamw = build_optimizer(cfg, model)
    assert type(adamw) is torch.optim.AdamW
    assert all(g["weight_decay"] == cfg.weight_decay for g in adamw.param_groups)
    assert {id(p) for g in adamw.param_groups for p in g["params"]} == trainable  # wd on biases, LN, BN too
    assert isinstance(build_optimizer(smoke(optimizer="lamb"), model), timm.optim.Lamb)
    assert isinstance(build_optimizer(smoke(optimizer="lars"), model), timm.optim.Lars)


# 12. Paper profile ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,millions,dim,depth,heads,patch", [
    ("vit_small", 22, 384, 12, 12, 16), ("vit_base", 86, 768, 12, 12, 16),
    ("vit_large", 304, 1024, 24, 16, 16), ("vit_huge", 632, 1280, 32, 16, 14)])
def test_paper_architectures(arch, millions, dim, depth, heads, patch):
    cfg = PAPER.resolve(Setting(arch=arch))
    with torch.device("meta"):  # counts without allocating (ViT-H is 632M parameters), as replicate/study/show.py
        vit = build_vit(cfg)
    assert count_parameters(vit) == pytest.approx(millions * 1e6, rel=0.02)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (dim, depth, heads, patch)
    assert vit.blocks[0].attn.num_heads == heads and len(vit.blocks) == depth  # ViT-S: 12 heads, not DeiT's 6
    assert vit.blocks[0].mlp.fc1.out_features == 4 * dim


def paper_batch(spec_id: int, row: str) -> int:
    if spec_id == 1:
        return int(row.removeprefix("bs"))
    return 2048 if (spec_id, row) == (7, "heads_no_bn") else 4096


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.key)
def test_paper_profile_resolves_to_the_paper_recipe(spec):
    for row in spec.rows:
        s = spec.setting(row)
        cfg = PAPER.resolve(s)
        where = f"{spec.key}/{row.name}"
        assert cfg.epochs == paper_epochs(spec.id, row.name), where
        assert cfg.warmup_epochs == 40 and s.temperature == 0.2, where
        assert cfg.batch_size == paper_batch(spec.id, row.name), where
        assert cfg.lr == pytest.approx(s.base_lr * cfg.batch_size / 256), where
        # the paper's: AdamW 0.1; LAMB 1e-3 (Table 3); BYOL 0.03 (its own recipe, Table 4)
        assert cfg.weight_decay == (1e-3 if spec.id == 3 else 0.03 if s.framework == "byol" else 0.1), where
        assert (cfg.dataset, cfg.image_size, cfg.head_hidden, cfg.head_out) == ("imagenet", 224, 4096, 256)
        assert s.momentum_schedule == ("constant" if spec.id == 9 else "cosine"), where
        if spec.id != 9:
            assert s.momentum == 0.99, where
        assert s.optimizer == ("lamb" if spec.id == 3 else "adamw"), where
        if spec.id in (1, 2, 3):  # Sec. 4.1 precedes the frozen-projection trick
            assert s.patch_proj == "learned", where
        elif spec.id == 13:  # stabilizers of a learned projection, against the frozen one
            assert s.patch_proj == ("random" if row.name == "random" else "learned"), where
        elif spec.id >= 5:
            assert s.patch_proj == "random", where


def test_paper_specific_rows():
    by_name = {s.name: s for s in SPECS}
    t9 = by_name["table9"]
    assert [t9.setting(r).momentum for r in t9.rows] == [0.0, 0.9, 0.99, 0.999]
    t3 = by_name["table3"]
    assert all(t3.setting(r).weight_decay == 1e-3 for r in t3.rows)
    t4 = by_name["table4"]
    wd = {t4.setting(r).framework: t4.setting(r).weight_decay for r in t4.rows}
    assert wd == {"mocov3": 0.1, "simclr": 0.1, "byol": 0.03, "swav": 0.1}


# 13. Profile invariance -----------------------------------------------------------------------------------------

def paper_epochs(spec_id: int, row: str) -> int:
    if spec_id <= 4 or spec_id == 13:  # Sec. 4's 100-epoch studies; 13 is Sec. 4.2's stabilizers at Fig. 5's setting
        return 100
    return 600 if spec_id == 14 and row.endswith("600ep") else 300


def built_switches(cfg: RunConfig) -> dict:
    """The row's switches as the *built* model and optimizer realise them (not as the config says)."""
    with torch.device("meta"):  # structure only: skips weight init
        model = SelfSupervisedViT(cfg)
    vit = model.backbone
    return {
        "framework": model.framework, "temperature": model.temperature,
        "pos_embed": "none" if vit.pos_embed is None else ("learned" if vit.pos_embed.requires_grad else "sincos"),
        "pooling": "cls" if vit.cls_token is not None else ("gap_ln" if isinstance(vit.norm, nn.LayerNorm)
                                                             else "gap"),
        "patch_proj": "learned" if vit.patch_embed.proj.weight.requires_grad else "random",
        "patch_proj_norm": ("bn" if isinstance(vit.patch_embed.norm, TokenBatchNorm)
                            else "wn" if parametrize.is_parametrized(vit.patch_embed.proj) else "none"),
        "norm_mlp": "bn" if has_bn(vit.blocks) else "ln",
        "head_bn": has_bn(model.projector),
        "predictor": not isinstance(model.predictor, nn.Identity),
        "momentum_encoder": hasattr(model, "momentum_backbone"),
        "optimizer": type(build_optimizer(cfg, model)),
    }


def declared_switches(s: Setting) -> dict:
    optimizer = {"adamw": torch.optim.AdamW, "lamb": timm.optim.Lamb, "lars": timm.optim.Lars}[s.optimizer]
    momentum_encoder = s.framework in ("mocov3", "byol")  # SimCLR and SwAV: no momentum encoder, no predictor
    return {"framework": s.framework, "temperature": s.swav_temperature if s.framework == "swav" else s.temperature,
            "pos_embed": s.pos_embed, "pooling": s.pooling, "patch_proj": s.patch_proj,
            "patch_proj_norm": s.patch_proj_norm, "norm_mlp": s.norm_mlp,
            "head_bn": s.head_bn, "predictor": s.predictor and momentum_encoder,
            "momentum_encoder": momentum_encoder, "optimizer": optimizer}


@pytest.mark.parametrize("spec", [s for s in SPECS if s.kind == "pretrain"], ids=lambda s: s.key)
def test_reduced_and_smoke_keep_every_switch(spec):
    for row in spec.rows:
        s = spec.setting(row)
        for profile in (PAPER, REDUCED, SMOKE):
            cfg = profile.resolve(s)
            where = f"{profile.name}/{spec.key}/{row.name}"
            # the built model and optimizer realise the row's framework, tau and every switch
            assert built_switches(cfg) == declared_switches(s), where
            assert cfg.warmup_epochs / cfg.epochs == pytest.approx(40 / s.epochs), where


@pytest.mark.parametrize("profile", [REDUCED, SMOKE], ids=lambda p: p.name)
def test_reduced_and_smoke_keep_table1_batch_ratios_and_table9_momenta(profile):
    by_name = {s.name: s for s in SPECS}
    t1 = by_name["table1"]
    paper = [PAPER.resolve(t1.setting(r)).batch_size for r in t1.rows]
    scaled = [profile.resolve(t1.setting(r)).batch_size for r in t1.rows]
    assert [b / scaled[0] for b in scaled] == [b / paper[0] for b in paper]
    lrs = [profile.resolve(t1.setting(r)).lr for r in t1.rows]
    assert [lr / lrs[0] for lr in lrs] == pytest.approx([b / paper[0] for b in paper])  # linear lr scaling kept
    t9 = by_name["table9"]
    assert [profile.resolve(t9.setting(r)).setting.momentum for r in t9.rows] == [0.0, 0.9, 0.99, 0.999]
    assert all(profile.resolve(t9.setting(r)).setting.momentum_schedule == "constant" for r in t9.rows)
