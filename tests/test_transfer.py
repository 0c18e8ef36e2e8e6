"""Fine-tuning and transfer (study 11): recipes match the paper, fine-tuning learns, the row runs end to end."""
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from evals.finetune import (
    PAPER_IMAGENET_FINETUNE,
    PAPER_TRANSFER_RECIPES,
    SMALL_TRANSFER_RECIPES,
    build_classifier,
    finetune,
    train_classifier,
)
from evals.loaders import EpochLoader, imagenet_linear_loaders, transfer_datasets
from evals.transfer import HELD_OUT_CLASSES, load_target, pretraining_config
from replicate.core.data import DataError, TensorSplit, channel_stats
from replicate.study.profiles import PAPER, SMOKE
from replicate.study.spec import find_spec, load_spec

REPO = Path(__file__).resolve().parent.parent
SPEC = load_spec(find_spec("table11"))


def smoke_cfg(row: str = "random"):
    return SMOKE.resolve(SPEC.setting(SPEC.row(row)))


def test_transfer_recipes_carry_the_papers_numbers():
    r = PAPER_TRANSFER_RECIPES
    assert list(r) == ["cifar10", "cifar100", "flowers102", "pets"] == list(PAPER.transfer_targets)
    assert [r[t].wd for t in r] == [0.1, 0.1, 0.3, 0.1]
    assert [r[t].reprob for t in r] == [0.0, 0.0, 0.25, 0.0]
    assert [r[t].drop_path for t in r] == [0.1, 0.1, 0.1, 0.0]
    assert [r[t].mixup for t in r] == [0.8, 0.5, 0.0, 0.8]
    assert [r[t].cutmix for t in r] == [1.0, 1.0, 0.0, 0.0]
    for rec in r.values():  # shared: 128 x 8 GPUs, 100 epochs, lr 3e-4 (x 1024/512 in DeiT), 3 warmup epochs
        assert (rec.batch, rec.epochs, rec.base_lr, rec.warmup_epochs) == (1024, 100, 3e-4, 3)
        assert rec.lr == pytest.approx(6e-4) and rec.crop_scale == (0.05, 1.0) and not rec.repeated_aug
        assert rec.rand_augment is None and rec.label_smoothing == 0.1
    ft = PAPER_IMAGENET_FINETUNE  # Sec. 6.3: ViT-B 150 epochs, DeiT defaults
    assert (ft.epochs, ft.base_lr, ft.wd, ft.warmup_epochs, ft.drop_path) == (150, 5e-4, 0.05, 5, 0.1)
    assert (ft.mixup, ft.cutmix, ft.reprob, ft.label_smoothing) == (0.8, 1.0, 0.25, 0.1)
    assert ft.rand_augment == "rand-m9-mstd0.5-inc1" and ft.repeated_aug


def test_pretrained_weights_are_loaded_and_all_trainable():
    cfg = smoke_cfg()
    torch.manual_seed(1)
    source = build_classifier(cfg, 7, 0.0, None)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    model = build_classifier(cfg, 5, 0.1, state)
    for k, v in model.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, state[k]), k
    assert model.head.out_features == 5
    # DeiT trains every weight, including the patch projection and position table MoCo v3 keeps frozen
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError, match="does not fit"):
        build_classifier(cfg, 5, 0.0, {**state, "blocks.9.bogus": torch.zeros(1)})


def test_mixup_cutmix_erasing_path_trains_every_weight():
    cfg = smoke_cfg()
    train, _ = load_target("digits", cfg, None)
    recipe = replace(SMALL_TRANSFER_RECIPES["smoke"], epochs=1, mixup=0.8, cutmix=1.0, reprob=0.25, drop_path=0.1)
    model = build_classifier(cfg, 10, recipe.drop_path, None)
    before = {k: v.clone() for k, v in model.named_parameters()}
    train_classifier(model, recipe, cfg, train, 10, torch.device("cpu"), progress=False)
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert {"patch_embed.proj.weight", "pos_embed", "head.weight", "blocks.0.attn.qkv.weight"} <= changed


def test_finetune_from_random_init_beats_chance_on_digits():
    cfg = smoke_cfg()
    train, test = load_target("digits", cfg, None)
    acc = finetune(None, cfg, SMALL_TRANSFER_RECIPES["smoke"], train, test, progress=False)
    assert acc > 50.0  # chance is 10%


def test_finetune_on_dataloaders_beats_chance():
    """The paper path (DataLoaders of already-normalised images) learns too."""
    cfg = smoke_cfg()
    train, test = load_target("digits", cfg, None)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in channel_stats(cfg.dataset, cfg.image_size))

    def loader(split: TensorSplit, shuffle: bool):
        ds = torch.utils.data.TensorDataset((split.images - mean) / std, split.labels)
        return EpochLoader(ds, batch_size=64, shuffle=shuffle, drop_last=shuffle)

    recipe = replace(SMALL_TRANSFER_RECIPES["smoke"], batch=64)
    acc = finetune(None, cfg, recipe, loader(train, True), loader(test, False), num_classes=10, progress=False)
    assert acc > 50.0


def test_disjoint_targets_hold_out_the_pretraining_classes():
    cfg = smoke_cfg("mocov3")
    pcfg = pretraining_config(cfg)
    assert pcfg.exclude_classes == HELD_OUT_CLASSES == (5, 6, 7, 8, 9) and cfg.exclude_classes == ()
    from replicate.runtime.trainer import TensorBatches

    assert int(TensorBatches(pcfg, None, torch.device("cpu")).labels.max()) == 4
    train, test = load_target("digits_disjoint", cfg, None)
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(5))
    assert train.images.shape[1:] == (1, cfg.image_size, cfg.image_size)


def test_missing_transfer_dataset_offline_is_a_dataerror(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="cifar-10-batches-py") as e:
        transfer_datasets("cifar10", str(tmp_path), download=False)
    assert "\n" not in str(e.value)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    for name, hint in (("flowers102", "setid.mat"), ("pets", "annotations.tar.gz")):
        with pytest.raises(DataError, match=hint) as e:
            transfer_datasets(name, str(tmp_path / name), download=True)
        assert "download failed" in str(e.value) and "\n" not in str(e.value)


def test_imagenet_linear_loaders_shapes(tmp_path):
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / split / f"n{c}").mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40 + 7 * i, 30), (40 * c, 90, 9 * i)).save(tmp_path / split / f"n{c}" / f"{i}.png")
    cfg = PAPER.resolve(SPEC.setting(SPEC.row("mocov3"))).model_copy(
        update={"image_size": 32, "linear_batch": 4, "num_workers": 0})
    train, val = imagenet_linear_loaders(cfg, str(tmp_path))
    xs = [x.shape for x, _ in train]
    assert xs == [(4, 3, 32, 32), (2, 3, 32, 32)]  # 6 images, batch 4: the last batch is partial, as main_lincls
    ys = torch.cat([y for _, y in val])
    assert ys.tolist() == [0, 0, 0, 1, 1, 1]  # every val image, in order
    with pytest.raises(DataError):
        imagenet_linear_loaders(cfg, str(tmp_path / "nowhere"))


# The end-to-end smoke run of table 11 (pretrain, fine-tune on both targets, render) is the one in
# tests/test_smoke_tables.py, shared with every other study.
