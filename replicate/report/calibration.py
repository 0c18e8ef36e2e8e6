"""The measured blocks of docs/reduced-scale.md: every calibration run so far (``report``, over the records
``python -m tools.calibrate`` writes to ``RUNS_ROOT``) and the instability target on a profile's committed results
(``instability_report``). ``python -m replicate.docs`` writes both into the document."""
from __future__ import annotations

import json
from pathlib import Path

from replicate.runtime.instability import first_lead, n_dips, record_summary, shows_instability
from replicate.study.results import StudyRecords
from replicate.study.spec import find_spec

# The calibration runs' results (the store's usual layout), committed with the document that quotes them.
RUNS_ROOT = Path(__file__).resolve().parents[2] / "docs" / "reduced-scale" / "runs"


def report() -> str:
    """Every calibration run so far, one line each (the table docs/reduced-scale.md quotes)."""

    lines = ["| candidate | row | seed | iterations | pretrain min | linear | kNN | dips | max depth | "
             "spikes first/last | first leads by |", "|" + "---|" * 11]
    for f in sorted(RUNS_ROOT.glob("cal-*/*/*/seed*.json")):
        rec = json.loads(f.read_text())
        s = record_summary(rec) or {}
        knn, grad = s.get("knn", {}), s.get("grad", {})
        m = rec.get("metrics") or {}
        lines.append(
            f"| {rec['profile'].removeprefix('cal-')} | {rec['table']}:{rec['row']} | {rec['seed']} | "
            f"{rec.get('iterations', '—')} | {rec.get('pretrain_s', 0) / 60:.1f} | "
            f"{m.get('linear', float('nan')):.1f} | {m.get('knn', float('nan')):.1f} | {knn.get('n_dips', '—')} | "
            f"{knn.get('max_depth', '—')} | {grad.get('first', {}).get('n_spikes', '—')}/"
            f"{grad.get('last', {}).get('n_spikes', '—')} | {grad.get('first_leads_by', '—')} |")
    return "\n".join(lines)


# The instability target's rows (issue #17, docs/reduced-scale.md "Criteria"): where the paper's curves dip, and the
# rows the criteria name as stable, whose every detected dip is a false positive of the detector at this scale.
PAPER_UNSTABLE = ("table1:bs4096", "table1:bs6144", "table2:lr1.5e-4", "table4:mocov3_lr1.5e-4_learned",
                  "table3:lr6e-4", "table3:lr8e-4")
PAPER_STABLE = ("table1:bs1024", "table1:bs2048", "table2:lr0.5e-4", "table4:mocov3_lr0.5e-4_random",
                "table4:mocov3_lr1.0e-4_random")
TWINS = (("table4:mocov3_lr0.5e-4_random", "table4:mocov3_lr0.5e-4_learned"),
         ("table4:mocov3_lr1.0e-4_random", "table4:mocov3_lr1.0e-4_learned"),
         ("table4:mocov3_lr1.5e-4_random", "table4:mocov3_lr1.5e-4_learned"))


def current_records(ref: str, studies: dict[str, StudyRecords]) -> list[dict]:
    """The finished seed records (``ok`` or ``diverged``) of ``ref`` ('table1:bs4096') made with the config the spec
    resolves to now (stale ones left out), by seed; ``studies``: every study's runs (``read_studies``)."""
    table, _, name = ref.partition(":")
    study = studies[find_spec(table).stem]
    return study.current_finished(study.spec.row(name))


def _dips_text(dips: list) -> str:
    """A row's dips summed over its seeds, and its diverged seeds (``dips`` holds "diverged" for those)."""
    diverged = dips.count("diverged")
    return f"{sum(d for d in dips if d != 'diverged')} dips" + (f", {diverged} diverged" if diverged else "")


def instability_report(studies: dict[str, StudyRecords]) -> str:
    """The instability target measured on a profile's results (``studies``: every study's runs, read once): kNN dips
    per seed in the paper's unstable and stable rows, the detector's false-positive rate (stable row-seeds with a
    dip), the first layer's lead, and the random vs learned patch-projection twins."""

    def cells(ref: str):
        recs = current_records(ref, studies)
        dips = [n_dips(r) if r.get("status") == "ok" else "diverged" for r in recs]
        depth = max(((record_summary(r) or {}).get("knn", {}).get("max_depth", 0.0) for r in recs), default=0.0)
        return recs, dips, depth, [first_lead(r) for r in recs], sum(map(shows_instability, recs))

    lines = ["| paper | row | seeds | dips per seed | deepest | seeds showing it (dip, open drop, divergence) | "
             "first layer leads by (iterations, per seed) |",
             "|---|---|---|---|---|---|---|"]
    stable_hits = stable_runs = unstable_ok = unstable_rows = 0
    for kind, refs in (("unstable", PAPER_UNSTABLE), ("stable", PAPER_STABLE)):
        for ref in refs:
            recs, dips, depth, leads, shown = cells(ref)
            if not recs:
                lines.append(f"| {kind} | {ref} | 0 | not run yet | | | |")
                continue
            hit = sum(d != 0 for d in dips)  # a divergence counts with the dips
            if kind == "stable":
                stable_hits, stable_runs = stable_hits + hit, stable_runs + len(recs)
            else:
                unstable_rows += 1
                unstable_ok += shown >= 2
            lead = ", ".join("—" if v is None else f"{v:g}" for v in leads)
            lines.append(f"| {kind} | {ref} | {len(recs)} | {', '.join(map(str, dips))} | {depth:.1f} | "
                         f"{shown} of {len(recs)} | {lead} |")
    lines.append("")
    if stable_runs:
        lines.append(f"False positives (a dip in a paper-stable row): {stable_hits} of {stable_runs} runs "
                     f"({100 * stable_hits / stable_runs:.0f}%).")
    if unstable_rows:
        lines.append(f"Paper-unstable rows showing it (a dip, an open drop or a divergence) in >= 2 of their seeds: "
                     f"{unstable_ok} of {unstable_rows}.")
    for rand, learned in TWINS:
        r, lr = cells(rand), cells(learned)
        if r[0] and lr[0]:
            lines.append(f"Twins {rand.split(':')[1].removesuffix('_random')}: random {_dips_text(r[1])}, "
                         f"learned {_dips_text(lr[1])} ({len(r[0])} / {len(lr[0])} seeds).")
    return "\n".join(lines)
