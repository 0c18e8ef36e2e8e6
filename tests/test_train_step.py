"""One training step: ``pretrain``'s loop runs ``trainer.train_step`` (the function the bench and calibration time),
with the setting's clipping, SwAV's frozen prototypes and the monitor between the gradients and the update."""
from __future__ import annotations

import torch

import replicate.runtime.trainer as trainer
from replicate.core.config import Setting
from replicate.core.seeding import seed_everything
from replicate.core.swav import frozen_prototype_steps
from replicate.study.profiles import SMOKE


def test_the_loop_runs_train_step_once_per_iteration_with_the_row_s_options(monkeypatch):
    # 256 images, global batch 64: 4 iterations per epoch; SwAV's prototypes frozen for the first of 2 epochs
    cfg = SMOKE.resolve(Setting(framework="swav", epochs=300, swav_freeze_prototypes_epochs=150, patch_proj="learned",
                                patch_proj_clip=0.5),
                        seed=1).model_copy(update={"train_subset": 256})
    assert frozen_prototype_steps(cfg, 4) == 4
    calls, real = [], trainer.train_step

    def spy(*args, **kwargs):
        calls.append(args[8:10])  # (clip, drop_prototypes)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", spy)
    seed_everything(cfg.seed)
    result = trainer.pretrain(cfg, progress=False, max_steps=6)
    assert result.status == "ok" and result.iterations == 6
    assert calls == [(0.5, True)] * 4 + [(0.5, False)] * 2


def test_a_refused_update_leaves_the_weights_and_returns_none():
    cfg = SMOKE.resolve(Setting(), seed=0).model_copy(update={"train_subset": 256})
    seed_everything(0)
    model = trainer.SelfSupervisedViT(cfg)
    optimizer = trainer.build_optimizer(cfg, model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "momentum" not in k}
    x = torch.rand(8, cfg.in_chans, cfg.image_size, cfg.image_size)
    seen = []
    out = trainer.train_step(model, optimizer, x, x.flip(-1), 0.99, cfg.lr, False, torch.device("cpu"),
                             before_update=lambda loss, feats: seen.append(float(loss.detach())) or False)
    assert out is None and len(seen) == 1
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if "base_encoder" in k or "backbone" in k)
