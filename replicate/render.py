"""Render the studies as markdown: the paper's numbers beside ours, the deltas, and whether the effect reproduces.

``python -m replicate.render [--profile P] [--results DIR]`` writes ``<results>/<profile>/tableN.md`` for every
table with results, and prints every table (ours as "—" where not run).

Verdict (per row, against its baseline row: the spec's reference, or the row named by ``vs``):
  noise = 2 * sqrt(s_row^2 / n_row + s_base^2 / n_base), the two-standard-error band of our delta over seeds;
  "reproduces"   our delta has the paper's sign and exceeds the noise;
  "within noise" |our delta| <= noise (no effect resolved at this scale and seed count);
  "opposite"     our delta has the other sign and exceeds the noise;
  "? (1 seed)"   fewer than two seeds on either side: no noise estimate, no verdict.
The paper's own run-to-run variation is 0.1-0.3 points (Sec. 4.1); a paper delta inside 0.3 is marked "(small)".
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import Counter
from pathlib import Path

from tabulate import tabulate

from .atomic import atomic_write_text
from .profiles import PROFILES, get_profile
from .results import ResultStore
from .spec import Row, Spec, all_specs

PAPER_NOISE = 0.3
DASH = "—"


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def paper_value(spec: Spec, row: Row) -> float | None:
    """A row's paper number; for transfer rows the mean over targets known for both row and reference."""
    if isinstance(row.paper, dict):
        return None
    return row.paper


def paper_delta(spec: Spec, row: Row) -> float | None:
    base = spec.baseline_of(row)
    if isinstance(row.paper, dict) and isinstance(base.paper, dict):
        both = [k for k in row.paper if row.paper.get(k) is not None and base.paper.get(k) is not None]
        return statistics.mean(row.paper[k] - base.paper[k] for k in both) if both else None
    if row.paper is None or base.paper is None:
        return None
    return row.paper - base.paper


class RowStats:
    """Our numbers for one row: per-metric values over seeds, and divergence."""

    def __init__(self, records: list[dict]):
        self.records = records
        self.ok = [r for r in records if r.get("status") == "ok"]
        self.diverged = [r for r in records if r.get("status") == "diverged"]

    def values(self, metric: str) -> list[float]:
        return [r["metrics"][metric] for r in self.ok if r.get("metrics", {}).get(metric) is not None]

    def mean(self, metric: str) -> float | None:
        v = self.values(metric)
        return statistics.mean(v) if v else None

    def std(self, metric: str) -> float | None:
        v = self.values(metric)
        return statistics.stdev(v) if len(v) > 1 else None

    def cell(self, metric: str) -> str:
        v = self.values(metric)
        if not v:
            if self.diverged:
                return "diverged @" + ",".join(str(r.get("diverged_at")) for r in self.diverged)
            return DASH
        s = f"{statistics.mean(v):.1f}"
        if len(v) > 1:
            s += f" ± {statistics.stdev(v):.1f}"
        s += f" (n={len(v)})"
        if self.diverged:
            s += f", {len(self.diverged)} diverged"
        return s


def verdict(paper_d: float | None, ours: RowStats, base: RowStats, metric: str) -> str:
    if paper_d is None:
        return "n/a (no paper Δ)"
    m_r, m_b = ours.mean(metric), base.mean(metric)
    if m_r is None or m_b is None:
        return DASH
    n_r, n_b = len(ours.values(metric)), len(base.values(metric))
    if n_r < 2 or n_b < 2:
        return "? (1 seed)"
    noise = 2 * math.sqrt(ours.std(metric) ** 2 / n_r + base.std(metric) ** 2 / n_b)
    d = m_r - m_b
    small = " (paper Δ small)" if abs(paper_d) <= PAPER_NOISE else ""
    if abs(d) <= noise:
        return f"within noise (±{noise:.1f}){small}"
    if paper_d == 0 or (d > 0) == (paper_d > 0):
        return f"reproduces (±{noise:.1f}){small}"
    return f"opposite (±{noise:.1f}){small}"


