"""SwAV (replicate/core/swav.py): Sinkhorn codes, the swapped-prediction loss, the prototypes' freeze, and a short run.
Two processes = one process is checked by tests/test_distributed.py (its SETTINGS include swav)."""
import math

import numpy as np
import pytest
import torch

from replicate.core.config import Setting
from replicate.core.moco import SelfSupervisedViT, build_model
from replicate.core.swav import SwAVHead, frozen_prototype_steps, sinkhorn, swapped_prediction_loss
from replicate.runtime.trainer import pretrain, seed_everything
from replicate.study.profiles import PAPER, REDUCED, SMOKE
from replicate.study.spec import SpecError, all_specs, load_spec


def reference_sinkhorn(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """The SwAV paper's Sinkhorn-Knopp written out in float64 on the B x K matrix: alternately scale the columns
    (prototypes) to 1/K and the rows (samples) to 1/B, starting from exp(scores / eps) of total mass 1."""
    p = np.exp(scores / epsilon)
    b, k = p.shape
    p = p / p.sum()
    for _ in range(iterations):
        p = p / p.sum(axis=0, keepdims=True) / k
        p = p / p.sum(axis=1, keepdims=True) / b
    return p * b


def unit_scores(b: int, k: int, seed: int = 0) -> torch.Tensor:
    """Cosine scores as the model makes them: unit samples against unit prototypes."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(b, 16, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, 16, generator=g), dim=1)
    return z @ c.T


def test_sinkhorn_matches_the_written_out_algorithm():
    scores = unit_scores(6, 4)
    got = sinkhorn(scores, 0.05, 3)
    want = reference_sinkhorn(scores.double().numpy(), 0.05, 3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("b,k", [(64, 16), (16, 47)])  # more samples than prototypes, and fewer (smoke's K)
def test_sinkhorn_codes_are_an_equipartition(b, k):
    scores = unit_scores(b, k, seed=1)
    q = sinkhorn(scores, 0.05, 3)
    assert q.shape == (b, k) and (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(b))  # each sample's code is a distribution

    def imbalance(codes):  # largest relative deviation of a prototype's mass from B/K
        return (codes.sum(dim=0) / (b / k) - 1).abs().max().item()

    # each prototype gets B/K of the batch: exactly in the limit; the official 3 iterations are a truncation that
    # (on these scores, eps 0.05) leaves ~30% where the plain softmax codes are off by 90-290%
    assert imbalance(q) < 0.5 * imbalance(torch.softmax(scores / 0.05, dim=1))
    assert imbalance(sinkhorn(scores, 0.05, 50)) < 1e-4


def test_sinkhorn_spreads_a_batch_that_prefers_one_prototype():
    """Every sample scores prototype 0 highest; an argmax would collapse them all onto it. The equipartition
    sends the two that prefer it least to prototype 1, and the codes do not depend on a shift of all scores."""
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.6, 0.55]])
    q = sinkhorn(scores, 0.05, 50)
    assert q.argmax(dim=1).tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(sinkhorn(scores - 0.5, 0.05, 50), q)


def test_swapped_prediction_loss_matches_the_written_out_formula():
    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    q1, q2 = torch.softmax(torch.randn(5, 7, generator=g), 1), torch.softmax(torch.randn(5, 7, generator=g), 1)
    t = 0.1
    want = 0.0
    for i in range(5):  # -(q2 . log softmax(s1 / t) + q1 . log softmax(s2 / t)) / 2, averaged over samples
        for q, s in ((q2, s1), (q1, s2)):
            logz = math.log(sum(math.exp(s[i, j] / t) for j in range(7)))
            want -= sum(q[i, j] * (s[i, j] / t - logz) for j in range(7)) / 2 / 5
    got = swapped_prediction_loss(s1, s2, q1, q2, t)
    assert got.item() == pytest.approx(float(want), rel=1e-5)


def test_head_normalises_prototypes_and_treats_codes_as_targets():
    cfg = SMOKE.resolve(Setting(framework="swav"))
    head = SwAVHead(cfg)
    assert head.prototypes.weight.shape == (cfg.prototypes, cfg.head_out)
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(8, cfg.head_out, generator=g).requires_grad_() for _ in range(2))
    head(z1, z2).backward()
    torch.testing.assert_close(head.prototypes.weight.norm(dim=1), torch.ones(cfg.prototypes))
    # by hand, the codes as constants: the loss's gradient w.r.t. view 1's scores is (softmax(s1/T) - q2) / (2 T B)
    s1, s2 = (head.scores(z.detach()).detach().requires_grad_() for z in (z1, z2))
    q1, q2 = (sinkhorn(s.detach(), head.epsilon, head.iterations) for s in (s1, s2))
    swapped_prediction_loss(s1, s2, q1, q2, head.temperature).backward()
    torch.testing.assert_close(s1.grad, (torch.softmax(s1.detach() / head.temperature, 1) - q2) / (2 * 0.1 * 8))
    # the head's gradient reaches z only through the scores it predicts with, never through the codes
    w = head.prototypes.weight.detach()
    for z, s in ((z1, s1), (z2, s2)):
        zd = z.detach().requires_grad_()
        torch.nn.functional.normalize(zd, dim=1).backward(s.grad @ w)
        torch.testing.assert_close(z.grad, zd.grad)


def test_swav_model_has_prototypes_and_no_momentum_encoder_or_predictor():
    model = SelfSupervisedViT(SMOKE.resolve(Setting(framework="swav")))
    assert isinstance(model.predictor, torch.nn.Identity) and not hasattr(model, "momentum_backbone")
    assert model.temperature == 0.1
    assert "swav.prototypes.weight" in model.state_dict()


def test_profiles_keep_the_batch_to_prototypes_ratio():
    assert PAPER.resolve(Setting(framework="swav")).prototypes == 3000
    reduced = REDUCED.resolve(Setting(framework="swav"))
    assert reduced.prototypes == 94 and reduced.batch_size / reduced.prototypes == pytest.approx(4096 / 3000, 0.01)
    assert PAPER.resolve(Setting()).prototypes == 0  # other frameworks: unchanged configs, current results stay


def test_prototypes_are_frozen_for_one_paper_epoch_scaled_by_the_profile():
    assert frozen_prototype_steps(PAPER.resolve(Setting(framework="swav")), 312) == 312  # official 313 iterations
    reduced = REDUCED.resolve(Setting(framework="swav"))  # 300 -> 20 epochs: 1 epoch -> 1/15 of a reduced epoch
    assert frozen_prototype_steps(reduced, 78) == math.ceil(78 / 15)
    short = REDUCED.resolve(Setting(framework="swav", epochs=100))  # 100 -> 7 epochs: 1 epoch -> 7/100
    assert short.epochs == 7 and frozen_prototype_steps(short, 78) == math.ceil(78 * 7 / 100)
    assert frozen_prototype_steps(PAPER.resolve(Setting()), 312) == 0


def short_run_config(**setting):
    # 256 images, global batch 64: 4 iterations per epoch, 2 epochs (8 steps)
    return SMOKE.resolve(Setting(framework="swav", epochs=300, **setting), seed=1).model_copy(
        update={"train_subset": 256})


def test_prototypes_do_not_move_in_the_frozen_epoch_and_move_after():
    cfg = short_run_config(swav_freeze_prototypes_epochs=150)  # 150 of 300 paper epochs: the first of 2 (4 steps)
    assert frozen_prototype_steps(cfg, 4) == 4
    seed_everything(cfg.seed)
    init = build_model(cfg).state_dict()  # as pretrain builds it
    frozen = pretrain(cfg, progress=False, max_steps=4).model.state_dict()
    # only re-normalised (every forward), never updated: no gradient step, no weight decay
    torch.testing.assert_close(frozen["swav.prototypes.weight"],
                               torch.nn.functional.normalize(init["swav.prototypes.weight"], dim=1))
    assert not torch.equal(frozen["projector.0.weight"], init["projector.0.weight"])
    moved = pretrain(cfg, progress=False, max_steps=6).model.state_dict()
    assert (moved["swav.prototypes.weight"] - frozen["swav.prototypes.weight"]).abs().max() > 1e-4


def test_swav_resumed_inside_the_frozen_epoch_equals_uninterrupted(tmp_path):
    """The freeze is a function of the step and the prototypes are re-normalised by every forward, so a run stopped
    inside the frozen epoch and resumed from its checkpoint ends bit-identical to one never stopped."""
    cfg = short_run_config(swav_freeze_prototypes_epochs=150)
    whole = pretrain(cfg, progress=False)
    pretrain(cfg, ckpt_path=tmp_path / "row.pt", progress=False, max_steps=2)
    rest = pretrain(cfg, ckpt_path=tmp_path / "row.pt", progress=False)
    assert rest.iterations == whole.iterations == 8
    for key, value in whole.model.state_dict().items():
        assert torch.equal(rest.model.state_dict()[key], value), key
    assert rest.monitor["series"]["loss"] == whole.monitor["series"]["loss"]


def test_short_swav_run_lowers_its_loss():
    result = pretrain(SMOKE.resolve(Setting(framework="swav", epochs=300), seed=0), progress=False)
    loss = result.monitor["series"]["loss"]
    assert result.status == "ok" and all(math.isfinite(x) for x in loss)
    assert np.mean(loss[-5:]) < np.mean(loss[:5]) - 0.2, loss


def test_swav_rows_of_studies_4_and_12():
    specs = {s.id: s for s in all_specs()}
    t12 = specs[12]
    frameworks = [(t12.setting(r).arch, t12.setting(r).framework) for r in t12.rows]
    assert frameworks == [(a, f) for a in ("vit_small", "vit_base") for f in ("mocov3", "simclr", "byol", "swav")]
    # every other framework is compared with MoCo v3 of its own size (the MoCo v3 ViT-S with the ViT-B reference)
    for r in (r for r in t12.rows if t12.setting(r).framework != "mocov3"):
        assert t12.setting(t12.baseline_of(r)) == Setting(**{**t12.base, "arch": t12.setting(r).arch}), r.name
    t4 = specs[4]
    assert t4.row("swav_random").vs == "swav_learned"
    assert [t4.row(n).paper for n in ("swav_learned", "swav_random")] == [65.8, 66.4]


def test_a_swav_key_on_another_framework_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("id: 90\ntitle: t\npaper_ref: x\nreference: a\nrows:\n"
                    "  - {name: a, label: a, set: {framework: byol, sinkhorn_iterations: 5}}\n")
    with pytest.raises(SpecError, match=r"rows\[0\] \(a\): sinkhorn_iterations applies to framework swav only"):
        load_spec(path)
