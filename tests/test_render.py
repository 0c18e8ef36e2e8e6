"""Renderer: deltas, the verdict rule, n/a for unknown paper numbers, "—" for rows not run."""
from replicate.report.render import RowStats, render_table
from replicate.report.verdicts import Kind, Verdict, verdict
from replicate.study.results import ResultStore
from replicate.study.spec import find_spec, load_spec


def rows(*vals):
    return RowStats([{"status": "ok", "metrics": {"linear": v}} for v in vals])


def smoke_table8_store(tmp_path):
    """Table 8's spec, an empty smoke store, and save(row, seed, linear, **config fields changed from the current)."""
    from replicate.study.profiles import SMOKE

    spec = load_spec(find_spec("table8"))
    store = ResultStore(tmp_path, "smoke")

    def save(row, seed, value, **changed):
        config = SMOKE.resolve(spec.setting(spec.row(row)), seed=seed).model_dump(mode="json") | changed
        store.save(spec.key, row, seed, {"status": "ok", "seed": seed, "config": config, "metrics": {"linear": value}})

    return spec, store, save


def test_verdict_rule():
    base = rows(70.0, 70.2, 69.8)
    assert verdict(-1.6, rows(68.0, 68.1, 67.9), base, "linear").kind == Kind.REPRODUCES
    assert verdict(-1.6, rows(72.0, 72.1, 71.9), base, "linear").kind == Kind.OPPOSITE
    assert verdict(-1.6, rows(70.1, 69.9, 70.0), base, "linear").kind == Kind.WITHIN_NOISE
    assert str(verdict(-1.6, rows(68.0), base, "linear")) == "? (1 seed)"
    assert str(verdict(None, rows(68.0, 68.0), base, "linear")) == "n/a (no paper Δ)"
    small = verdict(-0.2, rows(68.0, 68.1, 67.9), base, "linear")
    assert small.small_paper_delta and str(small).endswith(" (paper Δ small)")
    assert str(Verdict(Kind.OPPOSITE, 1.25, None, metric="digits")) == "opposite (±1.2) [digits]"


def seeded(*vals, seeds=None):
    return RowStats([{"status": "ok", "seed": s, "metrics": {"linear": v}}
                     for s, v in zip(seeds or range(len(vals)), vals)])


def test_verdict_pairs_rows_by_seed():
    """The seeds move both rows alike: the paired band (2 sd(d_s)/sqrt(n)) resolves a delta the unpaired one hides.
    Written out: d_s = -0.3, -0.4, -0.2 -> sd 0.1, band 2 * 0.1 / sqrt(3) = 0.115; unpaired band
    2 * sqrt(1.11 / 3 + 1.0 / 3) = 1.68 (variances 1.11 and 1.0)."""
    base = seeded(69.0, 70.0, 71.0)
    row = seeded(68.7, 69.6, 70.8)
    v = verdict(-1.6, row, base, "linear")
    assert (v.kind, round(v.paired, 3), round(v.unpaired, 2)) == (Kind.REPRODUCES, 0.115, 1.68)
    assert str(v) == "reproduces (±0.1 paired, ±1.7 unpaired)"
    # the same values in other seeds than the baseline's: nothing to pair, the unpaired band decides
    assert str(verdict(-1.6, seeded(68.7, 69.6, 70.8, seeds=[5, 6, 7]), base, "linear")) == "within noise (±1.7)"
    # anti-correlated seeds: pairing widens the band rather than hiding it
    assert verdict(-1.6, seeded(71.7, 69.6, 67.8), base, "linear").kind == Kind.WITHIN_NOISE


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
    from replicate.report.render import rerun_report
    from replicate.study.profiles import SMOKE

    spec, store, save = smoke_table8_store(tmp_path)

    for seed, (a, b) in enumerate([(80.0, 78.0), (81.0, 78.5), (80.5, 77.5)]):
        save("with_pred", seed, a)
        save("no_pred", seed, b, epochs=999)  # made with another profile: stale, not shown
    text = rerun_report(SMOKE, tmp_path)
    assert "| table8 | w/ pred. MLP | 80.5 ± 0.5 (n=3) linear |  |  | reference | — |" in text
    assert "w/o pred" not in text and "table8 (1 of 2: no_pred)" in text
    for seed, b in enumerate([78.0, 78.5, 77.5]):
        save("no_pred", seed, b)
    line = next(ln for ln in rerun_report(SMOKE, tmp_path).splitlines() if "w/o pred" in ln)
    assert "| -2.5 | -1.0 | reproduces" in line and "table8 (" not in rerun_report(SMOKE, tmp_path)


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


