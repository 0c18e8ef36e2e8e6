"""The performance bench: FLOP counts against a hand count, the plain reference is a correct Algorithm 1, the
kNN comparison agrees, and the quick bench writes the full report."""
import json

import pytest
import torch

from replicate.core.config import Setting
from replicate.core.moco import SelfSupervisedViT
from replicate.study.profiles import SMOKE
from tools.bench.__main__ import main as bench_main
from tools.bench.cpu import BenchPlan, bf16_vs_fp32, knn_comparison, measured_table_minutes, targets
from tools.bench.measure import count_step_flops, flop_counter
from tools.bench.plain import PlainStep
from tools.bench.suite import SuiteStep, reduced_config


def hand_count_step_flops(image=40, patch=10, dim=96, depth=4, hidden=512, out=128, batch=8, chans=1):
    """Matmul FLOPs (2 per multiply-add) of one MoCo v3 step per source image, written out by hand."""
    n = (image // patch) ** 2 + 1  # patches + [CLS]
    block = 2 * n * 12 * dim * dim + 4 * n * n * dim  # qkv+proj+fc1+fc2 = 12 d^2 weights per token; QK^T and AV
    patch_embed = 2 * (image // patch) ** 2 * chans * patch * patch * dim
    backbone = depth * block
    projector = 2 * (dim * hidden + hidden * hidden + hidden * out)
    predictor = 2 * (out * hidden + hidden * out)
    online_fwd = patch_embed + backbone + projector + predictor
    online_bwd = 2 * (backbone + projector + predictor)  # frozen patch projection: no backward through it
    momentum_fwd = patch_embed + backbone + projector
    losses = 2 * (2 * batch * out + 2 * batch * out)  # q k^T forward + grad wrt q, two symmetric terms
    return 2 * (online_fwd + online_bwd) + 2 * momentum_fwd + losses


def test_step_flops_match_hand_count_for_reduced_model():
    cfg = reduced_config()
    assert (cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.head_hidden, cfg.image_size) == (96, 4, 10, 512, 40)
    counted = count_step_flops(cfg, batch=8)
    expected = hand_count_step_flops(batch=8)
    assert 1.2e8 < expected < 1.45e8  # ~132 MFLOPs per image: the order the report's numbers rest on
    assert counted["train"] == pytest.approx(expected, rel=0.005)
    assert counted["forward"] == pytest.approx(4 * (2 * 17 * 12 * 96**2 + 4 * 17**2 * 96) + 2 * 16 * 100 * 96,
                                               rel=0.005)


def test_meta_count_equals_count_on_a_real_cpu_step():
    """The meta-device count must see the same FLOPs as a real step (CPU fused attention included)."""
    cfg = SMOKE.resolve(Setting())
    torch.manual_seed(0)
    model = SelfSupervisedViT(cfg).train()
    x1 = torch.rand(4, cfg.in_chans, cfg.image_size, cfg.image_size)
    x2 = torch.rand_like(x1)
    with flop_counter() as real:
        loss, _ = model(x1, x2, 0.99)
        loss.backward()
    assert count_step_flops(cfg, batch=4)["train"] == pytest.approx(real.get_total_flops() / 4, rel=0.02)


def test_suite_step_times_the_trainers_own_step(monkeypatch):
    """The bench's suite side runs ``trainer.train_step`` (no copy of it): each SuiteStep call is one such step,
    with the model's parameters updated."""
    import tools.bench.suite as suite
    from replicate.runtime import trainer

    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0])
        return trainer.train_step(*args, **kwargs)

    monkeypatch.setattr(suite, "train_step", spy)
    step = SuiteStep(reduced_config(4).model_copy(update={"depth": 1}), torch.device("cpu"))
    before = step.model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    step()
    assert calls == [step.model]
    assert not torch.equal(before, step.model.backbone.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("framework", ["mocov3", "swav"])
def test_the_loops_step_is_train_step(framework, monkeypatch):
    """Two iterations of ``pretrain`` and two calls of ``train_step`` on the same batches, lrs and momenta from the
    same initial weights give bit-identical weights: what the bench and calibration time is what the loop runs."""
    from replicate.core.optim import build_optimizer
    from replicate.core.swav import frozen_prototype_steps
    from replicate.runtime import trainer

    initial, inputs = [], []
    real_model, real_grads = trainer.build_model, trainer.compute_gradients

    def recording_model(cfg):
        model = real_model(cfg)
        initial.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    def recording_grads(model, optimizer, x1, x2, m, lr, *args, **kwargs):
        inputs.append((x1.clone(), x2.clone(), m, lr))
        return real_grads(model, optimizer, x1, x2, m, lr, *args, **kwargs)

    monkeypatch.setattr(trainer, "build_model", recording_model)
    monkeypatch.setattr(trainer, "compute_gradients", recording_grads)
    cfg = SMOKE.resolve(Setting(framework=framework, warmup_epochs=0))  # no warmup: lr > 0 from the first step
    looped = trainer.pretrain(cfg, progress=False, max_steps=2).model
    monkeypatch.setattr(trainer, "compute_gradients", real_grads)
    assert len(inputs) == 2 and all(lr > 0 for *_, lr in inputs)
    model = real_model(cfg)
    model.load_state_dict(initial[0])
    optimizer = build_optimizer(cfg, model)
    model.train()
    frozen = frozen_prototype_steps(cfg, trainer.make_batches(cfg, None, torch.device("cpu")).iters_per_epoch)
    for i, (x1, x2, m, lr) in enumerate(inputs):
        trainer.train_step(model, optimizer, x1, x2, m, lr, False, torch.device("cpu"), cfg.setting.patch_proj_clip,
                           drop_prototypes=i < frozen)
    stepped = dict(model.named_parameters())
    moved = 0
    for name, p in looped.named_parameters():
        assert torch.equal(p, stepped[name]), name
        moved += not torch.equal(p, initial[0][name])
    assert moved > 0


def test_plain_reference_is_algorithm_1():
    """One plain step: the key encoder becomes m f_k + (1-m) f_q (from the pre-step f_q), the query encoder moves."""
    cfg = reduced_config(8).model_copy(update={"depth": 1})
    step = PlainStep(cfg, torch.device("cpu"), num_workers=0)
    with torch.no_grad():  # make f_k differ from f_q so that the update is visible
        for p in step.f_k.parameters():
            p.add_(0.1)
    q0 = [p.detach().clone() for p in step.f_q.parameters()]
    k0 = [p.detach().clone() for p in step.f_k.parameters()]
    step()
    for pk, pk0, pq0 in zip(step.f_k.parameters(), k0, q0):
        torch.testing.assert_close(pk, 0.99 * pk0 + 0.01 * pq0)
    assert any(not torch.equal(p, p0) for p, p0 in zip(step.f_q.parameters(), q0))


def test_knn_faiss_agrees_with_sklearn():
    r = knn_comparison(BenchPlan(knn_train=3000, knn_test=300))
    assert r["agreement"] >= 0.98
    assert r["faiss_acc"] == pytest.approx(r["sklearn_acc"], abs=0.02)


@pytest.mark.smoke
def test_quick_bench_writes_report(tmp_path):
    out = tmp_path / "bench" / "README.md"
    res = bench_main(["--quick", "--out", str(out)])
    text = out.read_text()
    for heading in ("## Targets", "## 1. Pretraining throughput", "## 2. FLOPs and peak", "## 3. Data pipeline",
                    "## 4. kNN evaluation", "## 5. Head to head", "## 6. torch.compile, threads and precision",
                    "## 7. Time of the reduced tables"):
        assert heading in text
    assert text.count("PASS") + text.count("FAIL") == len(res["targets"]) == 4
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["reduced"][0]["images_per_s"] > 0 and raw["peak"]["flops_per_s"] > 1e8
    assert raw["reduced_flops_per_image"] == pytest.approx(hand_count_step_flops(batch=16), rel=0.02)
    assert {t["table"] for t in raw["tables"]} >= {"table1", "table5", "table10"}
    assert all(t["hours"] > 0 for t in raw["tables"])
    h2h = raw["head_to_head"]  # interleaved blocks: one per plan block, each with the suite, the plain and a peak
    assert len(h2h["blocks"]) == 1 and h2h["speedup"] > 0 and 0 < h2h["fraction_of_peak"] < 1.5
    block = h2h["blocks"][0]
    assert set(h2h["suite"]) == set(block["suite_s"]) and h2h["precision"] in h2h["suite"]
    for p in h2h["suite"]:  # the default precision, and fp32 beside it where the default is bf16
        assert block["speedup"][p] == pytest.approx(block["plain_s"]["0"] / block["suite_s"][p])
    assert h2h["speedup"] == h2h["suite"][h2h["precision"]]["speedup"]


@pytest.mark.smoke  # oneDNN builds its bf16 kernels on the first step: seconds
def test_bf16_variant_runs_the_backbone_in_bf16_and_default_stays_fp32(monkeypatch):
    """The bench's bf16 row must time a bf16 model (autocast on), and the default CPU step must not."""
    import tools.bench.cpu as cpu

    real_peak = cpu.matmul_peak  # a 2048² bf16 matmul takes minutes on CPUs without bf16 units: probe a small one
    monkeypatch.setattr(cpu, "matmul_peak", lambda device, dtype=None: real_peak(device, reps=1, dtype=dtype, n=256))
    dtypes = {}
    cfg = reduced_config(8)
    for amp in (False, True):
        step = SuiteStep(cfg, torch.device("cpu"), amp=True if amp else None)

        def record(module, inputs, output, amp=amp):
            dtypes.setdefault(amp, output.dtype)

        step.model.backbone.blocks[0].mlp.fc1.register_forward_hook(record)
        step()
    assert dtypes == {False: torch.float32, True: torch.bfloat16}
    r = bf16_vs_fp32(BenchPlan(blocks=1, block_steps=1), 8, torch.device("cpu"))
    assert r["bf16_step_s"] > 0 and r["fp32_step_s"] > 0 and r["bf16_peak"]["what"].startswith("bfloat16")


def test_measured_table_minutes_sums_seed0_rows_and_names_their_cpus(tmp_path):
    from replicate.study.results import ResultStore
    from replicate.study.spec import all_specs

    spec = next(s for s in all_specs() if s.name == "table8")
    fp32_root, bf16_root = tmp_path / "fp32", tmp_path / "bf16"
    roots = (fp32_root, bf16_root)
    assert measured_table_minutes(spec, "fp32", roots) == (None, set())  # nothing run yet
    for i, row in enumerate(spec.rows):
        prov = {"cpu": "CPU A"} if i == 0 else {}  # the second record predates CPU (and precision) provenance
        ResultStore(fp32_root, "reduced").save(spec.key, row.name, 0,
                                                {"status": "ok", "wall_time_s": 60.0 * (i + 1), "provenance": prov})
        ResultStore(bf16_root, "reduced").save(spec.key, row.name, 0, {
            "status": "ok", "wall_time_s": 30.0, "provenance": {"cpu": "CPU B", "precision": "bf16 matmul"}})
    minutes, cpus = measured_table_minutes(spec, "fp32", roots)
    assert minutes == pytest.approx(sum(range(1, len(spec.rows) + 1)))
    assert cpus == {"CPU A", "unrecorded"}
    # a table's time counts only runs in the precision asked for, wherever they are committed
    assert measured_table_minutes(spec, "bf16 matmul", roots) == (pytest.approx(len(spec.rows) / 2), {"CPU B"})
    assert measured_table_minutes(spec, "bf16 autocast", roots) == (None, set())


def test_table_target_counts_only_times_measured_on_this_cpu():
    """A table measured in 23 min on a 3x faster VM must not pass the < 30 min target for this one."""
    h2h = {"precision": "fp32", "speedup": 1.4, "fraction_of_peak": 0.5,
           "suite": {"fp32": {"speedup": 1.4, "fraction_of_peak": 0.5}}}
    tables = [{"table": "table1", "hours": 0.2, "measured_min": 5.0, "measured_here": True},
              {"table": "table10", "hours": 1.7, "measured_min": 23.0, "measured_here": False}]
    res = {"head_to_head": h2h, "tables": tables, "bench_s": 100.0}

    def tables_target() -> dict:
        return next(t for t in targets(res, BenchPlan()) if "every reduced table" in t["target"])

    assert not tables_target()["pass"] and "table10 102 min (estimated)" in tables_target()["value"]
    tables[1]["measured_here"] = True
    assert tables_target()["pass"] and "table10 23 min (measured)" in tables_target()["value"]


@pytest.mark.smoke
def test_gpu_bench_runs_end_to_end_on_the_cpu_with_the_reduced_model():
    """The GPU bench's code path (here on the CPU, reduced model): every section, MFU consistent with its inputs."""
    from tools.bench.gpu import GpuPlan, datasheet_peak, render_gpu, run_gpu_bench

    res = run_gpu_bench(GpuPlan.quick(), torch.device("cpu"), log=lambda m: None)
    row = res["steps"][0]  # reduced model, batch 8: MFU = hand-counted FLOPs x images/s over the measured peak
    assert row["status"] == "ok" and 0 < row["mfu"] < 1
    assert row["mfu"] == pytest.approx(hand_count_step_flops(batch=8) * 8 / row["step_s"] / res["peak"]["flops_per_s"],
                                       rel=0.02)
    assert {r["pipeline"].split(":")[0] for r in res["loader"]} == {"official", "suite"}
    assert res["plain"]["speedup"] > 0 and res["plain"]["model_speedup"] > 0
    text = render_gpu(res)
    for heading in ("## Targets", "## 1. Peak", "## 2. ViT-B/16", "## 3. Where", "## 4. The paper path"):
        assert heading in text
    # matched in order: a PCIe H100 is not given the SXM part's rate, an H200 has its own entry, unknown cards none
    assert datasheet_peak("NVIDIA H100 PCIe") < datasheet_peak("NVIDIA H100 80GB HBM3")
    assert datasheet_peak("NVIDIA H200") is not None and datasheet_peak("NVIDIA A100-SXM4-80GB") is not None
    assert datasheet_peak("Tesla T4") is None and datasheet_peak("NVIDIA GeForce RTX 4090") is None


def test_folder_suite_step_feeds_rgb_crops_through_the_batched_photometric_ops():
    from tools.bench.gpu import FolderSuiteStep

    cfg = reduced_config(4).model_copy(update={"depth": 1, "in_chans": 3, "dataset": "imagenet",
                                                     "image_size": 28})
    step = FolderSuiteStep(cfg, torch.device("cpu"), workers=0, compile_backbones=False)
    x1, x2 = step.views()
    assert x1.shape == x2.shape == (4, 3, 28, 28) and not torch.allclose(x1, x2)
