"""The paper-protocol linear probe under torchrun (every process, each image once), its resume after SIGKILL, the
shared epoch-state helper, and resumable fine-tuning."""
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from evals.features import extract_loader_features
from evals.linear import linear_probe_paper, train_linear_head
from evals.loaders import ShardSampler, imagenet_knn_loaders, imagenet_linear_loaders
from evals.resume import load_state, save_state
from replicate.core.config import Setting
from replicate.core.model import build_vit
from replicate.study.profiles import SMOKE

TESTS = Path(__file__).resolve().parent
# 41 training images at global batch 8: the last batch holds one image, so under 2 processes one of them has no
# share of it; 21 validation images split unevenly too.
N_TRAIN, N_VAL, CLASSES, EPOCHS = 41, 21, 4, 2


def write_folder(root: Path) -> Path:
    """A 4-class ImageFolder of 16x16 RGB PNGs: a colour per class under heavy per-pixel noise, so that the probe
    lands well between chance and 100% (about 50-70%) and its accuracy can change from epoch to epoch."""
    rng = np.random.default_rng(0)
    colours = 128 + rng.integers(-20, 21, size=(CLASSES, 3))
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        for i in range(n):
            c = i % CLASSES
            (root / split / f"n{c}").mkdir(parents=True, exist_ok=True)
            pixels = np.clip(colours[c] + rng.normal(0, 60, size=(16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / split / f"n{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(write_folder(tmp_path_factory.mktemp("probe_folder")))


def probe_config():
    # the smoke ViT (32 wide, one block, 2x2 patches of 8 px) on 3-channel 16 px images
    return SMOKE.resolve(Setting(epochs=300), seed=2).model_copy(update={
        "dataset": "imagenet", "in_chans": 3, "image_size": 16, "num_classes": CLASSES, "linear_batch": 8,
        "linear_epochs": EPOCHS, "num_workers": 0})


def run_probe(folder: str, ckpt: Path | None = None, fixed_crops: bool = False) -> dict:
    """The real loaders and probe; records which file each process loads in which epoch (the dataset's own
    ``loader`` hook, below the sampler and DataLoader under test)."""
    cfg = probe_config()
    torch.manual_seed(0)  # the backbone's init and the crops' RNG: the same in every process and every run
    backbone = build_vit(cfg)
    train, val = imagenet_linear_loaders(cfg, folder)
    if fixed_crops:  # the eval transform for training too, see test_probe_two_processes_match_one
        train.dataset.transform = val.dataset.transform
    seen = {"train": [], "val": []}
    for name, loader in (("train", train), ("val", val)):
        real = loader.dataset.loader

        def record(path, name=name, real=real):
            seen[name].append((train.sampler.epoch, path))  # val runs after the train pass of the same epoch
            return real(path)

        loader.dataset.loader = record
    fc, accs = train_linear_head(backbone, cfg.embed_dim, cfg.num_classes, train, val, cfg.linear_epochs,
                                 cfg.linear_batch, cfg.linear_base_lr, "cpu", False, seed=cfg.seed, ckpt_path=ckpt)
    knn_val = imagenet_knn_loaders(cfg, folder)[1]
    return {"fc": {k: v.detach().clone() for k, v in fc.state_dict().items()}, "accs": accs, "seen": seen,
            "val_features": extract_loader_features(backbone, knn_val), "val_targets": knn_val.dataset.targets,
            "files": {n: sorted(p for p, _ in ld.dataset.samples) for n, ld in (("train", train), ("val", val))}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from replicate.core import distributed as D

    D.init_from_env()
    torch.save(run_probe(folder, fixed_crops=True), Path(out) / f"rank{rank}.pt")
    D.shutdown()


def per_epoch(seen: list[tuple[int, str]], epoch: int) -> list[str]:
    return [path for e, path in seen if e == epoch]


@pytest.mark.smoke  # two spawned processes: ~15 s on one core
def test_probe_two_processes_match_one(folder, tmp_path):
    mp.spawn(_worker, args=(2, free_port(), folder, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    one = run_probe(folder, fixed_crops=True)
    files = one["files"]
    assert len(files["train"]) == N_TRAIN and len(files["val"]) == N_VAL
    for split in ("train", "val"):
        for epoch in range(EPOCHS):
            # every image exactly once per epoch: over both processes, and in the one process
            assert sorted(per_epoch(one["seen"][split], epoch)) == files[split], (split, epoch)
            shares = [per_epoch(r["seen"][split], epoch) for r in ranks]
            assert sorted(shares[0] + shares[1]) == files[split], (split, epoch)
            assert abs(len(shares[0]) - len(shares[1])) <= 1
    # the training order is reshuffled from the epoch index
    assert per_epoch(one["seen"]["train"], 0) != per_epoch(one["seen"]["train"], 1)
    # DDP keeps the Linear layer identical on both processes, and both report the same accuracies
    for key, value in ranks[0]["fc"].items():
        assert torch.equal(value, ranks[1]["fc"][key]), key
    assert ranks[0]["accs"] == ranks[1]["accs"] and len(one["accs"]) == EPOCHS and max(one["accs"]) < 100
    # 1 vs 2 processes: the same global batches (the shuffle depends on (seed, epoch) only) and, with the eval
    # transform in place of the random crops (each process draws crops from its own RNG), the same images, so the
    # gradients differ only by float summation order: weights to 1e-6. An argmax at a near-tie could then flip one
    # validation image (100/21 points); in practice the accuracies are equal.
    for key, value in one["fc"].items():
        torch.testing.assert_close(ranks[0]["fc"][key], value, rtol=0, atol=1e-6)
    for got, want in zip(ranks[0]["accs"], one["accs"]):
        assert abs(got - want) <= 100 / N_VAL + 1e-9
    # kNN features, extracted sharded (11 + 10 of the 21 images) and gathered: every process holds all of them, in
    # dataset order, equal to one process's up to float summation order
    for r in ranks:
        feats, labels = r["val_features"]
        assert feats.shape == (N_VAL, probe_config().embed_dim) and labels.tolist() == one["val_targets"]
        torch.testing.assert_close(feats, one["val_features"][0], rtol=0, atol=1e-5)
    # not vacuous: training moved the weights far beyond the tolerance
    init = torch.empty_like(one["fc"]["weight"]).normal_(0, 0.01, generator=torch.Generator().manual_seed(2))
    assert (one["fc"]["weight"] - init).abs().max() > 1e-3


def test_linear_probe_paper_reports_last_and_best_epoch(folder, monkeypatch):
    monkeypatch.setattr("evals.linear.train_linear_head", lambda *a, **k: (None, [40.0, 70.0, 60.0]))
    assert linear_probe_paper() == {"linear": 60.0, "linear_best": 70.0}


def test_probe_refuses_a_loader_of_another_global_batch(folder):
    cfg = probe_config()
    train, val = imagenet_linear_loaders(cfg, folder)  # global batch 8
    with pytest.raises(ValueError, match="make_loader with global batch 16"):
        train_linear_head(torch.nn.Identity(), 768, CLASSES, train, val, batch_size=16)


def test_shard_sampler_covers_each_index_once_without_padding():
    for n, batch, world in ((41, 8, 2), (21, 8, 2), (10, 6, 3), (3, 8, 4)):
        shards = [ShardSampler(n, batch, shuffle=True, seed=1, rank=r, world=world) for r in range(world)]
        for s in shards:
            s.set_epoch(3)
        lists = [list(s) for s in shards]
        assert sorted(sum(lists, [])) == list(range(n))
        assert [len(s) for s in shards] == [len(x) for x in lists]
    # the global batches do not depend on the number of processes
    one = ShardSampler(41, 8, shuffle=True, seed=1, rank=0, world=1)
    two = [ShardSampler(41, 8, shuffle=True, seed=1, rank=r, world=2) for r in range(2)]
    order, parts = list(one), [list(s) for s in two]
    for step in range(5):
        assert sorted(order[8 * step: 8 * step + 8]) == sorted(parts[0][4 * step: 4 * step + 4]
                                                                + parts[1][4 * step: 4 * step + 4])
    assert one.batch_sizes() == [8] * 5 + [1]


# Runs the probe with a checkpoint in a fresh process, and sleeps once the first epoch's state is saved, so the
# test can SIGKILL it there.
DRIVER = """\
import sys, time
import torch
sys.path.insert(0, sys.argv[1])
import evals.linear as linear
from test_linear_probe import run_probe
real = linear.save_state
def save_then_sleep(*args, **kwargs):
    real(*args, **kwargs)
    time.sleep(600)
linear.save_state = save_then_sleep
torch.set_num_threads(int(sys.argv[4]))
run_probe(sys.argv[2], ckpt=sys.argv[3])
"""


def test_probe_killed_after_an_epoch_resumes_bit_identical(folder, tmp_path, capfd):
    whole = run_probe(folder)
    ckpt = tmp_path / "row.probe.pt"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(TESTS), folder, str(ckpt), str(torch.get_num_threads())],
                            cwd=TESTS.parent, env={**os.environ, "PYTHONPATH": str(TESTS.parent)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), f"no checkpoint appeared: {proc.stderr.read().decode() if proc.poll() is not None else ''}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(ckpt, weights_only=False)["state"]
    assert state["epoch"] == 1 and state["accs"] == whole["accs"][:1]
    capfd.readouterr()
    rest = run_probe(folder, ckpt=ckpt)
    assert "resuming the linear probe from epoch 1/2" in capfd.readouterr().err
    assert per_epoch(rest["seen"]["train"], 0) == []  # it did not train epoch 0 again
    assert rest["accs"] == whole["accs"]
    for key, value in whole["fc"].items():
        assert torch.equal(rest["fc"][key], value), key
    assert not ckpt.exists()  # deleted once the probe finished


def test_epoch_state_refuses_other_runs_and_restores_rng(tmp_path, capsys):
    path = tmp_path / "eval.pt"
    save_state(path, "run-a", {"epoch": 3})
    want = torch.rand(4)
    assert load_state(path, "run-a") == {"epoch": 3}
    assert torch.equal(torch.rand(4), want)  # the RNG continues where it was when the state was saved
    assert load_state(path, "run-b") is None  # another run's state: moved aside, never used
    assert not path.exists() and (tmp_path / "eval.pt.bad").exists()
    assert "written for a different configuration" in capsys.readouterr().err
    path.write_bytes(b"not a checkpoint")
    assert load_state(path, "run-a") is None and not path.exists()
    assert load_state(tmp_path / "missing.pt", "run-a") is None and load_state(None, "run-a") is None


class Stop(Exception):
    pass


def test_finetune_stopped_after_an_epoch_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    import evals.finetune as ft
    from evals.transfer import load_target
    from replicate.core.seeding import seed_everything
    from replicate.study.spec import find_spec, load_spec

    spec = load_spec(find_spec("table11"))
    cfg = SMOKE.resolve(spec.setting(spec.row("random")))
    train, _ = load_target("digits", cfg, None)
    # Mixup/CutMix (numpy RNG), drop path and random erasing (torch RNG): the draws a resume must restore
    recipe = replace(ft.SMALL_TRANSFER_RECIPES["smoke"], epochs=3, train_subset=192, mixup=0.8, cutmix=1.0,
                     reprob=0.25, drop_path=0.1)

    def trained(ckpt):
        seed_everything(cfg.seed)
        model = ft.build_classifier(cfg, 10, recipe.drop_path, None)
        return ft.train_classifier(model, recipe, cfg, train, 10, torch.device("cpu"), False, ckpt_path=ckpt)

    whole = trained(None).state_dict()
    ckpt = tmp_path / "ft.pt"
    real = ft.save_state

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        raise Stop

    monkeypatch.setattr(ft, "save_state", save_then_stop)
    with pytest.raises(Stop):
        trained(ckpt)
    first = torch.load(ckpt, weights_only=False)["state"]
    assert first["epoch"] == 1 and first["step"] == 3  # 192 images at batch 64
    monkeypatch.setattr(ft, "save_state", real)
    rest = trained(ckpt).state_dict()
    for key, value in whole.items():
        assert torch.equal(rest[key], value), key
    assert not ckpt.exists()
    assert not torch.equal(first["model"]["head.weight"], whole["head.weight"])  # not vacuous


def test_probe_precision_knob(monkeypatch):
    from evals.linear import probe_bf16
    from replicate.core.distributed import LaunchError

    monkeypatch.delenv("REPLICATE_PROBE_BF16", raising=False)
    assert probe_bf16() is False  # the official probe is fp32
    monkeypatch.setenv("REPLICATE_PROBE_BF16", "1")
    assert probe_bf16() is True
    monkeypatch.setenv("REPLICATE_PROBE_BF16", "yes")
    with pytest.raises(LaunchError, match="REPLICATE_PROBE_BF16 must be 1 or 0"):
        probe_bf16()
