"""PNG figures under each rendered table: the kNN monitor curves (paper Figs. 1-3, 5), first- vs last-layer
gradient magnitude (Fig. 4), per-block attention entropy and maximum logit, and the paper's deltas beside ours.

``write_figures(spec, store, records)`` writes ``<results>/<profile>/tableN_{knn,grad,attention,delta}.png`` (those
the results can feed) and returns markdown lines that embed them with links relative to ``tableN.md``.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from replicate.report.stats import RowStats, _delta, _mean_delta, metric_keys, paper_delta, verdict_noise
from replicate.runtime.atomic import atomic_open
from replicate.runtime.instability import knn_dips, n_dips, record_summary
from replicate.study.results import ResultStore
from replicate.study.spec import Spec

DPI = 100


def _save(fig, path: Path) -> None:
    """Write atomically: a reader (or a concurrent render) never sees half a PNG."""
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI)
    finally:
        plt.close(fig)


def _with_curves(recs: list[dict]) -> list[dict]:
    return sorted((r for r in recs if r.get("curves")), key=lambda r: r.get("seed", 0))


def _iters_per_epoch(rec: dict) -> float | None:
    epochs = (rec.get("config") or {}).get("epochs")
    return rec["iterations"] / epochs if rec.get("iterations") and epochs else None


def _by_epoch(recs: list[dict]) -> bool:
    """Whether runs with different iterations per epoch (batch-size studies) are drawn against epochs, as the
    paper's Fig. 1, so they line up."""
    ipes = {_iters_per_epoch(r) for r in recs}
    return len(ipes) > 1 and None not in ipes


