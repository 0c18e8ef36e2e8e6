"""Render the studies as markdown: the paper's numbers beside ours, the deltas, and whether the effect reproduces.

``python -m replicate.render [--profile P] [--results DIR]`` writes ``<results>/<profile>/<spec name>.md`` for
every study with results, and prints those tables (``--all``: every study, ours as "—" where not run). By default it
renders every profile with results in the folder the last ``replicate run`` used (``results.last_run``). Rows whose
stored config is not what the spec resolves to now are marked stale.

Verdict (per row, against its baseline row: the spec's reference, or the row named by ``vs``):
  noise = two standard errors of our delta over seeds, the rows paired by seed (2 * sd(d_s) / sqrt(n), d_s the
  row's value minus the baseline's in seed s, over the seeds both ran); where fewer than two seeds are common,
  unpaired: 2 * sqrt(s_row^2 / n_row + s_base^2 / n_base). The cell shows both bands;
  "reproduces"   our delta has the paper's sign and exceeds the noise;
  "within noise" |our delta| <= noise (no effect resolved at this scale and seed count);
  "opposite"     our delta has the other sign and exceeds the noise;
  "? (1 seed)"   fewer than two seeds on either side: no noise estimate, no verdict.
The paper's own run-to-run variation is 0.1-0.3 points (Sec. 4.1); a paper delta inside 0.3 is marked "(small)".
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

from tabulate import tabulate

from replicate.report.figures import write_figures
from replicate.report.stats import (
    DASH,
    RowStats,
    _delta,
    _mean_delta,
    metric_keys,
    paper_delta,
)
from replicate.report.verdicts import COMPARED, Kind, Verdict, verdict
from replicate.runtime.atomic import WriteError, atomic_write_text
from replicate.runtime.instability import aggregate, record_summary
from replicate.study.finetune_row import e2e_recipe
from replicate.study.profiles import PROFILES, Profile
from replicate.study.results import DEFAULT_ROOT, ResultStore, StudyRecords, UnreadableFile, last_run
from replicate.study.spec import Row, Spec, SpecError, all_specs, find_spec, load_spec


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    x = round(x, 1) + 0.0  # + 0.0 turns a rounded -0.0 into 0.0
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def paper_value(spec: Spec, row: Row) -> float | None:
    """A row's paper number; for transfer rows the mean over targets known for both row and reference."""
    if isinstance(row.paper, dict):
        return None
    return row.paper


def study_records(spec: Spec, store: ResultStore) -> StudyRecords:
    """A study's runs in ``store``, read once, judged current or stale under the store's profile (not judged where
    the profile is not one of ``PROFILES``)."""
    return StudyRecords(spec, store, PROFILES.get(store.profile))


def unreadable_rows(study: StudyRecords, warn: bool = False) -> dict[str, list[str]]:
    """Rows with a result file that cannot be read -> those files' names; ``warn``: one stderr line per file (the
    table marks the row, its other seeds still count, and every other row and study renders as usual)."""
    if warn:
        for errors in study.unreadable.values():
            for e in errors:
                print(f"warning: {e}", file=sys.stderr)
    return {row: [e.path.name for e in errors] for row, errors in study.unreadable.items()}


