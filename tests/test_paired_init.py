"""Rows of a study with one seed start from the same weights where their shapes allow (#31, paired comparisons)."""
import pytest
import torch

from replicate.core.config import Setting
from replicate.core.moco import SelfSupervisedViT, build_model
from replicate.study.profiles import get_profile

PROFILE = get_profile("smoke")


def state(setting: Setting, seed: int = 0) -> dict[str, torch.Tensor]:
    return build_model(PROFILE.resolve(setting, seed=seed)).state_dict()


@pytest.mark.parametrize("change, differs", [
    (dict(pos_embed="none"), set()),  # without the table, every other draw would shift by one tensor
    (dict(pooling="gap"), {"backbone.pos_embed", "momentum_backbone.pos_embed"}),  # no [CLS] row in the table
    (dict(predictor=False), set()),
    (dict(framework="simclr"), set()),
    (dict(patch_proj="learned"), set()),
])
def test_rows_share_the_default_rows_initial_weights(change, differs):
    default, row = state(Setting()), state(Setting(**change))
    unequal = {k for k in row if not (k in default and torch.equal(row[k], default[k]))}
    assert unequal == differs


def test_a_layer_of_another_type_keeps_its_own_init():
    """Without BN in the heads, the Linear layers' indices shift: projector.4 is a Linear whose name a BatchNorm has in
    the default model; it keeps a Linear's init (not BN's ones), and the first Linear (same name and type) is
    shared."""
    default, row = state(Setting()), state(Setting(head_bn=False))
    assert torch.equal(row["projector.0.weight"], default["projector.0.weight"])
    assert row["projector.4.weight"].ndim == 2 and row["projector.4.weight"].std() < 0.5


def test_sharing_leaves_the_global_rng_and_the_seed_matters():
    cfg = PROFILE.resolve(Setting(pos_embed="none"), seed=0)
    torch.manual_seed(3)
    build_model(cfg)
    after_shared = torch.get_rng_state()
    torch.manual_seed(3)
    SelfSupervisedViT(cfg)
    assert torch.equal(after_shared, torch.get_rng_state())
    one, other = state(Setting(), seed=0), state(Setting(), seed=1)
    assert not torch.equal(one["backbone.blocks.0.attn.qkv.weight"], other["backbone.blocks.0.attn.qkv.weight"])
