"""Calibration of the reduced profile: the runs behind ``docs/reduced-scale.md``, reproducible by name.

The reduced profile's free scales (model widths, batch scale, epoch scale, lr scale) are chosen by criteria written
in ``docs/reduced-scale.md`` before the runs they affect, on one named row per criterion. Each candidate is a named
variant of one base profile, defined with the profiles (``replicate.study.profiles.CANDIDATES``; ``reduced`` is the
chosen one); ``python -m tools.calibrate run NAME --row table5:sincos`` trains that row
under it (results in ``docs/reduced-scale/runs/``, the store's usual layout, so finished runs are cached and stale
ones re-run), ``estimate NAME`` times the whole suite under it, and ``report`` tabulates every run so far. No
candidate is ever removed: the document keeps every configuration tried, with its numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from replicate.core.model import build_vit
from replicate.report.calibration import RUNS_ROOT, instability_report, report
from replicate.report.render import read_studies
from replicate.report.targets import f3_margins
from replicate.runtime.instability import n_dips, record_summary, shows_instability
from replicate.runtime.monitor import HeldOutKnn
from replicate.study.profiles import CANDIDATES, REDUCED, Profile, calibration_candidate
from replicate.study.runner import run_table
from replicate.study.spec import all_specs, find_spec, load_spec

# Calibration seeds are never reported: the studies' seeds are 0, 1, 2, ...
CALIBRATION_SEEDS = (100, 101)


def candidate(name: str) -> Profile:
    """A named candidate (``replicate.study.profiles.calibration_candidate``); exits with the known names if none."""
    try:
        return calibration_candidate(name)
    except KeyError:
        raise SystemExit(f"error: no calibration candidate {name!r}; known: {', '.join(CANDIDATES)} "
                         "(or <candidate>-lr<N>)") from None


def one_row(ref: str):
    """'table5:sincos' -> that spec, reduced to the one row (its reference)."""

    table, _, row = ref.partition(":")
    spec = load_spec(find_spec(table))
    r = spec.row(row or spec.reference)
    return spec.model_copy(update={"rows": [r], "reference": r.name})


def run(names: list[str], rows: list[str], seeds: list[int], data_root: str | None) -> None:

    for name in names:
        for ref in rows:
            run_table(one_row(ref), candidate(name), seeds=seeds, data_root=data_root, results_root=RUNS_ROOT,
                      progress=True)


def estimate(name: str, steps: int = 3) -> dict:
    """Minutes of one seed of every study under a candidate: each distinct (model, batch) timed for ``steps``
    steps of the trainer's own step, times its iterations; a config shared by several studies is counted once."""
    import torch

    from .bench.suite import suite_throughput

    profile, device = candidate(name), torch.device("cpu")
    speed: dict[tuple, float] = {}
    monitor_s: dict[tuple, float] = {}
    seen: set[str] = set()
    tables = {}
    for spec in all_specs():
        seconds = 0.0
        for row in spec.rows:
            setting = spec.setting(row)
            if spec.kind != "pretrain" and setting.init != "pretrained":  # fine-tuned from scratch: no pretraining
                continue
            cfg = profile.resolve(setting)
            key = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            shape = (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.setting.norm_mlp, cfg.batch_size)
            if shape not in speed:
                speed[shape] = suite_throughput(cfg, device, 1, steps)["step_s"]
                held_out, backbone = HeldOutKnn.for_run(cfg, None, device), build_vit(cfg)
                held_out(backbone)
                t0 = time.perf_counter()
                held_out(backbone)
                monitor_s[shape] = time.perf_counter() - t0
            iters = cfg.epochs * (profile.train_subset // cfg.batch_size)
            monitor = iters // cfg.monitor_every * monitor_s[shape]
            seconds += iters * speed[shape] + monitor + 20  # + features, kNN and the cached linear probe
        tables[spec.name] = round(seconds / 60, 1)
    return {"candidate": name, "table_minutes": tables, "total_hours": round(sum(tables.values()) / 60, 2)}


def _calibration_records(name: str, ref: str) -> list[dict]:
    """Finished records of ``ref`` ('table2:lr1.5e-4') under candidate ``name``, calibration seeds only."""

    table, _, row = ref.partition(":")
    folder = RUNS_ROOT / f"cal-{name}" / find_spec(table).stem / row
    recs = [json.loads(f.read_text()) for f in sorted(folder.glob("seed*.json"))]
    return [r for r in recs if r["seed"] in CALIBRATION_SEEDS]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 2) if values else None


