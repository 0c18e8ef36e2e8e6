"""Per-row statistics shared by the renderer (``render.py``) and the figures (``figures.py``).

Our numbers for a row over seeds (``RowStats``), the paper's delta of a row against its baseline (``paper_delta``),
our delta (``_delta``, ``_mean_delta``) and which metrics a table shows (``metric_keys``). Kept apart so that
``render`` and ``figures`` both import it and neither imports the other at module level.
"""
from __future__ import annotations

import math
import statistics

from replicate.study.spec import Row, Spec

DASH = "—"


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

    def by_seed(self, metric: str) -> dict[int, float]:
        return {r.get("seed", 0): r["metrics"][metric] for r in self.ok
                if r.get("metrics", {}).get(metric) is not None}

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


def metric_keys(spec: Spec, records: dict[str, list[dict]], targets: tuple[str, ...] | None = None) -> list[str]:
    """Primary metric first (the paper's), then any other metric our results carry. A transfer study's metrics are
    its profile's ``targets`` (None for a profile not known here: the targets its results carry)."""
    if spec.kind == "transfer" and targets is not None:
        return list(targets)
    found = []
    for recs in records.values():
        for r in recs:
            for k in (r.get("metrics") or {}):
                if k not in found:
                    found.append(k)
    primary = spec.metric if spec.metric in found or not found else found[0]
    return [primary] + [k for k in found if k != primary]


def unpaired_noise(ours: RowStats, base: RowStats, metric: str) -> float | None:
    """Two standard errors of our delta over seeds, the rows taken as independent samples:
    2 * sqrt(s_row^2 / n_row + s_base^2 / n_base). None with fewer than two seeds on either side."""
    s_r, s_b = ours.std(metric), base.std(metric)
    if s_r is None or s_b is None:
        return None
    return 2 * math.sqrt(s_r ** 2 / len(ours.values(metric)) + s_b ** 2 / len(base.values(metric)))


def paired_noise(ours: RowStats, base: RowStats, metric: str) -> float | None:
    """Two standard errors of our delta with the rows paired by seed: 2 * sd(d_s) / sqrt(n) over the n seeds both
    rows ran, d_s = row - baseline in seed s. Rows of a study with one seed share that seed's data order,
    augmentation draws and, where shapes match, initial weights, so what the seed does to both cancels in d_s.
    None with fewer than two common seeds."""
    a, b = ours.by_seed(metric), base.by_seed(metric)
    d = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    return 2 * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None


def verdict_noise(ours: RowStats, base: RowStats, metric: str) -> float | None:
    """The band the verdict uses: paired where two seeds are common, else unpaired."""
    paired = paired_noise(ours, base, metric)
    return unpaired_noise(ours, base, metric) if paired is None else paired


def _delta(ours: RowStats, base: RowStats, metric: str) -> float | None:
    a, b = ours.mean(metric), base.mean(metric)
    return None if a is None or b is None else a - b


def _mean_delta(ours: RowStats, base: RowStats, metrics: list[str]) -> float | None:
    ds = [d for d in (_delta(ours, base, m) for m in metrics) if d is not None]
    return statistics.mean(ds) if ds else None
