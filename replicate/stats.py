"""Per-row statistics shared by the renderer (``render.py``) and the figures (``figures.py``).

Our numbers for a row over seeds (``RowStats``), the paper's delta of a row against its baseline (``paper_delta``),
our delta (``_delta``, ``_mean_delta``) and which metrics a table shows (``metric_keys``). Kept apart so that
``render`` and ``figures`` both import it and neither imports the other at module level.
"""
from __future__ import annotations

import statistics

from .profiles import get_profile
from .spec import Row, Spec

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


def _mean_delta(ours: RowStats, base: RowStats, metrics: list[str]) -> float | None:
    ds = [d for d in (_delta(ours, base, m) for m in metrics) if d is not None]
    return statistics.mean(ds) if ds else None
