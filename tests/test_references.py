"""Written-out references for pieces the fidelity tests did not pin: SimCLR's NT-Xent and BYOL's loss by hand on
tiny vectors, LARS's parameter groups, the random-resized-crop distribution against torchvision's, and the CPU
SyncBatchNorm against BatchNorm."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from replicate.core.augment import TwoViewBatchAugment
from replicate.core.config import Setting
from replicate.core.moco import SelfSupervisedViT, byol_loss, nt_xent_loss
from replicate.core.optim import build_optimizer
from replicate.study.profiles import SMOKE


def test_nt_xent_by_hand():
    """SimCLR's NT-Xent over 2N = 4 views: for each view i, -log(exp(s_i,pos / t) / sum_{k != i} exp(s_ik / t)) with
    cosine similarities s, averaged over the 4 views; the suite scales it by 2t (like MoCo's ctr) and sums the two
    views' halves (x 2)."""
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # unit after normalising: a = (1, 0), b = (0, 1)
    z2 = torch.tensor([[3.0, 3.0], [1.0, -1.0]])  # c = (1, 1)/sqrt2, d = (1, -1)/sqrt2
    t, r = 0.5, 1 / math.sqrt(2)
    # views in order a, b, c, d; positives a-c, b-d; cosines: ab 0, ac r, ad r, bc r, bd -r, cd 0
    terms = [
        -math.log(math.exp(r / t) / (math.exp(0 / t) + math.exp(r / t) + math.exp(r / t))),  # a: others b, c, d
        -math.log(math.exp(-r / t) / (math.exp(0 / t) + math.exp(r / t) + math.exp(-r / t))),  # b: a, c, d
        -math.log(math.exp(r / t) / (math.exp(r / t) + math.exp(r / t) + math.exp(0 / t))),  # c: a, b, d
        -math.log(math.exp(-r / t) / (math.exp(r / t) + math.exp(-r / t) + math.exp(0 / t))),  # d: a, b, c
    ]
    expected = sum(terms) / 4 * (2 * t) * 2
    assert nt_xent_loss(z1, z2, t).item() == pytest.approx(expected, rel=1e-6)


def test_byol_loss_by_hand_and_stops_the_target_gradient():
    p = torch.tensor([[1.0, 0.0], [2.0, 2.0], [1.0, 0.0]], requires_grad=True)
    z = torch.tensor([[0.0, 5.0], [1.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    # cosines 0, 1, -1: losses 2 - 0 = 2, 2 - 2 = 0, 2 + 2 = 4; mean 2
    loss = byol_loss(p, z)
    assert loss.item() == pytest.approx(2.0, abs=1e-6)
    loss.backward()
    assert z.grad is None and p.grad is not None  # the target branch gets no gradient


def test_lars_groups_exclude_one_dim_params_from_decay_and_adaptation():
    """The official moco-v3 LARS (moco/optimizer.py): parameters with ndim <= 1 (biases, LayerNorm/BatchNorm gammas
    and betas) get neither weight decay nor the trust-ratio adaptation, only momentum SGD; every other trainable
    tensor (weights, [CLS] (1, 1, D), a learned position embedding) gets both."""
    cfg = SMOKE.resolve(Setting(optimizer="lars", pos_embed="learned", patch_proj="learned", weight_decay=0.1))
    torch.manual_seed(0)
    model = SelfSupervisedViT(cfg)
    optimizer = build_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, plain = ({names[id(p)] for p in g["params"]} for g in optimizer.param_groups)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | plain == trainable and not decay & plain
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight",
            "backbone.blocks.0.attn.qkv.weight", "projector.0.weight", "predictor.0.weight"} <= decay
    assert {"backbone.patch_embed.proj.bias", "backbone.blocks.0.norm1.weight", "backbone.blocks.0.norm1.bias",
            "backbone.blocks.0.attn.qkv.bias", "backbone.norm.weight", "projector.1.weight", "projector.1.bias"} <= plain
    assert all(model.get_parameter(n).ndim <= 1 for n in plain) and all(model.get_parameter(n).ndim > 1 for n in decay)
    # one step: a 1-d parameter moves by exactly -lr x grad (first momentum step, no decay, no trust ratio);
    # a weight moves by something else (trust ratio x (grad + wd w))
    bias, weight = model.get_parameter("projector.1.bias"), model.get_parameter("projector.0.weight")
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    before_b, before_w, lr = bias.detach().clone(), weight.detach().clone(), optimizer.param_groups[0]["lr"]
    optimizer.step()
    torch.testing.assert_close(bias.detach(), before_b - lr * bias.grad, rtol=0, atol=1e-7)
    assert not torch.allclose(weight.detach(), before_w - lr * weight.grad, atol=1e-6)


def crop_draws(n: int, size: int, crop_min: float):
    """(area fraction, log aspect) of n crops of ours and of torchvision's RandomResizedCrop.get_params."""
    from torchvision.transforms import RandomResizedCrop

    aug = TwoViewBatchAugment(32, crop_min, (0.1, 2.0), (0.5,), (0.5,))
    captured = {}

    def affine_grid(theta, shape, align_corners):  # the crop's sides, as fractions of the image: theta's diagonal
        captured["w"], captured["h"] = theta[:, 0, 0].abs().clone(), theta[:, 1, 1].clone()
        return torch.zeros(shape[0], shape[2], shape[3], 2)

    mp = pytest.MonkeyPatch()
    mp.setattr(torch.nn.functional, "affine_grid", affine_grid)
    try:
        aug.crop_flip(torch.zeros(n, 1, 4, 4), torch.Generator().manual_seed(0))
    finally:
        mp.undo()
    w, h = captured["w"].numpy(), captured["h"].numpy()
    torch.manual_seed(0)
    img = torch.zeros(1, size, size)
    ref = np.array([RandomResizedCrop.get_params(img, [crop_min, 1.0], [3 / 4, 4 / 3])[2:] for _ in range(n)])  # (h, w)
    return (w * h, np.log(w / h)), (ref[:, 0] * ref[:, 1] / size ** 2, np.log(ref[:, 1] / ref[:, 0]))


QUANTILES = np.linspace(0.05, 0.95, 19)


def test_crop_aspect_follows_random_resized_crop():
    """20k draws against RandomResizedCrop.get_params on a 1000 px image (scale (0.08, 1), ratio (3/4, 4/3)): the
    log-aspect quantiles agree to within 0.02, and the area stays within the scale range."""
    (area, log_aspect), (_, ref_log_aspect) = crop_draws(20_000, 1000, 0.08)
    np.testing.assert_allclose(np.quantile(log_aspect, QUANTILES), np.quantile(ref_log_aspect, QUANTILES), atol=0.02)
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("crop_min", [0.08, 0.35], ids=["imagenet", "reduced"])
def test_crop_area_follows_random_resized_crop(crop_min):
    """The area quantiles agree with RandomResizedCrop's to within 0.02: a crop that does not fit is redrawn, as
    torchvision does, not clamped (clamping put the median area at 0.54 where torchvision's is 0.47)."""
    (area, _), (ref_area, _) = crop_draws(20_000, 1000, crop_min)
    np.testing.assert_allclose(np.quantile(area, QUANTILES), np.quantile(ref_area, QUANTILES), atol=0.02)


@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 3)], ids=["bn1d", "tokens"])
def test_cpu_sync_batchnorm_in_one_process_is_batchnorm(shape, tmp_path):
    """In a 1-process gloo group CPUSyncBatchNorm takes its all-reduce path: outputs, input and weight gradients,
    and running statistics (unbiased variance) equal torch's BatchNorm."""
    import torch.distributed as dist

    from replicate.core.distributed import CPUSyncBatchNorm

    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 1
    ref = nn.BatchNorm1d(5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours = nn.BatchNorm1d(5)
    ours.load_state_dict(ref.state_dict())
    ours.__class__ = CPUSyncBatchNorm
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        outs = []
        for bn in (ref, ours):
            xi = x.clone().requires_grad_(True)
            y = bn(xi)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            outs.append((y.detach(), xi.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var))
    finally:
        dist.destroy_process_group()
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