def stage1_report(names: list[str]) -> str:
    """Criterion F3 of docs/reduced-scale.md (stage v3-1) per candidate: the reference row's mean linear / kNN over
    the calibration seeds against the candidate's own raw-pixel and random-backbone baselines."""
    lines = ["| candidate | seeds | linear | kNN | pixels lin / kNN | random lin / kNN | margins (lin-px-10, "
             "kNN-px-5, lin-rnd-5, kNN-rnd-5) | F3 |", "|" + "---|" * 8]
    for name in names:
        recs = [r for r in _calibration_records(name, "table5:sincos") if r.get("status") == "ok"]
        base_file = RUNS_ROOT / f"cal-{name}" / "baselines.json"
        if not recs or not base_file.exists():
            lines.append(f"| {name} | 0 | not run | | | | | |")
            continue
        b = json.loads(base_file.read_text())
        px, rnd = b["raw_pixels"], b["random_backbone"]
        lin, knn = _mean(r["metrics"]["linear"] for r in recs), _mean(r["metrics"]["knn"] for r in recs)
        margins = f3_margins(lin, knn, b)
        lines.append(f"| {name} | {', '.join(str(r['seed']) for r in recs)} | {lin:.1f} | {knn:.1f} | "
                     f"{px['linear']:.1f} / {px['knn']:.1f} | {rnd['linear']:.1f} / {rnd['knn']:.1f} | "
                     f"{', '.join(f'{m:+.1f}' for m in margins)} | {'met' if min(margins) >= 0 else 'missed'} |")
    return "\n".join(lines)


LR_SCALES = (10, 20, 40, 80, 160)  # stage v3-2, ascending


def stage2_report(base: str) -> str:
    """The lr-scale rule of stage v3-2 on candidate ``base``: per scale tried, table 2's learned rows lr1.5e-4 and
    lr0.5e-4 over the calibration seeds, and whether the scale qualifies ((a) and (b) and (c))."""
    lines = ["| lr scale | lr1.5e-4: dips / open drop per seed | linear | lr0.5e-4: dips / open drop per seed | "
             "diverged | (a) | (b) | (c) | qualifies |", "|" + "---|" * 9]
    best_before, tried, qualifying, fallback = None, 0, None, {}  # fallback: scale -> lr1.5e-4 dips where (b), (c)
    for scale in LR_SCALES:
        hi = _calibration_records(f"{base}-lr{scale}", "table2:lr1.5e-4")
        lo = _calibration_records(f"{base}-lr{scale}", "table2:lr0.5e-4")
        if len(hi) < len(CALIBRATION_SEEDS) or len(lo) < len(CALIBRATION_SEEDS):
            lines.append(f"| {scale} | not run (or unfinished) | | | | | | | |")
            continue
        tried += 1

        def cells(recs):

            out = []
            for r in recs:
                knn = (record_summary(r) or {}).get("knn", {})
                out.append(f"{knn.get('n_dips', 0)}/{'yes' if knn.get('unrecovered') else 'no'}")
            return ", ".join(out)

        diverged = [r for r in hi + lo if r.get("status") != "ok"]
        lin = _mean((r.get("metrics") or {}).get("linear") for r in hi)
        past_peak = best_before is not None and lin is not None and lin <= best_before - 0.5
        a = all(shows_instability(r) for r in hi) or past_peak
        b = not any(shows_instability(r) for r in lo)
        c = not diverged
        lines.append(f"| {scale} | {cells(hi)} | {lin} | {cells(lo)} | {len(diverged)} | {a} | {b} | {c} | "
                     f"{'yes' if a and b and c else 'no'} |")
        if lin is not None:
            best_before = lin if best_before is None else max(best_before, lin)
        if a and b and c and qualifying is None:
            qualifying = scale
        if b and c:
            fallback[scale] = sum(map(n_dips, hi))
    lines.append("")
    if qualifying is not None:
        lines.append(f"Chosen: lr scale {qualifying}, the smallest that qualifies.")
    elif tried == len(LR_SCALES):
        # the written fallback: most lr1.5e-4 dips where (b) and (c) hold, the smaller on a tie, else 20
        most = max(fallback.values(), default=None)
        pick = min(k for k, v in fallback.items() if v == most) if fallback else 20
        why = (f"the most lr1.5e-4 dips ({most}) among the scales where (b) and (c) hold, the smaller on a tie"
               if fallback else "no scale where (b) and (c) hold")
        lines.append(f"None of {', '.join(map(str, LR_SCALES))} qualifies; the written fallback chooses lr scale {pick} "
                     f"({why}); the instability criterion is missed.")
    else:
        lines.append("No scale chosen yet: the next scale is run until one qualifies or all have run.")
    return "\n".join(lines)


