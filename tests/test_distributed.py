"""Two gloo processes train exactly what one process trains at the same global batch and seed.

This holds because (a) every process augments the same global batch with one (seed, step) generator and keeps its
slice, (b) BatchNorm statistics are global (SyncBN; ``D.SyncBatchNorm`` on CPU), (c) the keys / negatives are
all-gathered by the losses and DDP averages the gradients, (d) the monitor sees all-reduced losses and gathered
features. What differs is only the order of floating-point reductions, hence the tolerances below.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from replicate.core.config import RunConfig, Setting
from replicate.core.moco import build_model
from replicate.runtime.trainer import TensorBatches, pretrain, seed_everything
from replicate.study.profiles import SMOKE

STEPS = 8  # the whole small run: two monitor flushes (kNN monitor, all-reduced loss) and an epoch boundary
# One mocov3 row with ViT-BN (BN in the blocks and heads, momentum encoder included), SimCLR (negatives
# gathered with gradient), BYOL (no gather at all; only SyncBN couples the processes) and SwAV (Sinkhorn's sums
# all-reduced over the global batch; prototypes frozen in the first of the two epochs, then trained).
SETTINGS = {
    "mocov3_vit_bn": Setting(epochs=300, norm_mlp="bn"),
    "simclr": Setting(epochs=300, framework="simclr"),
    "byol": Setting(epochs=300, framework="byol"),
    "swav": Setting(epochs=300, framework="swav", swav_freeze_prototypes_epochs=150),
}
# Float32 sums in a different order: losses agree to ~1e-6 relative, weights to ~3e-7 after eight AdamW steps.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 2e-6
# Parameters whose gradient is zero in exact arithmetic, so AdamW (which divides by the gradient's own scale)
# turns rounding noise into steps of up to lr in ANY run, one process or two: the key third of qkv.bias (softmax
# is shift-invariant), the final LayerNorm's bias (the projector's bias-free Linear + BN removes a constant
# shift) and that BN's running mean, which follows it (and their momentum-encoder copies). They are held to that
# bound instead: the summed lr, twice.
NOISE_DRIVEN = ("backbone.blocks.0.attn.qkv.bias", "backbone.norm.bias", "projector.1.running_mean")


@pytest.fixture(scope="module", autouse=True)
def fp32_matmuls():
    """The tolerances above are fp32's: pin the CPU matmul precision (replicate/runtime/precision.py) for the spawned
    processes and the one-process reference alike. With bf16 products, the reordered fp32 sums flip bf16 roundings
    downstream, which is bf16's noise, not a difference in what the processes compute."""
    with pytest.MonkeyPatch.context() as mp_env:
        mp_env.setenv("REPLICATE_CPU_MATMUL", "fp32")
        yield


def noise_driven(key: str) -> bool:
    return key.endswith(NOISE_DRIVEN)


def small_config(setting: Setting) -> RunConfig:
    # 256 images, global batch 64: 4 iterations per epoch, 2 epochs
    return SMOKE.resolve(setting, seed=3).model_copy(update={"train_subset": 256})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfgs: dict[str, str], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results = {}
    for name, cfg_json in cfgs.items():
        r = pretrain(RunConfig.model_validate_json(cfg_json), progress=False, max_steps=STEPS)
        results[name] = {"state": r.model.state_dict(), "curves": r.monitor}
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "rank0.pt"
    cfgs = {name: small_config(s).model_dump_json() for name, s in SETTINGS.items()}
    mp.spawn(_worker, args=(2, free_port(), cfgs, str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.smoke  # two spawned processes: ~30 s on 2 cores
@pytest.mark.parametrize("name", list(SETTINGS))
def test_two_processes_match_one(name, two_process_results):
    ref = pretrain(small_config(SETTINGS[name]), progress=False, max_steps=STEPS)
    got = two_process_results[name]
    ref_loss, got_loss = ref.monitor["series"]["loss"], got["curves"]["series"]["loss"]
    assert len(ref_loss) == len(got_loss) == STEPS
    torch.testing.assert_close(torch.tensor(got_loss), torch.tensor(ref_loss), rtol=LOSS_RTOL, atol=0)
    ref_state, got_state = ref.model.state_dict(), got["state"]
    assert got_state.keys() == ref_state.keys()
    noise_bound = 2 * sum(ref.monitor["series"]["lr"])
    for key, want in ref_state.items():
        diff = (got_state[key].double() - want.double()).abs()
        if key.endswith("qkv.bias"):
            dim = want.shape[0] // 3
            diff, key_part = torch.cat([diff[:dim], diff[2 * dim:]]), diff[dim: 2 * dim]
            assert key_part.max() <= (noise_bound if noise_driven(key) else WEIGHT_ATOL), key
        limit = noise_bound if noise_driven(key) and not key.endswith("qkv.bias") else WEIGHT_ATOL
        assert diff.max() <= limit, f"{key}: max |diff| {diff.max():.2e} > {limit:.1e}"
    # not vacuous: training moved the weights far beyond the tolerance
    seed_everything(small_config(SETTINGS[name]).seed)
    init = build_model(small_config(SETTINGS[name])).state_dict()  # as pretrain builds it
    moved = max((ref_state[k] - init[k]).abs().max().item() for k in ref_state if k.endswith("weight"))
    assert moved > 100 * WEIGHT_ATOL
    # the kNN monitor saw the same (gathered) features at the same steps
    assert got["curves"]["knn_steps"] == ref.monitor["knn_steps"]


def test_views_do_not_depend_on_world_size(monkeypatch):
    """Process r of W gets rows [r*B/W, (r+1)*B/W) of exactly the views a single process gets."""
    cfg = small_config(Setting(epochs=300))
    whole = TensorBatches(cfg, None, torch.device("cpu")).batch(5)
    for rank in range(4):
        monkeypatch.setattr("replicate.core.distributed.world_size", lambda: 4)
        monkeypatch.setattr("replicate.core.distributed.rank", lambda r=rank: r)
        part = TensorBatches(cfg, None, torch.device("cpu")).batch(5)
        rows = slice(rank * 16, (rank + 1) * 16)
        for got, want in zip(part, whole):
            assert torch.equal(got, want[rows])


def test_a_long_wait_for_a_peer_says_what_it_waits_for(capsys):
    """The notice comes once the wait outlasts its delay, names what is awaited and the timeout; a short wait says
    nothing (the timer is cancelled)."""
    import time

    from replicate.core.distributed import PEER_TIMEOUT_ENV, announced_wait

    with announced_wait("rank 0 (the baselines)", after_s=0.05):
        time.sleep(0.3)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "waiting for rank 0 (the baselines)" in err and PEER_TIMEOUT_ENV in err
    with announced_wait("rank 0", after_s=0.5):
        pass
    time.sleep(0.7)
    assert capsys.readouterr().err == ""