def plot_knn(spec: Spec, records: dict[str, list[dict]], path: Path) -> bool:
    """kNN monitor accuracy vs iteration for every row: lowest seed solid, other seeds faint, dips marked.

    Rows with different iterations per epoch are drawn against epochs instead (``_by_epoch``)."""
    rows = [(row, _with_curves(records.get(row.name, []))) for row in spec.rows]
    rows = [(row, recs) for row, recs in rows if recs and recs[0]["curves"].get("knn_steps")]
    if not rows:
        return False
    by_epoch = _by_epoch([r for _, recs in rows for r in recs])
    fig, ax = plt.subplots(figsize=(9, 4.2), layout="constrained")
    colors = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20").colors
    for i, (row, recs) in enumerate(rows):
        color = colors[i % len(colors)]
        is_ref = row.name == spec.reference
        for j, rec in enumerate(recs):
            c = rec["curves"]
            scale = 1 / _iters_per_epoch(rec) if by_epoch else 1
            xs = [s * scale for s in c["knn_steps"]]
            label = row.label + (" (reference)" if is_ref else "") if j == 0 else None
            ax.plot(xs, c["knn_acc"], color=color, lw=2.0 if is_ref else 1.2, alpha=1.0 if j == 0 else 0.3,
                    label=label, marker="." if len(xs) < 30 else None)
            if j == 0:
                dips = knn_dips(rec)
                bottoms = [d["bottom"] for d in dips]
                ys = [c["knn_acc"][c["knn_steps"].index(b)] for b in bottoms if b in c["knn_steps"]]
                ax.plot([b * scale for b in bottoms], ys, "v", color=color, ms=7, mec="black", mew=0.5)
                if rec.get("status") == "diverged":
                    ax.plot(xs[-1:], c["knn_acc"][-1:], "X", color=color, ms=9, mec="black")
    ax.set_xlabel("epoch" if by_epoch else "iteration")
    ax.set_ylabel("kNN monitor accuracy (%)")
    ax.set_title(f"{spec.name}: kNN monitor during pretraining (▼ detected dip, X diverged)", fontsize=10)
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if any(len(recs) > 1 for _, recs in rows):  # the faint lines: one legend entry for all of them

        low = min(r.get("seed", 0) for _, recs in rows for r in recs)
        handles.append(Line2D([], [], color="gray", lw=1.2, alpha=0.3,
                              label=f"other seeds (faint, the row's colour; solid: seed {low})"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _save(fig, path)
    return True


def _grad_rows(spec: Spec, records: dict[str, list[dict]]) -> list[tuple]:
    """Every row with gradient traces (its lowest seed): the reference first, then the others by their gradient
    spikes, most first (Fig. 4 compares a stable run with a spiking one)."""
    found = []
    for row in spec.rows:
        recs = _with_curves(records.get(row.name, []))
        if recs and recs[0]["curves"].get("series", {}).get("grad_first_rel"):
            s = (record_summary(recs[0]) or {}).get("grad", {})
            spikes = s.get("first", {}).get("n_spikes", 0) + s.get("last", {}).get("n_spikes", 0)
            found.append((row, recs[0], spikes))
    ref = [f for f in found if f[0].name == spec.reference]
    others = sorted((f for f in found if f[0].name != spec.reference), key=lambda f: -f[2])  # stable: spec order
    return ref + others


def plot_grad(spec: Spec, records: dict[str, list[dict]], path: Path) -> bool:
    """Relative gradient inf-norm of the first and the last layer vs iteration, with detected spike onsets."""
    chosen = _grad_rows(spec, records)
    if not chosen:
        return False
    fig, axes = plt.subplots(len(chosen), 1, figsize=(9, 2.2 * len(chosen) + 0.6), squeeze=False, sharex=True,
                             layout="constrained")
    for ax, (row, rec, _) in zip(axes[:, 0], chosen):
        series, grad = rec["curves"]["series"], (record_summary(rec) or {}).get("grad", {})
        for key, layer, color in (("grad_first_rel", "first", "tab:red"), ("grad_last_rel", "last", "tab:blue")):
            g = series[key]
            onsets = grad.get(layer, {}).get("onsets", [])
            ax.plot(range(len(g)), g, color=color, lw=0.9, alpha=0.85,
                    label=f"{layer} layer ({len(onsets)} spike{'s' if len(onsets) != 1 else ''})")
            ax.plot(onsets, [g[t] for t in onsets], "o", color=color, ms=5, mfc="none")
        if all(v > 0 for k in ("grad_first_rel", "grad_last_rel") for v in series[k]):
            ax.set_yscale("log")  # spikes are multiplicative; log shows both layers on one axis
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # plain 0.1, 0.2, 0.5, 1 labels
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(axis="y", which="both", labelsize=7)
        lead = grad.get("first_leads_by")
        lead_txt = f"; first layer leads by {lead:g} it" if lead is not None else ""
        ax.set_title(f"{row.label} (seed {rec.get('seed', 0)}){lead_txt}", fontsize=9)
        ax.set_ylabel("|grad|∞ / |w|∞", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes[-1, 0].set_xlabel("iteration")
    fig.suptitle(f"{spec.name}: relative gradient magnitude, first vs last layer (○ spike onset)", fontsize=10)
    _save(fig, path)
    return True


def _attention_rows(spec: Spec, records: dict[str, list[dict]]) -> list[tuple]:
    """(row, record) for every row with attention diagnostics, in the gradient figure's order: its seed with the
    most kNN dips, the lowest seed on a tie."""

    chosen = []
    for row, _, _ in _grad_rows(spec, records):
        recs = [r for r in _with_curves(records.get(row.name, [])) if r["curves"].get("attn_entropy")]
        if recs:
            chosen.append((row, max(recs, key=n_dips)))  # max keeps the first (lowest seed) on a tie
    return chosen


def plot_attention(spec: Spec, records: dict[str, list[dict]], path: Path) -> bool:
    """Per block, the held-out monitor's mean attention entropy (left) and maximum attention logit (right) vs
    iteration, one row of panels per study row (in the gradient figure's order), that seed's kNN dips shaded. Each
    row shows its seed with the most dips (the lowest on a tie): entropy collapse and growing logits are the
    small-scale signatures of attention instability (Zhai et al. 2023; Wortsman et al. 2023), so the panels show
    whether and in which block a dip coincides with one."""

    chosen = _attention_rows(spec, records)
    if not chosen:
        return False
    fig, axes = plt.subplots(len(chosen), 2, figsize=(10, 2.0 * len(chosen) + 0.7), squeeze=False, sharex=True,
                             layout="constrained")
    by_epoch = _by_epoch([rec for _, rec in chosen])
    for (ax_e, ax_l), (row, rec) in zip(axes, chosen):
        c = rec["curves"]
        scale = 1 / _iters_per_epoch(rec) if by_epoch else 1
        # a resume from before the diagnostics: they cover the later steps
        steps = [t * scale for t in c["knn_steps"][-len(c["attn_entropy"]):]]
        blocks = len(c["attn_entropy"][0])
        colors = plt.get_cmap("viridis")([i / max(blocks - 1, 1) for i in range(blocks)])
        dips = knn_dips(rec)
        for ax, key in ((ax_e, "attn_entropy"), (ax_l, "attn_max_logit")):
            for b in range(blocks):
                ax.plot(steps, [v[b] for v in c[key]], color=colors[b], lw=1.0, label=f"block {b + 1}")
            for d in dips:
                ax.axvspan(d["from"] * scale, d["recovered"] * scale, color="tab:red", alpha=0.12, lw=0)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        ax_e.set_ylabel("entropy (nats)", fontsize=8)
        ax_l.set_ylabel("max logit", fontsize=8)
        ax_e.set_title(f"{row.label} (seed {rec.get('seed', 0)})", fontsize=9, loc="left")
    axes[0, 1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    for ax in axes[-1]:
        ax.set_xlabel("epoch" if by_epoch else "iteration")
    fig.suptitle(f"{spec.name}: attention entropy and maximum logit per block on the held-out monitor "
                 "(shaded: a detected kNN dip)", fontsize=10)
    _save(fig, path)
    return True


def plot_deltas(spec: Spec, store: ResultStore, records: dict[str, list[dict]], path: Path,
                targets: tuple[str, ...] | None = None) -> bool:
    """Paper Δ beside ours Δ (vs each row's baseline), one pair of bars per compared row."""
    metrics = metric_keys(spec, records, targets)
    stats = {r.name: RowStats(records.get(r.name, [])) for r in spec.rows}
    labels, paper, ours, errs = [], [], [], []
    for row in spec.rows:
        if spec.is_baseline(row):
            continue
        base = spec.baseline_of(row)
        o, b = stats[row.name], stats[base.name]
        d = _mean_delta(o, b, metrics) if spec.kind == "transfer" else _delta(o, b, metrics[0])
        pd = paper_delta(spec, row)
        if d is None:  # not run (yet): nothing of ours to compare
            continue
        noise = None if spec.kind == "transfer" else verdict_noise(o, b, metrics[0])
        labels.append(row.label)
        paper.append(math.nan if pd is None else pd)
        ours.append(d)
        errs.append(math.nan if noise is None else noise)  # nan: no whisker (fewer than 2 seeds)
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(8.5, 0.45 * len(labels) + 1.4), layout="constrained")
    ys = range(len(labels))
    ax.barh([y - 0.2 for y in ys], paper, height=0.38, color="tab:gray", label="paper Δ")
    what = "mean over targets" if spec.kind == "transfer" else metrics[0]
    has_err = not all(math.isnan(e) for e in errs)
    ax.barh([y + 0.2 for y in ys], ours, height=0.38, color="tab:orange", xerr=errs if has_err else None,
            capsize=2, label=f"ours Δ ({what}{'; whisker: 2 s.e., paired by seed' if has_err else ''})")
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("Δ vs baseline row (points)")
    ax.set_title(f"{spec.name}: paper Δ vs ours Δ ({store.profile} profile)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)
    return True


def write_figures(spec: Spec, store: ResultStore, records: dict[str, list[dict]],
                  targets: tuple[str, ...] | None = None) -> list[str]:
    """Write the table's figures next to its markdown; return the lines that embed them."""
    out_dir = store.profile_dir
    made = []
    for suffix, caption, plot in (
        ("knn", "kNN monitor accuracy during pretraining", lambda p: plot_knn(spec, records, p)),
        ("grad", "first- vs last-layer relative gradient magnitude", lambda p: plot_grad(spec, records, p)),
        ("attention", "attention entropy and maximum logit per block", lambda p: plot_attention(spec, records, p)),
        ("delta", "paper Δ vs ours Δ", lambda p: plot_deltas(spec, store, records, p, targets)),
    ):
        name = f"{spec.key}_{suffix}.png"
        if plot(out_dir / name):
            made.append(f"![{spec.name}: {caption}]({name})")
    return ["### Figures", "", *[line for m in made for line in (m, "")]] if made else []
