"""CPU matmul precision (replicate/runtime/precision.py): bf16 products only inside the block, everything restored after."""
from pathlib import Path

import pytest
import torch

from replicate.core.moco import SelfSupervisedViT
from replicate.runtime import precision
from tools.bench.suite import SuiteStep, reduced_config


def test_env_picks_the_precision_and_rejects_typos(monkeypatch):
    monkeypatch.setenv(precision.ENV, "fp32")
    assert precision.cpu_matmul_precision() == "fp32" and precision.training_precision("cpu") == "fp32"
    monkeypatch.setenv(precision.ENV, "BF16")
    assert precision.cpu_matmul_precision() == "bf16"
    assert precision.training_precision("cpu") == "bf16 matmul, fp32 accumulate"
    assert precision.training_precision("cuda") == precision.step_precision("cuda") == "bf16 autocast"
    assert precision.step_precision("cpu") == "bf16"
    monkeypatch.setenv(precision.ENV, "fp16")
    with pytest.raises(ValueError, match="REPLICATE_CPU_MATMUL='fp16'.*bf16, fp32"):
        precision.cpu_matmul_precision()
    monkeypatch.delenv(precision.ENV)
    assert precision.cpu_matmul_precision() == "fp32"  # on every CPU, bf16 units or not: comparable results
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.cpu_matmul_precision() == "fp32" and precision.training_precision("cpu") == "fp32"


def test_bf16_runs_default_to_their_own_results_folder(monkeypatch):
    from replicate.study.results import DEFAULT_ROOT, run_results_root

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv(precision.ENV, raising=False)
    assert run_results_root(None) == DEFAULT_ROOT
    monkeypatch.setenv(precision.ENV, "bf16")
    assert run_results_root(None) == DEFAULT_ROOT / "cpu-bf16"
    assert run_results_root("mine") == Path("mine")  # an explicit --results wins (check_precision guards it)


def test_bf16_block_sets_onednn_and_unfused_attention_then_restores_both():
    model = SelfSupervisedViT(reduced_config(4).model_copy(update={"depth": 1}))
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attention and all(m.fused_attn for m in attention)  # timm's default on this torch
    before = torch.backends.mkldnn.matmul.fp32_precision
    with precision.cpu_bf16_matmuls(model, torch.device("cpu"), enabled=True) as on:
        assert on and torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        assert not any(m.fused_attn for m in attention)
    assert torch.backends.mkldnn.matmul.fp32_precision == before and all(m.fused_attn for m in attention)
    with precision.cpu_bf16_matmuls(model, torch.device("cpu"), enabled=False) as on:
        assert not on and torch.backends.mkldnn.matmul.fp32_precision == before
    with pytest.raises(RuntimeError), precision.cpu_bf16_matmuls(model, torch.device("cpu"), enabled=True):
        raise RuntimeError("a failing step")  # a crash inside the block still restores the settings
    assert torch.backends.mkldnn.matmul.fp32_precision == before and all(m.fused_attn for m in attention)


@pytest.mark.skipif(not precision.bf16_matmuls_take_effect(),
                    reason="this CPU and torch build ignore bf16 matmuls (REPLICATE_CPU_MATMUL=bf16 is refused here)")
def test_bf16_step_multiplies_in_bf16_and_stays_close_to_fp32():
    """Same weights, same views: the bf16-matmul gradients differ from fp32 by bf16 rounding (well above fp32's
    reordering noise, far below the gradient itself), and parameters, gradients and activations stay fp32."""
    cfg = reduced_config(16).model_copy(update={"depth": 2})
    losses, grads = {}, {}
    for bf16 in (False, True):
        step = SuiteStep(cfg, torch.device("cpu"), cpu_bf16=bf16)  # seeded: identical weights and images
        x1, x2 = step.views()
        with precision.cpu_bf16_matmuls(step.model, step.device, bf16):
            loss, feats = step.model(x1, x2, 0.99)
            loss.backward()
        losses[bf16] = loss.item()
        grads[bf16] = step.model.backbone.blocks[0].mlp.fc1.weight.grad
        assert feats.dtype == grads[bf16].dtype == torch.float32
    relative = ((grads[True] - grads[False]).abs().max() / grads[False].abs().max()).item()
    assert 1e-4 < relative < 0.1  # bf16 keeps 8 bits of mantissa; fp32 reordering alone gives ~1e-6
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
    cos = torch.nn.functional.cosine_similarity(grads[True].flatten(), grads[False].flatten(), dim=0)
    assert cos > 0.95


def test_cli_rejects_a_mistyped_precision_before_running_anything(monkeypatch, tmp_path, capsys):
    from replicate.__main__ import main

    monkeypatch.setenv(precision.ENV, "fp16")
    assert main(["run", "table5", "--profile", "smoke", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "REPLICATE_CPU_MATMUL='fp16'" in err
    assert not any(tmp_path.rglob("*.json"))  # no row ran


def test_bf16_is_refused_where_it_would_not_take_effect(monkeypatch):
    """A CPU and torch build that ignore bf16 matmuls would run fp32 and label it bf16: the opt-in is refused
    before any row runs, in one line; fp32 (the default) is never refused."""
    monkeypatch.setattr(precision, "bf16_matmuls_take_effect", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(precision.ENV, "bf16")
    with pytest.raises(precision.PrecisionError, match="ignore bf16 matmuls.*unset REPLICATE_CPU_MATMUL"):
        precision.check_cpu_precision()
    monkeypatch.delenv(precision.ENV)
    precision.check_cpu_precision()
    monkeypatch.setattr(precision, "bf16_matmuls_take_effect", lambda: True)
    monkeypatch.setenv(precision.ENV, "bf16")
    precision.check_cpu_precision()


def test_the_effect_probe_sees_bf16_rounding_when_it_happens(monkeypatch):
    """The probe compares a Linear with and without the setting: a build that rounds reports True, one that does
    not reports False (simulated by rounding the operands by hand)."""
    precision.bf16_matmuls_take_effect.cache_clear()
    real_linear = torch.nn.functional.linear

    def rounding_linear(x, w, b=None):
        if torch.backends.mkldnn.matmul.fp32_precision == "bf16":
            x, w = x.bfloat16().float(), w.bfloat16().float()
        return real_linear(x, w, b)

    monkeypatch.setattr(precision.F, "linear", rounding_linear)
    assert precision.bf16_matmuls_take_effect()
    precision.bf16_matmuls_take_effect.cache_clear()
    monkeypatch.setattr(precision.F, "linear", lambda x, w, b=None: real_linear(x, w, b))
    assert not precision.bf16_matmuls_take_effect()
    precision.bf16_matmuls_take_effect.cache_clear()