def metric_keys(spec: Spec, records: dict[str, list[dict]], profile: str) -> list[str]:
    """Primary metric first (the paper's), then any other metric our results carry."""
    if spec.kind == "transfer":
        return list(get_profile(profile).transfer_targets)
    found = []
    for recs in records.values():
        for r in recs:
            for k in (r.get("metrics") or {}):
                if k not in found:
                    found.append(k)
    primary = spec.metric if spec.metric in found or not found else found[0]
    return [primary] + [k for k in found if k != primary]


def _delta(ours: RowStats, base: RowStats, metric: str) -> float | None:
    a, b = ours.mean(metric), base.mean(metric)
    return None if a is None or b is None else a - b


def render_table(spec: Spec, store: ResultStore, write: bool = False) -> str:
    records = store.table_records(spec.key)
    metrics = metric_keys(spec, records, store.profile)
    stats = {r.name: RowStats(records.get(r.name, [])) for r in spec.rows}
    transfer = spec.kind == "transfer"
    rows_out = []
    for row in spec.rows:
        ours, base = stats[row.name], stats[spec.baseline_of(row).name]
        is_base = row.name == spec.baseline_of(row).name
        pd = paper_delta(spec, row)
        if transfer:
            paper_cells = [_fmt(row.paper.get(t)) if isinstance(row.paper, dict) else "n/a"
                           for t in spec.paper_targets]
            our_cells = [ours.cell(m) for m in metrics]
            our_d = _mean_delta(ours, base, metrics)
            v = "reference" if is_base else _transfer_verdict(pd, ours, base, metrics)
            rows_out.append([row.label, *paper_cells, "" if is_base else _fmt(pd, True), *our_cells,
                             "" if is_base else _fmt(our_d, True), v])
        else:
            primary = metrics[0]
            v = "reference" if is_base else verdict(pd, ours, base, primary)
            extra = [ours.cell(m) for m in metrics[1:]]
            rows_out.append([row.label, _fmt(paper_value(spec, row)), "" if is_base else _fmt(pd, True),
                             ours.cell(primary), "" if is_base else _fmt(_delta(ours, base, primary), True), v,
                             *extra, *_instability_cells(ours)])
    if transfer:
        headers = ["row", *[f"paper {t}" for t in spec.paper_targets], "paper Δ", *[f"ours {m}" for m in metrics],
                   "ours Δ", "verdict"]
    else:
        headers = ["row", "paper", "paper Δ", f"ours ({metrics[0]})", "ours Δ", "verdict",
                   *[f"ours ({m})" for m in metrics[1:]], *INSTABILITY_HEADERS]
    lines = [f"## {spec.key}: {spec.title}", "",
             f"*{spec.paper_ref}* · paper metric: {spec.paper_metric} · profile: **{store.profile}**", ""]
    if spec.claim:
        lines += [f"Paper's claim: {spec.claim}", ""]
    lines += [tabulate(rows_out, headers, tablefmt="github", disable_numparse=True), ""]
    lines += _footer(spec, store, transfer, records)
    figures = _figures(spec, store, records) if write and records else []
    lines += figures
    text = "\n".join(lines)
    if write and records:
        atomic_write_text(store.profile_dir / f"{spec.key}.md", text + "\n")
    return text


def _mean_delta(ours: RowStats, base: RowStats, metrics: list[str]) -> float | None:
    ds = [d for d in (_delta(ours, base, m) for m in metrics) if d is not None]
    return statistics.mean(ds) if ds else None


def _transfer_verdict(pd, ours: RowStats, base: RowStats, metrics: list[str]) -> str:
    """Transfer rows: the verdict of the first target with results (targets differ from the paper's)."""
    for m in metrics:
        if ours.values(m) and base.values(m):
            return verdict(pd, ours, base, m) + (f" [{m}]" if len(metrics) > 1 else "")
    return DASH