def test_render_defaults_to_the_last_runs_folder_and_only_tables_with_results(tmp_path, monkeypatch, capsys):
    """After a run into some folder, `python -m replicate.render` with no option shows that run's tables (and the
    other profiles there with results), never the empty ones; `--results` given once is enough."""
    from replicate.report.render import main
    from replicate.study.results import remember_run

    monkeypatch.setenv("REPLICATE_LAST_RUN", str(tmp_path / "last-run.json"))
    spec, store, save = smoke_table8_store(tmp_path / "mine")
    save("with_pred", 0, 80.0)
    reduced = ResultStore(tmp_path / "mine", "reduced")
    reduced.save("05_position_embedding", "sincos", 0, {"status": "ok", "metrics": {"linear": 70.0}})
    remember_run(tmp_path / "mine", "smoke", "table8")
    assert main([]) == 0
    out, err = capsys.readouterr()
    headings = [ln for ln in out.splitlines() if ln.startswith("## ")]
    assert headings == ["## table5: Position embedding", "## table8: Prediction head"]  # the last run's last
    assert "profile: **smoke**" in out.split("## table8")[1]
    assert f"rendered from {tmp_path / 'mine'} (the folder the last run used" in err
    assert (tmp_path / "mine" / "smoke" / f"{spec.key}.md").exists()
    assert main(["--profile", "paper"]) == 1  # nothing there: one line saying so, no 15 empty tables
    out, err = capsys.readouterr()
    assert out == "" and "no results for profile paper" in err and "replicate run table5 --profile smoke" in err
    assert main(["--profile", "smoke", "--all"]) == 0
    assert capsys.readouterr().out.count("\n## ") == 14  # every study, on request


def test_list_prints_the_names_run_takes_in_aligned_columns(capsys):
    from replicate.__main__ import main
    from replicate.study.spec import all_specs

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["study", "title", "paper"]
    body = [ln for ln in lines[2:] if ln.strip()]
    assert [ln.split()[0] for ln in body] == [s.name for s in all_specs()] and body[4].startswith("table5 ")
    title_col = lines[0].index("title")
    assert all(ln[title_col - 1] == " " and ln[title_col] != " " for ln in body)  # one column start for every title


def test_the_notes_say_the_runs_own_setting(tmp_path):
    spec = load_spec(find_spec("table5"))
    text = render_table(spec, ResultStore(tmp_path, "reduced"))
    assert "At the reduced profile" in text and "96 wide x 4 blocks" in text and "batch 128" in text
    assert "Notes: ViT-B/16, 300 epochs, batch 4096" in text  # the paper's, from the spec, still there
    # a fine-tuning study's reference from scratch trains with its fine-tuning recipe only: no pretraining batch
    text = render_table(load_spec(find_spec("table15")), ResultStore(tmp_path, "reduced"))
    assert "patch 10, trained from scratch: batch 32, 20 epochs, peak lr 0.005, AdamW" in text
    assert "batch 128" not in text


def test_grad_figure_shows_every_row_and_knn_legend_names_the_faint_lines(tmp_path, monkeypatch):
    import replicate.report.figures as figures

    spec = load_spec(find_spec("table5"))
    curves = {"knn_steps": [10, 20], "knn_acc": [50.0, 60.0],
              "series": {"grad_first_rel": [0.1, 0.2, 0.1], "grad_last_rel": [0.01, 0.02, 0.01]}}
    records = {r.name: [{"status": "ok", "seed": s, "curves": curves} for s in (0, 1)] for r in spec.rows}
    assert [row.name for row, _, _ in figures._grad_rows(spec, records)] == ["sincos", "learned", "none"]
    legends = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: legends.append(
        [t.get_text() for ax in fig.axes for t in (ax.get_legend().get_texts() if ax.get_legend() else [])]))
    assert figures.plot_knn(spec, records, tmp_path / "knn.png")
    assert any("other seeds (faint" in t for t in legends[0])