def render_table(spec: Spec, store: ResultStore, write: bool = False, study: StudyRecords | None = None) -> str:
    """A study's table (``study``: its runs, if already read). Rows show ``StudyRecords.shown()``: once a row's
    re-run has begun only its current runs, else its stale ones, marked stale; unreadable files are left out."""
    study = study or study_records(spec, store)
    records = study.shown()
    unreadable = unreadable_rows(study, warn=True)
    stale = study.stale(records)
    metrics = metric_keys(spec, records, study.targets)
    stats = {r.name: RowStats(records.get(r.name, [])) for r in spec.rows}
    transfer = spec.kind == "transfer"
    monitored = spec.kind == "pretrain"  # fine-tuning rows have no pretraining monitor curves to summarise
    verdicts = {row.name: str(v) for row, v, _ in row_verdicts(spec, records, study.targets)}
    rows_out = []
    for row in spec.rows:
        ours, base = stats[row.name], stats[spec.baseline_of(row).name]
        is_base = spec.is_baseline(row)
        pd = paper_delta(spec, row)
        label = row.label + (" (stale)" if row.name in stale else "") + (
            f" (unreadable: {', '.join(unreadable[row.name])})" if row.name in unreadable else "")
        if transfer:
            paper_cells = [_fmt(row.paper.get(t)) if isinstance(row.paper, dict) else "n/a"
                           for t in spec.paper_targets]
            our_cells = [ours.cell(m) for m in metrics]
            our_d = _mean_delta(ours, base, metrics)
            v = "reference" if is_base else verdicts[row.name]
            rows_out.append([label, *paper_cells, "" if is_base else _fmt(pd, True), *our_cells,
                             "" if is_base else _fmt(our_d, True), v])
        else:
            primary = metrics[0]
            v = "reference" if is_base else verdicts[row.name]
            extra = [ours.cell(m) for m in metrics[1:]]
            rows_out.append([label, _fmt(paper_value(spec, row)), "" if is_base else _fmt(pd, True),
                             ours.cell(primary), "" if is_base else _fmt(_delta(ours, base, primary), True), v,
                             *extra, *(_instability_cells(ours) if monitored else [])])
    if transfer:
        headers = ["row", *[f"paper {t}" for t in spec.paper_targets], "paper Δ", *[f"ours {m}" for m in metrics],
                   "ours Δ", "verdict"]
    else:
        headers = ["row", "paper", "paper Δ", f"ours ({metrics[0]})", "ours Δ", "verdict",
                   *[f"ours ({m})" for m in metrics[1:]], *(INSTABILITY_HEADERS if monitored else [])]
    lines = [f"## {spec.name}: {spec.title}", "",
             f"*{spec.paper_ref}* · paper metric: {spec.paper_metric} · profile: **{store.profile}**", ""]
    if spec.claim:
        lines += [f"Paper's claim: {spec.claim}", ""]
    lines += [tabulate(rows_out, headers, tablefmt="github", disable_numparse=True), ""]
    if stale:
        first = next(iter(stale.values()))
        lines += [f"**Stale** rows ({', '.join(stale)}) were run with a config the spec no longer resolves to "
                  f"(e.g. {first[0]}{' and more' if len(first) > 1 else ''}): `replicate run {spec.name} --profile "
                  f"{store.profile}` re-runs them.", ""]
    if unreadable:
        lines += [f"**Unreadable** result files ({', '.join(f'{r}/{n}' for r, ns in unreadable.items() for n in ns)}) "
                  "are left out of their rows: restore them or re-run those rows with `replicate run`.", ""]
    lines += _footer(spec, store, transfer, records, study.targets)
    figures = _figures(spec, store, records, study.targets) if write and records else []
    lines += figures
    text = "\n".join(lines)
    if write and records:
        atomic_write_text(store.profile_dir / f"{spec.key}.md", text + "\n")
    return text


def _transfer_verdict(pd, ours: RowStats, base: RowStats, metrics: list[str]) -> Verdict:
    """Transfer rows: the verdict of the first target with results (targets differ from the paper's)."""
    for m in metrics:
        if ours.values(m) and base.values(m):
            v = verdict(pd, ours, base, m)
            return replace(v, metric=m) if len(metrics) > 1 else v
    return Verdict(Kind.NOT_RUN)


INSTABILITY_HEADERS: list[str] = ["kNN dips", "max dip", "grad spikes 1st/last", "1st leads by"]


def _instability_cells(ours: RowStats) -> list[str]:
    """The instability columns (replicate/runtime/instability.py): kNN-monitor dips (mean over seeds, "k unrec." =
    runs ending below their best), the deepest dip (points), gradient spikes of the first/last layer (mean over
    seeds) and the median lead of first-layer spikes over the last layer's (iterations)."""

    agg = aggregate(ours.records)
    if agg is None:
        return [DASH] * len(INSTABILITY_HEADERS)
    dips = f"{agg['n_dips']:.3g}" + (f" ({agg['unrecovered']} unrec.)" if agg["unrecovered"] else "")
    lead = DASH if agg["first_leads_by"] is None else f"{agg['first_leads_by']:+g} it"
    return [dips, f"{agg['max_depth']:.1f}", f"{agg['spikes_first']:.3g} / {agg['spikes_last']:.3g}", lead]


def _figures(spec: Spec, store: ResultStore, records: dict, targets: tuple[str, ...] | None) -> list[str]:
    """The PNG figures under a table (replicate/report/figures.py), written next to its markdown."""

    return write_figures(spec, store, records, targets)


