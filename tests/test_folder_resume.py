"""ImageFolder data (the paper path): the crops are a pure function of (seed, epoch, position), so a resumed run
is bit-identical to an uninterrupted one, with DataLoader workers."""
import pytest
import torch

from replicate.core.config import Setting
from replicate.runtime.checkpoint import load_checkpoint
from replicate.runtime.trainer import FolderBatches, pretrain
from replicate.study.profiles import PAPER_SMOKE
from tools.synthetic import write_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 64 images at batch 16: 4 iterations per epoch, 8 in all
    return str(write_image_folder(tmp_path_factory.mktemp("folder"), classes=4, train_per_class=16, val_per_class=2))


def small_config(num_workers: int = 2):
    # the queue monitor every 2 iterations with k = 5: its bank fills after one flush, so kNN runs from step 3
    cfg = PAPER_SMOKE.resolve(Setting(epochs=300), seed=1)
    return cfg.model_copy(update={"num_workers": num_workers, "monitor_every": 2, "knn_k": 5})


@pytest.fixture(scope="module")
def uninterrupted(folder):
    return pretrain(small_config(), folder, progress=False)


@pytest.mark.parametrize("stop_at", [3, 5])  # the last step of epoch 0; mid-epoch 1 (the loader restarts mid-epoch)
def test_folder_pretrain_stopped_then_resumed_equals_uninterrupted(tmp_path, folder, stop_at, uninterrupted):
    cfg, whole = small_config(), uninterrupted
    ckpt = tmp_path / "row.pt"
    first = pretrain(cfg, folder, ckpt_path=ckpt, progress=False, max_steps=stop_at)
    assert first.iterations == stop_at and load_checkpoint(ckpt, cfg)["step"] == stop_at
    rest = pretrain(cfg, folder, ckpt_path=ckpt, progress=False)
    assert rest.iterations == whole.iterations == 8
    want, got = whole.model.state_dict(), rest.model.state_dict()
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert torch.equal(value, got[key]), key
    assert rest.monitor == whole.monitor  # loss / grad curves and the queue kNN monitor, bit for bit
    assert len(whole.monitor["knn_acc"]) == 3  # the queue monitor did run (steps 3, 5, 7)
    # not vacuous: the first part really stopped early
    qkv = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(first.model.state_dict()[qkv], want[qkv])


def all_crops(batches: FolderBatches, steps) -> list[tuple[torch.Tensor, ...]]:
    return [batches.crops(step) for step in steps]


def test_crops_do_not_depend_on_workers_or_restart_position(folder):
    device = torch.device("cpu")
    rng_before = torch.get_rng_state()
    in_main = all_crops(FolderBatches(small_config(num_workers=0), folder, device), range(6))
    assert torch.equal(torch.get_rng_state(), rng_before)  # per-sample seeding left the run's own RNG alone
    in_workers = all_crops(FolderBatches(small_config(num_workers=2), folder, device), range(6))
    restarted = all_crops(FolderBatches(small_config(num_workers=2), folder, device), [5, 2])
    for step in range(6):
        for a, b in zip(in_main[step], in_workers[step]):
            assert torch.equal(a, b), step
    for step, got in zip([5, 2], restarted):
        assert all(torch.equal(a, b) for a, b in zip(in_main[step], got)), step
    c1, c2, _ = in_main[0]
    assert c1.dtype == torch.uint8 and c1.shape == (16, 3, 32, 32)
    assert not torch.equal(c1, c2)  # two different views of each image
