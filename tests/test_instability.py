"""Instability observatory: kNN dips, gradient spikes and their lead, the table columns and the figures."""
import json

import numpy as np
import pytest

from replicate.report.figures import _attention_rows
from replicate.report.render import INSTABILITY_HEADERS, render_table
from replicate.runtime.instability import aggregate, find_dips, find_spikes, spike_lead, summarize
from replicate.study.profiles import SMOKE
from replicate.study.results import ResultStore
from replicate.study.spec import find_spec, load_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rising(n: int, noise: float, seed: int = 0) -> np.ndarray:
    """A saturating learning curve (20 -> 70, flat after ~n/2) with Gaussian noise of sd ``noise``."""
    t = np.arange(n)
    return 20 + 50 * (1 - np.exp(-t / (n / 8))) + np.random.default_rng(seed).normal(0, noise, n)


def with_dip(acc: np.ndarray, at: int, depth: float, length: int) -> np.ndarray:
    acc = acc.copy()
    acc[at:at + length] -= depth
    return acc


def grad_series(n: int, spikes: list[int], seed: int, height: float = 10.0) -> np.ndarray:
    """A relative-gradient series: ~0.1 with 5% multiplicative noise, x``height`` for 3 iterations per spike."""
    g = 0.1 * np.exp(np.random.default_rng(seed).normal(0, 0.05, n))
    for t in spikes:
        g[t:t + 3] *= height
    return g