def _precision_line(records: dict) -> list[str]:
    """How the runs shown multiplied (provenance.precision; results written before it was recorded ran in fp32)."""
    counts = Counter(r.get("provenance", {}).get("precision", "fp32") for rs in records.values() for r in rs)
    if not counts:
        return []
    return ["Pretraining precision: " + ", ".join(f"{p} ({n} run{'s' * (n > 1)})" for p, n in sorted(counts.items()))
            + " (docs/performance.md, CPU precision).", ""]


def _footer(spec: Spec, store: ResultStore, transfer: bool, records: dict, targets: tuple[str, ...] | None) -> list[str]:
    lines = _precision_line(records)
    if transfer:
        names = ", ".join(metric_keys(spec, records, targets))
        lines += [f"Paper Δ: mean over the paper's targets known for both rows. Ours Δ: mean over our targets "
                  f"({names}). At reduced scale the targets differ from the paper's by design.", ""]
    if spec.kind == "finetune":
        lines += [f"Top-1 after end-to-end fine-tuning on the pretraining data's own labels; each row's recipe at this "
                  f"profile: `replicate show {spec.name} --profile {store.profile}`.", ""]
    try:
        base = store.load_baselines()
    except UnreadableFile as e:
        base = None
        if spec.kind == "pretrain":
            print(f"warning: {e}", file=sys.stderr)
            lines += [f"Baselines: {e.path.name} is unreadable ({e.why}); `replicate run` computes them again.", ""]
    if base and spec.kind == "pretrain":  # frozen-feature baselines: what a pretraining study's metrics mean
        px, rb = base["raw_pixels"], base["random_backbone"]
        fmt = ", ".join
        lines += [f"Baselines on the same split ({base['dataset']}, {base['train_images']} train / "
                  f"{base['test_images']} test): raw pixels "
                  + fmt(f"{k} {v:.1f}" for k, v in px.items()) + "; randomly initialised backbone ("
                  + base.get("random_backbone_arch", "") + ") " + fmt(f"{k} {v:.1f}" for k, v in rb.items())
                  + ". Features that do not beat raw pixels say little about the paper's effects.", ""]
    if spec.notes:
        lines += [f"Notes: {spec.notes}", ""]
    lines += _setting_line(spec, store, records)
    if not transfer and "linear" in metric_keys(spec, records, targets):
        lines += ["Linear: top-1 after the probe's last epoch; `linear_best`, where shown, is its best epoch's (the "
                  "number the official `main_lincls.py` reports).", ""]
    lines += ["Verdict: our Δ vs the paper's Δ, with noise = 2 standard errors of our Δ, the rows paired by seed "
              "(2·sd(d_s)/sqrt(n) over the seeds both ran; unpaired 2·sqrt(s²/n + s_ref²/n_ref) where fewer than two "
              "are common; docs/reading-tables.md, The verdict).", ""]
    return lines


def _setting_line(spec: Spec, store: ResultStore, records: dict) -> list[str]:
    """What this profile made of the study's setting (the spec's notes give the paper's): the data and the
    reference row's resolved sizes, with its iterations as run."""
    if store.profile not in PROFILES or store.profile == "paper":
        return []
    profile = PROFILES[store.profile]
    ref = spec.row(spec.reference)
    cfg = profile.resolve(spec.setting(ref))
    ran = sorted({r["iterations"] for r in records.get(ref.name, []) if r.get("iterations")})
    iters = f" ({'/'.join(map(str, ran))} iterations)" if ran else ""
    data = f"{cfg.dataset}" + (f", {cfg.train_subset} training images" if cfg.train_subset else "")
    training = f"batch {cfg.batch_size}, {cfg.epochs} epochs{iters}, peak lr {cfg.lr:.3g}, {cfg.setting.optimizer}"
    if spec.kind == "finetune":  # what the row trains with is its fine-tuning recipe; from scratch, nothing else
        r = e2e_recipe(cfg.setting, profile)
        tuned = f"batch {r.batch}, {r.epochs} epochs, peak lr {r.lr:.3g}, AdamW (its fine-tuning recipe)"
        training = (f"trained from scratch: {tuned}" if cfg.setting.init == "random"
                    else f"pretrained with {training}, then fine-tuned: {tuned}")
    return [f"At the {store.profile} profile (the paper's setting scaled down): {data}, "
            f"{cfg.image_size} px; the reference row ({ref.label}) is a ViT {cfg.embed_dim} wide x {cfg.depth} blocks "
            f"x {cfg.num_heads} heads, patch {cfg.patch_size}, {training}. Every row's setting: "
            f"`replicate show {spec.name} --profile {store.profile}`.", ""]


