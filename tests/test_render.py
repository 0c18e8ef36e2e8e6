"""Renderer: deltas, the verdict rule, n/a for unknown paper numbers, "—" for rows not run."""
from replicate.render import RowStats, render_table, verdict
from replicate.results import ResultStore
from replicate.spec import find_spec, load_spec


def rows(*vals):
    return RowStats([{"status": "ok", "metrics": {"linear": v}} for v in vals])


def smoke_table8_store(tmp_path):
    """Table 8's spec, an empty smoke store, and save(row, seed, linear, **config fields changed from the current)."""
    from replicate.profiles import SMOKE

    spec = load_spec(find_spec("table8"))
    store = ResultStore(tmp_path, "smoke")

    def save(row, seed, value, **changed):
        config = SMOKE.resolve(spec.setting(spec.row(row)), seed=seed).model_dump(mode="json") | changed
        store.save(spec.key, row, seed, {"status": "ok", "seed": seed, "config": config, "metrics": {"linear": value}})

    return spec, store, save


def test_verdict_rule():
    base = rows(70.0, 70.2, 69.8)
    assert verdict(-1.6, rows(68.0, 68.1, 67.9), base, "linear").startswith("reproduces")
    assert verdict(-1.6, rows(72.0, 72.1, 71.9), base, "linear").startswith("opposite")
    assert verdict(-1.6, rows(70.1, 69.9, 70.0), base, "linear").startswith("within noise")
    assert verdict(-1.6, rows(68.0), base, "linear") == "? (1 seed)"
    assert verdict(None, rows(68.0, 68.0), base, "linear").startswith("n/a")
    assert "(paper Δ small)" in verdict(-0.2, rows(68.0, 68.1, 67.9), base, "linear")


def test_unrun_table_shows_paper_numbers_and_dashes(tmp_path):
    spec = load_spec(find_spec("table3"))
    text = render_table(spec, ResultStore(tmp_path, "reduced"))
    assert "72.5" in text and "n/a" in text  # lr 3e-4 has no paper number
    assert "—" in text
    assert not (tmp_path / "reduced").exists()  # nothing written for a table without results


def test_rendered_deltas_from_results(tmp_path):
    spec = load_spec(find_spec("table8"))
    store = ResultStore(tmp_path, "smoke")
    for seed, (a, b) in enumerate([(80.0, 78.0), (81.0, 78.5), (80.5, 77.5)]):
        store.save(spec.key, "with_pred", seed, {"status": "ok", "metrics": {"linear": a}})
        store.save(spec.key, "no_pred", seed, {"status": "ok", "metrics": {"linear": b}})
    text = render_table(spec, store, write=True)
    line = next(ln for ln in text.splitlines() if ln.startswith("| w/o pred"))
    assert "-1.0" in line  # paper: 75.5 - 76.5
    assert "-2.5" in line and "reproduces" in line  # ours: 78.0 - 80.5
    assert (tmp_path / "smoke" / f"{spec.key}.md").read_text().strip() == text.strip()


def test_rendered_table_says_how_its_runs_multiplied(tmp_path):
    spec = load_spec(find_spec("table8"))
    store = ResultStore(tmp_path, "smoke")
    store.save(spec.key, "with_pred", 0, {"status": "ok", "metrics": {"linear": 80.0}})  # predates the field: fp32
    store.save(spec.key, "no_pred", 0, {"status": "ok", "metrics": {"linear": 79.0},
                                        "provenance": {"precision": "bf16 matmul, fp32 accumulate"}})
    store.save(spec.key, "no_pred", 1, {"status": "ok", "metrics": {"linear": 79.5},
                                        "provenance": {"precision": "bf16 matmul, fp32 accumulate"}})
    text = render_table(spec, store)
    assert "Pretraining precision: bf16 matmul, fp32 accumulate (2 runs), fp32 (1 run)" in text


def test_rerun_report_lists_current_rows_and_what_is_left(tmp_path):
    from replicate.render import rerun_report

    spec, store, save = smoke_table8_store(tmp_path)

    for seed, (a, b) in enumerate([(80.0, 78.0), (81.0, 78.5), (80.5, 77.5)]):
        save("with_pred", seed, a)
        save("no_pred", seed, b, epochs=999)  # made with another profile: stale, not shown
    text = rerun_report("smoke", tmp_path)
    assert "| table8 | w/ pred. MLP | 80.5 ± 0.5 (n=3) linear |  |  | reference | — |" in text
    assert "w/o pred" not in text and "table8 (1 of 2: no_pred)" in text
    for seed, b in enumerate([78.0, 78.5, 77.5]):
        save("no_pred", seed, b)
    line = next(ln for ln in rerun_report("smoke", tmp_path).splitlines() if "w/o pred" in ln)
    assert "| -2.5 | -1.0 | reproduces" in line and "table8 (" not in rerun_report("smoke", tmp_path)


def test_a_row_being_rerun_shows_only_its_current_runs(tmp_path):
    """A row re-run for one seed of three: its mean is that seed's, never a mix of two configs; it is not stale."""
    spec, store, save = smoke_table8_store(tmp_path)
    save("with_pred", 0, 80.0)
    save("with_pred", 1, 70.0, epochs=999)  # the previous config's seeds
    save("with_pred", 2, 70.0, epochs=999)
    for seed in range(3):
        save("no_pred", seed, 60.0, epochs=999)  # not re-run yet: shown, marked stale
    text = render_table(spec, store)
    line = next(ln for ln in text.splitlines() if "w/ pred" in ln)
    assert "80.0 (n=1)" in line and "stale" not in line
    assert "w/o pred. MLP (stale)" in text and "60.0 ± 0.0 (n=3)" in text