INSTABILITY_HEADERS: list[str] = ["kNN dips", "max dip", "grad spikes 1st/last", "1st leads by"]


def _instability_cells(ours: RowStats) -> list[str]:
    """The instability columns (replicate/instability.py): kNN-monitor dips (mean over seeds, "k unrec." =
    runs ending below their best), the deepest dip (points), gradient spikes of the first/last layer (mean over
    seeds) and the median lead of first-layer spikes over the last layer's (iterations)."""
    from .instability import aggregate

    agg = aggregate(ours.records)
    if agg is None:
        return [DASH] * len(INSTABILITY_HEADERS)
    dips = f"{agg['n_dips']:.3g}" + (f" ({agg['unrecovered']} unrec.)" if agg["unrecovered"] else "")
    lead = DASH if agg["first_leads_by"] is None else f"{agg['first_leads_by']:+g} it"
    return [dips, f"{agg['max_depth']:.1f}", f"{agg['spikes_first']:.3g} / {agg['spikes_last']:.3g}", lead]


def _figures(spec: Spec, store: ResultStore, records: dict) -> list[str]:
    """The PNG figures under a table (replicate/figures.py), written next to its markdown."""
    from .figures import write_figures

    return write_figures(spec, store, records)


def _precision_line(records: dict) -> list[str]:
    """How the runs shown multiplied (provenance.precision; results written before it was recorded ran in fp32)."""
    counts = Counter(r.get("provenance", {}).get("precision", "fp32") for rs in records.values() for r in rs)
    if not counts:
        return []
    return ["Pretraining precision: " + ", ".join(f"{p} ({n} run{'s' * (n > 1)})" for p, n in sorted(counts.items()))
            + " (README, CPU precision).", ""]


def _footer(spec: Spec, store: ResultStore, transfer: bool, records: dict) -> list[str]:
    lines = _precision_line(records)
    if transfer:
        targets = ", ".join(get_profile(store.profile).transfer_targets)
        lines += [f"Paper Δ: mean over the paper's targets known for both rows. Ours Δ: mean over our targets "
                  f"({targets}). At reduced scale the targets differ from the paper's by design.", ""]
    base = store.load_baselines()
    if base and not transfer:
        px, rb = base["raw_pixels"], base["random_backbone"]
        fmt = ", ".join
        lines += [f"Baselines on the same split ({base['dataset']}, {base['train_images']} train / "
                  f"{base['test_images']} test): raw pixels "
                  + fmt(f"{k} {v:.1f}" for k, v in px.items()) + "; randomly initialised backbone ("
                  + base.get("random_backbone_arch", "") + ") " + fmt(f"{k} {v:.1f}" for k, v in rb.items())
                  + ". Features that do not beat raw pixels say little about the paper's effects.", ""]
    if spec.notes:
        lines += [f"Notes: {spec.notes}", ""]
    lines += ["Verdict: our Δ vs the paper's Δ, with noise = 2·sqrt(s²/n + s_ref²/n_ref) over seeds "
              "(see `replicate/render.py`).", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m replicate.render",
                                description="Write results/<profile>/tableN.md for every table with results and "
                                            "print all tables beside the paper's numbers.")
    p.add_argument("--profile", default="reduced", choices=sorted(PROFILES))
    p.add_argument("--results", default=None, help="results root (default: the repo's results/)")
    p.add_argument("--table", default=None, help="render only this table (tableN)")
    args = p.parse_args(argv)
    from .spec import SpecError, find_spec, load_spec

    store = ResultStore(args.results, args.profile)
    try:
        specs = [load_spec(find_spec(args.table))] if args.table else all_specs()
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.results and not Path(args.results).is_dir():
        print(f"error: results folder {args.results} does not exist", file=sys.stderr)
        return 2
    out = [render_table(spec, store, write=True) for spec in specs]
    print("\n\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