def row_verdicts(spec: Spec, records: dict[str, list[dict]],
                 targets: tuple[str, ...] | None) -> list[tuple[Row, Verdict, int]]:
    """Every compared row of a study (baseline rows left out), from ``StudyRecords.shown()``: its verdict as
    ``render_table`` writes it (it takes them from here), and the fewest seeds on either side of the comparison for
    the metric the verdict is taken on (0: not run). ``targets``: the profile's transfer targets (``metric_keys``)."""
    metrics = metric_keys(spec, records, targets)
    stats = {r.name: RowStats(records.get(r.name, [])) for r in spec.rows}
    out = []
    for row in spec.rows:
        if spec.is_baseline(row):
            continue
        base_row = spec.baseline_of(row)
        ours, base, pd = stats[row.name], stats[base_row.name], paper_delta(spec, row)
        if spec.kind == "transfer":
            v = _transfer_verdict(pd, ours, base, metrics)
            used = next((m for m in metrics if ours.values(m) and base.values(m)), metrics[0])
        else:
            used = metrics[0]
            v = verdict(pd, ours, base, used)
        out.append((row, v, min(len(ours.values(used)), len(base.values(used)))))
    return out


def rerun_report(profile: Profile, results: str | Path | None = None,
                 studies: dict[str, StudyRecords] | None = None) -> str:
    """Every row holding results made with the config its spec resolves to now: its number over seeds, our and the
    paper's delta and the verdict (as ``render_table``; only once its baseline row is current too) and the kNN dips
    of each seed; then the rows not yet (re-)run. The per-row view of the README's verdict counts, for
    docs/reduced-scale.md. ``studies``: every study's runs, if already read (``read_studies``)."""
    studies = studies or read_studies(profile, results)
    lines = ["| study | row | ours (seeds) | ours Δ | paper Δ | verdict | kNN dips per seed |",
             "|---|---|---|---|---|---|---|"]
    pending = []
    for study in studies.values():
        spec = study.spec
        records = study.shown()
        stale = study.stale(records)
        current = {r.name for r in spec.rows if records.get(r.name) and r.name not in stale}
        missing = [r.name for r in spec.rows if r.name not in current]
        if missing:
            pending.append(f"{spec.name} ({len(missing)} of {len(spec.rows)}"
                           + (f": {', '.join(missing)})" if current else ")"))
        verdicts = {row.name: str(v) for row, v, _ in row_verdicts(spec, records, profile.transfer_targets)}
        metrics = metric_keys(spec, records, profile.transfer_targets)
        for row in spec.rows:
            if row.name not in current:
                continue
            base_row = spec.baseline_of(row)
            ours, base = RowStats(records[row.name]), RowStats(records.get(base_row.name, []))
            is_base, base_ok = spec.is_baseline(row), base_row.name in current
            if spec.kind == "transfer":
                cell, d = " / ".join(ours.cell(m) for m in metrics), _mean_delta(ours, base, metrics)
            else:
                cell, d = f"{ours.cell(metrics[0])} {metrics[0]}", _delta(ours, base, metrics[0])
            v = "reference" if is_base else verdicts[row.name] if base_ok else f"({base_row.name} not re-run yet)"
            dips = [(record_summary(r) or {}).get("knn", {}).get("n_dips") for r in ours.records]
            dips_cell = DASH if spec.kind != "pretrain" or None in dips else ", ".join(map(str, dips))
            deltas = ["", ""] if is_base else [_fmt(d, True) if base_ok else DASH, _fmt(paper_delta(spec, row), True)]
            lines.append(f"| {spec.name} | {row.label} | {cell} | {' | '.join(deltas)} | {v} | {dips_cell} |")
    if pending:
        lines += ["", "Rows not yet (re-)run with the current profile, per study: " + ", ".join(pending) + "."]
    return "\n".join(lines) + "\n"


def read_studies(profile: Profile, results: str | Path | None = None) -> dict[str, StudyRecords]:
    """Every shipped study's runs under ``profile`` (results root ``results``, default the repository's), read once
    for a command that reports on all of them (the README's counts, docs/reduced-scale.md's blocks)."""
    store = ResultStore(results, profile.name)
    return {spec.key: StudyRecords(spec, store, profile) for spec in all_specs()}


def study_verdicts(study: StudyRecords, profile: Profile) -> tuple[list, Counter]:
    """A study's row verdicts as its rendered table gives them, and their counts by kind (``other``: no verdict)."""
    verdicts = row_verdicts(study.spec, study.shown(), profile.transfer_targets)
    return verdicts, Counter(v.kind if v.kind in COMPARED else "other" for _, v, _ in verdicts)


