"""No file the suite reads can run code: a pickle with a payload planted where a checkpoint, an evaluation state, a
row's backbone or a checkpoint to evaluate would be is refused unexecuted, in one line naming the file."""
import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from evals.resume import load_state, save_state
from replicate.__main__ import main
from replicate.core.config import Setting
from replicate.core.model import build_vit
from replicate.runtime.checkpoint import CheckpointError, load_checkpoint, rng_states, safe_load, set_rng_states
from replicate.study.evaluate import CheckpointLoadError, read_checkpoint
from replicate.study.profiles import SMOKE
from replicate.study.results import ResultStore


class Payload:
    """Unpickling this creates ``marker``: proof that the file's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path, **extra) -> Path:
    """A torch file that looks like one of ours (a dict with the usual keys) and runs code when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": "x", "step": 0, "model": Payload(marker), **extra}, path)
    return path


def test_the_planted_payload_is_real(tmp_path):
    """The fixture's sanity check: full unpickling does run it (so the tests below can fail)."""
    marker = tmp_path / "ran"
    torch.load(plant(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_a_planted_checkpoint_is_moved_aside_unexecuted(tmp_path, capsys):
    marker, ckpt = tmp_path / "ran", tmp_path / "ckpt" / "seed0.pt"
    plant(ckpt, marker)
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt, SMOKE.resolve(Setting()))
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.count("\n") == 1 and str(ckpt) in err and "not a plain tensor file" in err and "seed0.pt.bad" in err
    assert not ckpt.exists() and (ckpt.parent / "seed0.pt.bad").exists()


def test_a_planted_evaluation_state_is_never_resumed(tmp_path, capsys):
    marker, path = tmp_path / "ran", tmp_path / "seed0.probe.pt"
    plant(path, marker, state={}, rng=[])
    assert load_state(path, "x") is None  # the right fingerprint, even: never unpickled
    assert not marker.exists() and "not a plain tensor file" in capsys.readouterr().err


def test_a_planted_backbone_is_one_line_for_export(tmp_path, capsys):
    marker, results = tmp_path / "ran", tmp_path / "results"
    store = ResultStore(results, "smoke")
    store.save("05_position_embedding", "sincos", 0, {"status": "ok", "metrics": {}, "backbone": "seed0.backbone.pt"})
    path = plant(store.backbone_path("05_position_embedding", "sincos", 0), marker)
    code = main(["export", "table5", "sincos", "--profile", "smoke", "--format", "timm", "-o", str(tmp_path / "x.pth"),
                 "--results", str(results)])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists() and not (tmp_path / "x.pth").exists()
    fix = f"replicate run table5 --profile smoke --results {tmp_path / 'results'} --force"
    assert err.count("\n") == 1 and str(path) in err and fix in err


def test_a_planted_checkpoint_to_evaluate_is_refused_unless_trusted(tmp_path, capsys):
    marker, results = tmp_path / "ran", tmp_path / "results"
    path = plant(tmp_path / "vit.pth.tar", marker)
    assert main(["evaluate", str(path), "--profile", "smoke", "--results", str(results), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists() and not results.exists()
    assert err.count("\n") == 1 and str(path) in err and "--trust-checkpoint" in err


def test_trust_checkpoint_reads_a_checkpoint_with_python_objects(tmp_path, capsys):
    """An external checkpoint carrying, e.g., its training arguments as an argparse.Namespace: refused by default,
    read with --trust-checkpoint (and a warning saying so)."""
    state = build_vit(SMOKE.resolve(Setting())).state_dict()
    path = tmp_path / "external.pth.tar"
    torch.save({"args": argparse.Namespace(arch="vit_base"), "state_dict": {f"module.base_encoder.{k}": v
                                                                           for k, v in state.items()}}, path)
    with pytest.raises(CheckpointLoadError, match=r"argparse\.Namespace.*--trust-checkpoint"):
        read_checkpoint(path)
    ckpt = read_checkpoint(path, trust=True)
    assert ckpt.format == "moco-v3" and ckpt.state.keys() == state.keys()
    assert "--trust-checkpoint: unpickling" in capsys.readouterr().err


def test_a_planted_twin_backbone_is_not_reused(tmp_path, capsys):
    """Study 15 reuses another study's finished pretraining through its backbone file: a planted one is skipped
    (one warning line) and the row pretrains itself."""
    from replicate.study.finetune_row import reused_pretraining

    marker = tmp_path / "ran"
    cfg = SMOKE.resolve(Setting())
    store = ResultStore(tmp_path / "results", "smoke")
    record = {"table": "t", "row": "r", "seed": 0, "status": "ok", "config": cfg.model_dump(mode="json"),
              "metrics": {m: 1.0 for m in cfg.metrics}, "backbone": "seed0.backbone.pt",
              "provenance": {"precision": "fp32"}}
    store.save("t", "r", 0, record)
    plant(store.backbone_path("t", "r", 0), marker)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPLICATE_CPU_MATMUL", "fp32")
        assert reused_pretraining(store, cfg) == (None, None)
    err = capsys.readouterr().err
    assert not marker.exists() and err.count("\n") == 1 and "pretraining this row instead" in err


def test_rng_states_survive_a_safe_round_trip(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    path = tmp_path / "rng.pt"
    torch.save(rng_states(), path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_states(safe_load(path))  # weights_only: the states are plain data
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_an_evaluation_state_round_trips_under_safe_loading(tmp_path):
    path = tmp_path / "state.pt"
    fc = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(fc.parameters(), lr=0.1, momentum=0.9)
    fc(torch.randn(3, 4)).sum().backward()
    opt.step()
    save_state(path, "tag", {"fc": fc.state_dict(), "optimizer": opt.state_dict(), "epoch": 2, "accs": [1.0, 2.0]})
    state = load_state(path, "tag")
    assert state["epoch"] == 2 and state["accs"] == [1.0, 2.0] and torch.equal(state["fc"]["weight"], fc.weight)
    json.dumps(state["optimizer"]["param_groups"])  # plain data


def test_every_weight_file_is_one_envelope_and_kinds_do_not_mix(tmp_path):
    """Checkpoints, evaluation states and backbone files are written by one ``save_weights`` in one envelope
    (format, fingerprint, payload) and read by one ``load_weights``, which refuses a file of another kind, one
    without the keys its reader needs, or one written for another run; files from before the envelope still load."""
    from replicate.runtime.checkpoint import FORMATS, WeightsFileError, load_weights, save_weights
    from replicate.study.export import save_backbone

    cfg = SMOKE.resolve(Setting())
    save_state(tmp_path / "state.pt", "tag1", {"epoch": 3})
    save_backbone(tmp_path / "backbone.pt", build_vit(cfg), cfg.model_dump(mode="json"))
    save_weights(tmp_path / "ckpt.pt", "checkpoint", {"step": 1}, "tag2")
    for name, kind in (("state.pt", "state"), ("backbone.pt", "backbone"), ("ckpt.pt", "checkpoint")):
        assert torch.load(tmp_path / name, weights_only=True)["format"] == FORMATS[kind]
        others = [k for k in FORMATS if k != kind]
        for other in others:
            with pytest.raises(WeightsFileError, match=f"not a {FORMATS[other]} file"):
                load_weights(tmp_path / name, other)
    assert load_state(tmp_path / "state.pt", "tag1") == {"epoch": 3}
    with pytest.raises(WeightsFileError, match="written for a different configuration"):
        load_weights(tmp_path / "ckpt.pt", "checkpoint", {"step"}, "another")
    with pytest.raises(WeightsFileError, match="not a replicate-checkpoint/1 file"):
        load_weights(tmp_path / "ckpt.pt", "checkpoint", {"step", "model"})
    torch.save({"fingerprint": "tag3", "backbone": {}}, tmp_path / "old_cache.pt")  # the transfer cache before
    assert load_weights(tmp_path / "old_cache.pt", "backbone", {"backbone"}, "tag3")["backbone"] == {}
