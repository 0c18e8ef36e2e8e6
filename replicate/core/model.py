"""ViT backbones and MLP heads, built through timm's public arguments.

Every knob the paper ablates maps to a timm argument or to a small post-construction change:
pooling -> ``class_token`` / ``global_pool`` / ``fc_norm`` / ``final_norm``; position embedding -> fixed 2-D
sin-cos written into ``pos_embed`` (frozen) / timm's learned one / ``pos_embed='none'``; random patch projection
-> xavier init then ``requires_grad=False`` (the official ``--stop-grad-conv1``); ViT-BN -> each block's ``norm2``
(the LayerNorm before the MLP) replaced by BatchNorm over tokens; Sec. 4.2's other stabilizers of a learned patch
projection -> BatchNorm after it (timm's ``embed_norm_layer``) or WeightNorm of its weight (torch's
``parametrizations.weight_norm``).
"""
from __future__ import annotations

import math

import timm
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from replicate.core.config import RunConfig


def sincos_2d_position_embedding(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The official moco-v3 ``build_2d_sincos_position_embedding``: [sin(w), cos(w), sin(h), cos(h)], dim/4 each.

    Returns (grid_h * grid_w, dim) in the official order: ``meshgrid(w, h)`` with torch's default 'ij' indexing,
    flattened w-major. On the square grids used here that gives a patch's row to the "w" quarter and its column to
    the "h" quarter: a fixed channel permutation of the (h, w) order, kept so the table is bit-identical.
    """
    if dim % 4:
        raise ValueError(f"embed dim {dim} must be divisible by 4 for 2-D sin-cos position embedding")
    grid_w_, grid_h_ = torch.meshgrid(torch.arange(grid_w, dtype=torch.float32),
                                      torch.arange(grid_h, dtype=torch.float32), indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = grid_w_.flatten()[:, None] * omega[None]
    out_h = grid_h_.flatten()[:, None] * omega[None]
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)


class TokenBatchNorm(nn.Module):
    """BatchNorm over the channel dim of (B, N, C) token tensors: ViT-BN's replacement for the MLP-block LN.

    Wraps a BatchNorm1d rather than subclassing it: ``SyncBatchNorm.convert_sync_batchnorm`` then swaps only the
    inner BN and the reshape survives (a subclass would be replaced whole and normalise over tokens). Statistics
    over (batch, tokens) per channel, computed on the (B*N, C) view: the output stays contiguous, so the fc1 that
    follows is one matmul (a transposed (B, C, N) output made it a batched matmul over copies, slower in fp32 and
    more so with bf16 matmuls: docs/code-measurements.md).
    """

    def __init__(self, dim: int, device=None, dtype=None):  # device/dtype: timm builds norm layers with them
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.reshape(-1, x.shape[-1])).view(x.shape)


def timm_vit_kwargs(cfg: RunConfig, num_classes: int = 0) -> dict:
    """The ``timm.create_model`` arguments of a row's ViT (shape, pooling, position embedding, patch-projection BN):
    the one place ``build_vit`` and the timm export (``replicate.study.export``) take them from."""
    s = cfg.setting
    pool_args = {
        "cls": dict(class_token=True, global_pool="token", fc_norm=False, final_norm=True),
        "gap_ln": dict(class_token=False, global_pool="avg", fc_norm=False, final_norm=True),
        "gap": dict(class_token=False, global_pool="avg", fc_norm=False, final_norm=False),
    }[s.pooling]
    # BN on the patch projection: timm applies it right after the projection, to the flattened (B, N, C) tokens
    embed_norm = dict(embed_norm_layer=TokenBatchNorm) if s.patch_proj_norm == "bn" else {}
    return dict(model_name="vit_base_patch16_224", num_classes=num_classes, img_size=cfg.image_size,
                patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim, depth=cfg.depth,
                num_heads=cfg.num_heads, mlp_ratio=4.0, pos_embed="none" if s.pos_embed == "none" else "learn",
                **pool_args, **embed_norm)


def build_vit(cfg: RunConfig, num_classes: int = 0, drop_path_rate: float = 0.0) -> nn.Module:
    s = cfg.setting
    vit = timm.create_model(pretrained=False, weight_init="moco", drop_path_rate=drop_path_rate,
                            **timm_vit_kwargs(cfg, num_classes))
    if s.pos_embed == "sincos":
        grid_h, grid_w = vit.patch_embed.grid_size
        table = sincos_2d_position_embedding(grid_h, grid_w, cfg.embed_dim)
        if vit.cls_token is not None:  # [CLS] gets a zero position embedding, as in the official code
            table = torch.cat([torch.zeros(1, cfg.embed_dim), table])
        vit.pos_embed.data.copy_(table[None])
        vit.pos_embed.requires_grad = False
    if vit.cls_token is not None:
        nn.init.normal_(vit.cls_token, std=1e-6)
    proj = vit.patch_embed.proj
    # xavier_uniform over the (out, in*p*p) view, as the official code (fan_in = channels x patch area)
    val = math.sqrt(6.0 / float(cfg.in_chans * math.prod(proj.kernel_size) + proj.out_channels))
    nn.init.uniform_(proj.weight, -val, val)
    nn.init.zeros_(proj.bias)
    if s.patch_proj == "random":
        proj.weight.requires_grad = False
        proj.bias.requires_grad = False
    if s.patch_proj_norm == "wn":  # after the init: g = |v| per output channel, so the initial weight is unchanged
        weight_norm(proj, "weight", dim=0)
    if s.norm_mlp == "bn":
        for block in vit.blocks:
            block.norm2 = TokenBatchNorm(cfg.embed_dim)
    return vit


def patch_projection_weight(vit: nn.Module) -> nn.Parameter:
    """The parameter holding the patch projection's weight: the weight itself, or under WeightNorm its direction v
    (same shape; ``proj.weight`` is then recomputed from g and v on every access and has no ``.grad``)."""
    proj = vit.patch_embed.proj
    if parametrize.is_parametrized(proj, "weight"):
        return proj.parametrizations.weight.original1
    return proj.weight


def build_mlp(num_layers: int, in_dim: int, hidden: int, out_dim: int, bn: bool = True, last_bn: bool = True):
    """The official ``_build_mlp``: Linear(no bias) -> BN -> ReLU per hidden layer; last BN has affine=False.

    Without BN (study 7) the Linear layers get biases back and the last layer is plain Linear.
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d1 = in_dim if i == 0 else hidden
        d2 = out_dim if i == num_layers - 1 else hidden
        layers.append(nn.Linear(d1, d2, bias=not bn))
        if i < num_layers - 1:
            if bn:
                layers.append(nn.BatchNorm1d(d2))
            layers.append(nn.ReLU(inplace=True))
        elif bn and last_bn:
            layers.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*layers)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