def verdict_totals(profile: Profile, studies: dict[str, StudyRecords]) -> str:
    """The verdict counts of ``verdict_summary`` summed over every study, in one sentence."""
    total, rows = Counter(), 0
    for study in studies.values():
        verdicts, counts = study_verdicts(study, profile)
        total.update(counts)
        rows += len(verdicts)
    return (f"Over the {rows} compared rows of the {len(studies)} studies at `{profile.name}`: "
            f"{total[Kind.REPRODUCES]} reproduce, {total[Kind.WITHIN_NOISE]} within noise, "
            f"{total[Kind.OPPOSITE]} opposite, {total['other']} without a verdict.\n")


def verdict_summary(profile: Profile, results: str | Path | None = None,
                    studies: dict[str, StudyRecords] | None = None) -> str:
    """One markdown line per study: how many compared rows reproduce the paper's effect, are within noise or go the
    opposite way (the verdicts of ``render_table``), how many have no verdict, and the seeds per row. Links point
    to the rendered tables, relative to the repository root (the README's folder). ``studies``: every study's runs,
    if already read (``read_studies``)."""
    studies = studies or read_studies(profile, results)
    repo = Path(__file__).resolve().parents[2]
    lines = ["| study | title | compared rows | reproduces | within noise | opposite | no verdict | seeds | stale rows |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for study in studies.values():
        spec, store = study.spec, study.store
        records = study.shown()
        verdicts, counts = study_verdicts(study, profile)
        seeds = sorted({n for _, _, n in verdicts if n})
        seeds_cell = DASH if not seeds else str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
        table = store.profile_dir / f"{spec.key}.md"
        try:
            link = f"[{spec.name}]({table.resolve().relative_to(repo).as_posix()})" if table.exists() else spec.name
        except ValueError:  # a results folder outside the repository: no link
            link = spec.name
        stale = len(study.stale(records))
        lines.append(f"| {link} | {spec.title} | {len(verdicts)} | " + " | ".join(
            str(counts[k]) for k in (*COMPARED, "other")) + f" | {seeds_cell} | {stale} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m replicate.render",
                                description="Write <results>/<profile>/<spec name>.md for every study with results "
                                            "and print those tables beside the paper's numbers.")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help=f"one of {', '.join(PROFILES)}. Default: every profile with results in the results folder "
                        "(the last run's profile printed last)")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="results root. Default: the folder the last `replicate run` here used (remembered in "
                        "results/.last-run.json), else the repository's results/")
    p.add_argument("--table", default=None, help="render only this table (tableN), with or without results")
    p.add_argument("--all", action="store_true", help="also print the studies without results (ours as —)")
    args = p.parse_args(argv)

    if args.profile is not None and args.profile not in PROFILES:
        print(f"error: unknown profile {args.profile!r}; choose one of: {', '.join(PROFILES)}", file=sys.stderr)
        return 2
    if args.results and not Path(args.results).is_dir():
        print(f"error: results folder {args.results} does not exist", file=sys.stderr)
        return 2
    last = last_run()
    root, why = ((args.results, "--results") if args.results else
                 (last["results"], "the folder the last run used; --results for another") if last else
                 (DEFAULT_ROOT, "the repository's results"))
    try:
        specs = [load_spec(find_spec(args.table))] if args.table else all_specs()
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chosen = {}
    for profile in [args.profile] if args.profile else list(PROFILES):
        store = ResultStore(root, profile)
        shown = [s for s in specs if args.table or args.all or any(store.scan(s.key))]  # unreadable ones too
        if shown:
            chosen[profile] = (store, shown)
    if not args.profile and last and last.get("profile") in chosen:  # what the user just ran: printed last
        chosen[last["profile"]] = chosen.pop(last["profile"])
    if not chosen:
        what = f"profile {args.profile}" if args.profile else "any profile"
        print(f"no results for {what} under {root} ({why}); run a study first, e.g. "
              "`replicate run table5 --profile smoke` (seconds)", file=sys.stderr)
        return 1
    try:
        out = [render_table(spec, store, write=True) for store, shown in chosen.values() for spec in shown]
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n\n".join(out))
    print(f"rendered from {root} ({why}): " + ", ".join(f"{profile} {len(shown)} table{'s' * (len(shown) > 1)}"
                                                       for profile, (_, shown) in chosen.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
