"""An interrupted run, resumed from its checkpoint, ends bit-identical to a run that was never interrupted."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from replicate.core.config import Setting
from replicate.runtime.checkpoint import load_checkpoint
from replicate.runtime.trainer import CHECKPOINT_EVERY_ENV, checkpoint_interval, pretrain
from replicate.study.profiles import SMOKE

REPO = Path(__file__).resolve().parent.parent


def small_config(**setting):
    # 256 digits at global batch 64, 2 epochs: 8 iterations, two monitor flushes (every 5) and an epoch boundary
    return SMOKE.resolve(Setting(epochs=300, **setting), seed=1).model_copy(update={"train_subset": 256})


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.fixture(scope="module")
def uninterrupted():
    return pretrain(small_config(), progress=False)


@pytest.mark.parametrize("stop_at", [3, 5])  # mid-epoch between flushes; exactly at a monitor flush
def test_pretrain_stopped_then_resumed_equals_uninterrupted(tmp_path, stop_at, uninterrupted):
    cfg, whole = small_config(), uninterrupted
    ckpt = tmp_path / "row.pt"
    first = pretrain(cfg, ckpt_path=ckpt, progress=False, max_steps=stop_at)
    assert first.iterations == stop_at and load_checkpoint(ckpt, cfg)["step"] == stop_at
    rest = pretrain(cfg, ckpt_path=ckpt, progress=False)
    assert rest.iterations == whole.iterations == 8
    assert_same_weights(rest.model.state_dict(), whole.model.state_dict())
    assert rest.monitor == whole.monitor  # per-iteration loss / grad curves and kNN monitor, bit for bit
    # not vacuous: the first part really stopped early (its weights differ from the final ones)
    assert not torch.equal(first.model.backbone.blocks[0].attn.qkv.weight, whole.model.backbone.blocks[0].attn.qkv.weight)


def test_periodic_checkpoints_and_interval_override(tmp_path, monkeypatch):
    cfg = small_config(framework="byol")
    assert checkpoint_interval(cfg) == SMOKE.checkpoint_every
    monkeypatch.setenv(CHECKPOINT_EVERY_ENV, "3")
    assert checkpoint_interval(cfg) == 3
    saved = []
    monkeypatch.setattr("replicate.runtime.trainer.save_checkpoint", lambda *a, **k: saved.append(a[5]))
    pretrain(cfg, ckpt_path=tmp_path / "row.pt", progress=False)
    assert saved == [3, 6]  # every 3 iterations, none at the end (8): the finished row's result replaces it
    monkeypatch.setenv(CHECKPOINT_EVERY_ENV, "often")
    with pytest.raises(ValueError, match=CHECKPOINT_EVERY_ENV):
        checkpoint_interval(cfg)


SPEC = """\
id: 90
title: Resume probe
paper_ref: "test"
reference: a
base: {epochs: 100, warmup_epochs: 10}
rows:
  - {name: a, label: "a"}
"""
# The CLI, with a spy that also saves the final pretrained weights (results files hold metrics, not weights).
DRIVER = """\
import sys, torch
import replicate.study.runner as runner
real = runner.pretrain
def spy(*args, **kwargs):
    result = real(*args, **kwargs)
    torch.save(result.model.state_dict(), sys.argv[1])
    return result
runner.pretrain = spy
from replicate.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def cli(weights: Path, spec: Path, results: Path) -> list[str]:
    return [sys.executable, "-c", DRIVER, str(weights), "run", str(spec), "--profile", "smoke", "--results",
            str(results), "--quiet", "--no-render"]


@pytest.mark.smoke  # three short CLI runs: ~1 min on 2 cores
def test_sigkill_mid_training_then_rerun_is_bit_identical(tmp_path):
    spec = tmp_path / "resume_probe.yaml"  # results and checkpoints are keyed by the spec file's name
    spec.write_text(SPEC)
    env = {**os.environ, CHECKPOINT_EVERY_ENV: "4", "PYTHONPATH": str(REPO)}
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    subprocess.run(cli(tmp_path / "clean.pt", spec, clean), env=env, cwd=REPO, check=True, capture_output=True)
    # same baselines file in both stores (they do not depend on the run): saves recomputing them
    (crashed / "smoke").mkdir(parents=True)
    shutil.copy(clean / "smoke" / "baselines.json", crashed / "smoke" / "baselines.json")

    ckpt = crashed / "smoke" / "ckpt" / "resume_probe" / "a" / "seed0.pt"
    proc = subprocess.Popen(cli(tmp_path / "unused.pt", spec, crashed), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "no checkpoint appeared before the run ended"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = crashed / "smoke" / "resume_probe" / "a" / "seed0.json"
    assert not result.exists()  # killed mid-training, before the row finished

    rerun = subprocess.run(cli(tmp_path / "resumed.pt", spec, crashed), env=env, cwd=REPO, check=True,
                           capture_output=True, text=True)
    assert "resuming mocov3 seed 0 from step " in rerun.stderr  # it resumed, not restarted
    assert not ckpt.exists()  # a finished row leaves no checkpoint behind

    want = json.loads((clean / "smoke" / "resume_probe" / "a" / "seed0.json").read_text())
    got = json.loads(result.read_text())
    assert got["status"] == want["status"] == "ok"
    assert got["metrics"] == want["metrics"] and got["iterations"] == want["iterations"] == 18
    assert got["curves"] == want["curves"]
    assert_same_weights(torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "clean.pt"))