def test_dips_are_found_with_their_depths():
    plateau = 70 + np.random.default_rng(0).normal(0, 0.2, 100)  # flat: depth = the drop we put in
    acc = with_dip(with_dip(plateau, 40, 4.0, 5), 70, 6.0, 5)  # 5 samples: outlast the median of 5
    out = find_dips(np.arange(100) * 20, acc)
    assert out["n_dips"] == 2
    assert [d["depth"] for d in out["dips"]] == pytest.approx([4.0, 6.0], abs=0.8)
    assert out["max_depth"] == pytest.approx(6.0, abs=0.8)
    assert [d["bottom"] // 20 for d in out["dips"]] == pytest.approx([42, 72], abs=2)  # steps, not indices
    assert not out["unrecovered"]


def test_drop_at_the_end_is_unrecovered_not_a_dip():
    acc = rising(60, 0.2)
    acc[-5:] -= 5.0
    out = find_dips(range(60), acc)
    assert out["n_dips"] == 0 and out["unrecovered"]
    assert out["final_gap"] == pytest.approx(5.0, abs=1.0)


def test_no_dips_on_smooth_or_noisy_monotone_curves():
    assert find_dips(range(80), rising(80, 0.0))["n_dips"] == 0
    assert find_dips(range(80), rising(80, 0.3))["n_dips"] == 0
    one_bad_sample = rising(80, 0.2)
    one_bad_sample[30] -= 10  # a single outlier sample is noise, not a dip: it must persist
    assert find_dips(range(80), one_bad_sample)["n_dips"] == 0
    # A monitor with a small batch: sd 2 points. A fixed 1-point threshold counts noise as dips; the
    # noise-aware threshold (mostly) does not.
    noisy = [rising(100, 2.0, seed) for seed in range(10)]
    assert np.mean([find_dips(range(100), a, noise_k=0.0)["n_dips"] for a in noisy]) > 2
    auto = [find_dips(range(100), a) for a in noisy]
    assert np.mean([o["n_dips"] for o in auto]) <= 0.3 and min(o["threshold"] for o in auto) > 2.0


def test_spikes_found_and_first_layer_leads():
    first = grad_series(1000, [300, 700], seed=0)
    last = grad_series(1000, [330, 725], seed=1)
    f, la = find_spikes(first), find_spikes(last)
    assert f["onsets"] == [300, 700] and la["onsets"] == [330, 725]
    assert f["max_ratio"] == pytest.approx(10.0, rel=0.3)
    lead = spike_lead(f["onsets"], la["onsets"])
    assert lead["n_pairs"] == 2 and lead["first_leads_by"] == 27.5
    assert spike_lead(la["onsets"], f["onsets"])["first_leads_by"] == -27.5  # the other layer first: negative
    assert spike_lead([100], [400])["n_pairs"] == 0  # too far apart to be one event


def test_no_spikes_on_noisy_smooth_gradients():
    for seed in range(3):
        drifting = grad_series(3000, [], seed) * np.linspace(1.0, 3.0, 3000)  # slow drift, not a spike
        assert find_spikes(drifting)["n_spikes"] == 0
    assert find_spikes(np.full(500, 0.1))["n_spikes"] == 0  # constant: no zero-MAD false alarms


def synthetic_curves(n_iter: int, dips: list[tuple[int, float]], first_spikes: list[int], lag: int,
                     seed: int) -> dict:
    """Monitor curves as TrainingMonitor.curves() writes them: kNN every 20 iterations."""
    steps = list(range(19, n_iter, 20))
    acc = rising(len(steps), 0.3, seed)
    for at, depth in dips:
        acc = with_dip(acc, at, depth, 3)
    first = grad_series(n_iter, first_spikes, seed)
    last = grad_series(n_iter, [t + lag for t in first_spikes], seed + 100)
    series = {"loss": list(np.linspace(9, 7, n_iter)), "grad_first_rel": list(first),
              "grad_last_rel": list(last)}
    entropy = [[2.6 - 0.1 * b - 0.3 * (i / len(steps)) for b in range(2)] for i in range(len(steps))]
    return {"series": series, "knn_steps": steps, "knn_acc": list(acc), "attn_entropy": entropy,
            "attn_max_logit": [[4.0 + 10 * i / len(steps) + b for b in range(2)] for i in range(len(steps))]}


def test_summary_is_json_ready_and_aggregates_over_seeds():
    assert summarize(None) is None
    runs = [synthetic_curves(1000, [(30, 5.0)], [400], 30, seed=0),
            synthetic_curves(1000, [(25, 3.0), (40, 4.0)], [400, 800], 20, seed=1)]
    sums = [summarize(c) for c in runs]
    assert json.loads(json.dumps(sums)) == sums
    agg = aggregate([{"instability": s} for s in sums])
    assert agg["n_dips"] == 1.5 and agg["max_depth"] == pytest.approx(5.0, abs=1.0)
    assert agg["spikes_first"] == 1.5 and agg["first_leads_by"] == 25.0
    assert aggregate([{"curves": runs[0]}])["n_dips"] == 1  # old records: computed from the curves


def test_table_columns_and_figures_from_results(tmp_path):
    spec = load_spec(find_spec("table4"))
    store = ResultStore(tmp_path, "smoke")
    for seed in range(2):
        for i, row in enumerate(spec.rows[4:6]):
            dips = [(30, 6.0)] if i == 0 else []
            curves = synthetic_curves(1000, dips, [400] if i == 0 else [], 30, seed)
            store.save(spec.key, row.name, seed, {"status": "ok", "metrics": {"linear": 70.0 + i + seed},
                                                  "seed": seed, "curves": curves, "instability": summarize(curves)})
    text = render_table(spec, store, write=True)
    header = next(ln for ln in text.splitlines() if ln.startswith("| row"))
    assert all(h in header for h in INSTABILITY_HEADERS)
    ref = next(ln for ln in text.splitlines() if ln.startswith("| MoCo v3, lr 1.5e-4, learned"))
    cells = [c.strip() for c in ref.split("|")]
    dips, depth, spikes, lead = cells[-5:-1]
    assert (dips, spikes, lead) == ("1", "1 / 1", "+30 it") and float(depth) == pytest.approx(6.0, abs=0.8)
    for kind in ("knn", "grad", "attention", "delta"):
        png = tmp_path / "smoke" / f"{spec.key}_{kind}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
        assert f"]({png.name})" in text  # embedded with a link relative to the table's .md


def test_attention_figure_shows_each_rows_seed_with_the_most_dips():
    spec = load_spec(find_spec("table2"))
    records = {"lr1.5e-4": [{"seed": s, "curves": synthetic_curves(1000, dips, [], 0, s)}
                            for s, dips in ((0, []), (1, [(30, 6.0)]), (2, [(30, 6.0)]))],
               "lr0.5e-4": [{"seed": s, "curves": synthetic_curves(1000, [], [], 0, s)} for s in (1, 0)]}
    chosen = {row.name: rec["seed"] for row, rec in _attention_rows(spec, records)}
    assert chosen == {"lr1.5e-4": 1, "lr0.5e-4": 0}  # ties go to the lowest seed


@pytest.mark.smoke
def test_smoke_run_records_instability_and_renders_figures(tmp_path):
    from replicate.study.runner import run_table

    spec = load_spec(find_spec("table4"))
    spec = spec.model_copy(update={"rows": spec.rows[4:6], "reference": "mocov3_lr1.5e-4_learned"})
    store = run_table(spec, SMOKE, results_root=tmp_path, progress=False)
    rec = store.load(spec.key, "mocov3_lr1.5e-4_random", 0)
    # the record's summary is the one of its own curves (summarize itself is pinned on synthetic curves above)
    assert rec["instability"] == json.loads(json.dumps(summarize(rec["curves"])))
    assert isinstance(rec["instability"]["knn"]["n_dips"], int) and "first_leads_by" in rec["instability"]["grad"]
    assert len(rec["curves"]["series"]["grad_first_rel"]) == rec["iterations"]
    # the held-out monitor's attention diagnostics: one value per block at every kNN step
    curves = rec["curves"]
    assert len(curves["attn_entropy"]) == len(curves["attn_max_logit"]) == len(curves["knn_steps"]) > 0
    assert {len(v) for v in curves["attn_entropy"]} == {rec["config"]["depth"]}
    text = render_table(spec, store, write=True)
    assert "kNN dips" in text and "grad spikes 1st/last" in text
    for kind in ("knn", "grad", "attention", "delta"):
        png = tmp_path / "smoke" / f"{spec.key}_{kind}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert f"{spec.key}_knn.png" in (tmp_path / "smoke" / f"{spec.key}.md").read_text()


def test_instability_target_report_counts_false_positives_and_skips_stale_runs(tmp_path):
    """The report behind docs/reduced-scale.md's instability target: a dip in a paper-stable row is a false
    positive, a paper-unstable row counts once >= 2 of its seeds dip, and a run whose config is stale is ignored."""
    from replicate.report.calibration import instability_report
    from replicate.report.render import read_studies
    from replicate.study.profiles import REDUCED

    store = ResultStore(tmp_path, "reduced")
    spec1 = load_spec(find_spec("table1"))

    def put(row: str, seed: int, dips: list, stale: bool = False):
        cfg = REDUCED.resolve(spec1.setting(spec1.row(row)), seed=seed).model_dump(mode="json")
        if stale:
            cfg["embed_dim"] += 1
        curves = synthetic_curves(1000, dips, [], 0, seed)
        store.save(spec1.key, row, seed, {"table": spec1.key, "row": row, "seed": seed, "status": "ok",
                                          "config": cfg, "curves": curves, "instability": summarize(curves)})

    put("bs1024", 0, [(30, 5.0)])
    put("bs1024", 1, [])
    put("bs1024", 2, [(30, 5.0)], stale=True)  # not counted
    for seed in range(3):
        put("bs6144", seed, [(30, 5.0)] if seed else [])
    text = instability_report(read_studies(REDUCED, tmp_path))
    assert "| stable | table1:bs1024 | 2 | 1, 0 | " in text
    assert "False positives (a dip in a paper-stable row): 1 of 2 runs (50%)." in text
    assert "Paper-unstable rows showing it (a dip, an open drop or a divergence) in >= 2 of their seeds: 1 of 1." in text
    assert "| unstable | table1:bs4096 | 0 | not run yet |" in text


def test_attention_probe_against_a_written_out_reference():
    """Zero q/k weights give uniform attention: entropy ln(tokens), largest logit 0. A single block with one
    head and hand-set weights gives the entropy computed here by hand."""
    import math

    import torch

    from replicate.core.model import build_vit
    from replicate.runtime.monitor import attention_probe
    from replicate.study.profiles import SMOKE

    spec = load_spec(find_spec("table5"))
    cfg = SMOKE.resolve(spec.setting(spec.row("sincos")))
    vit = build_vit(cfg).eval()
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1  # patches + [CLS]
    with torch.no_grad():
        for block in vit.blocks:
            block.attn.qkv.weight[: 2 * block.attn.attn_dim].zero_()
            if block.attn.qkv.bias is not None:
                block.attn.qkv.bias.zero_()
        x = torch.rand(4, cfg.in_chans, cfg.image_size, cfg.image_size)
        with attention_probe(vit) as stats:
            vit(x)
    assert stats["entropy"] == [pytest.approx(math.log(tokens), abs=1e-3)] * cfg.depth
    assert stats["max_logit"] == [0.0] * cfg.depth
    # hooks removed on exit: another forward records nothing
    with torch.no_grad():
        vit(x)
    assert len(stats["entropy"]) == cfg.depth