def figure(row: str, out: Path) -> Path:
    """The held-out kNN monitor of every calibration run of ``row`` ('05_position_embedding:sincos'), against
    training images seen (so runs of different batch sizes line up), one curve per candidate and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, _, name = row.partition(":")
    fig, ax = plt.subplots(figsize=(7, 4))
    for f in sorted(RUNS_ROOT.glob(f"cal-*/{table}/{name}/seed*.json")):
        rec = json.loads(f.read_text())
        curves, batch = rec["curves"], rec["config"]["batch_size"]
        label = f"{rec['profile'].removeprefix('cal-')} s{rec['seed']} (linear {rec['metrics'].get('linear', 0):.1f})"
        ax.plot([(s + 1) * batch / 1000 for s in curves["knn_steps"]], curves["knn_acc"], label=label, lw=1.2)
    ax.set_xlabel("training images seen (thousands)")
    ax.set_ylabel("held-out kNN accuracy (%)")
    ax.set_title(f"{row}: dense held-out kNN monitor per candidate", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.calibrate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train rows under candidates (cached like any result)")
    r.add_argument("names", nargs="+", help=f"candidates: {', '.join(CANDIDATES)}, or <candidate>-lr<N>")
    r.add_argument("--row", action="append", default=None, metavar="TABLE:ROW",
                   help="row(s) to train, e.g. table5:sincos (default: table5:sincos, the Sec. 6 reference)")
    r.add_argument("--seed", type=int, action="append", default=None, metavar="K",
                   help=f"seed(s) to run (default: the calibration seeds {', '.join(map(str, CALIBRATION_SEEDS))}, "
                        "never reported; repeat the flag for several)")
    r.add_argument("--data-root", default=None)
    e = sub.add_parser("estimate", help="time the whole suite (one seed) under candidates")
    e.add_argument("names", nargs="+")
    sub.add_parser("report", help="print every calibration run so far")
    s1 = sub.add_parser("stage1", help="criterion F3 (reduced scale v3, stage 1) per candidate")
    s1.add_argument("names", nargs="+")
    s2 = sub.add_parser("stage2", help="the lr-scale rule (reduced scale v3, stage 2) of one stage-1 candidate")
    s2.add_argument("base")
    sub.add_parser("instability", help="the instability target on the committed reduced results: dips in the "
                                       "paper's unstable and stable rows, false-positive rate, twins")
    f = sub.add_parser("figure", help="plot the kNN monitor of every run of one row")
    f.add_argument("row", help="spec key and row, e.g. 05_position_embedding:sincos")
    f.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.command == "run":
        run(args.names, args.row or ["table5:sincos"], args.seed or list(CALIBRATION_SEEDS), args.data_root)
    elif args.command == "estimate":
        for name in args.names:
            t0 = time.perf_counter()
            out = estimate(name)
            out["estimate_s"] = round(time.perf_counter() - t0)
            print(json.dumps(out))
            (RUNS_ROOT / f"estimate-{name}.json").parent.mkdir(parents=True, exist_ok=True)
            (RUNS_ROOT / f"estimate-{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    elif args.command == "figure":
        print(figure(args.row, args.out))
    elif args.command == "stage1":
        print(stage1_report(args.names))
    elif args.command == "stage2":
        print(stage2_report(args.base))
    elif args.command == "instability":
        print(instability_report(read_studies(REDUCED)))
    else:
        print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
