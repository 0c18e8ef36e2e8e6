"""Verdicts as values: what a row's delta says about the paper's effect (the rule: replicate/report/render.py's
docstring, docs/reading-tables.md), kept as a kind with its noise bands and written out as text only in a table."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from replicate.report.stats import DASH, RowStats, paired_noise, unpaired_noise, verdict_noise

PAPER_NOISE = 0.3  # the paper's own run-to-run variation is 0.1-0.3 points (Sec. 4.1)


class Kind(Enum):
    """The verdict's kind; its value is the text a table shows (followed, for the first three, by the bands)."""
    REPRODUCES = "reproduces"
    WITHIN_NOISE = "within noise"
    OPPOSITE = "opposite"
    NO_PAPER_DELTA = "n/a (no paper Δ)"
    ONE_SEED = "? (1 seed)"  # fewer than two seeds on a side: no noise estimate
    NOT_RUN = DASH


COMPARED = (Kind.REPRODUCES, Kind.WITHIN_NOISE, Kind.OPPOSITE)  # the kinds that judge the effect


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    unpaired: float | None = None  # the noise bands (two standard errors of our delta over seeds)
    paired: float | None = None  # None: fewer than two seeds common to the row and its baseline
    small_paper_delta: bool = False  # |paper Δ| <= PAPER_NOISE
    metric: str | None = None  # the metric it is taken on, where a table shows several (transfer targets)
    delta: float | None = None  # our delta on that metric (row mean minus baseline mean), where both ran

    def __str__(self) -> str:
        text = self.kind.value
        if self.kind in COMPARED:
            band = (f"±{self.unpaired:.1f}" if self.paired is None
                    else f"±{self.paired:.1f} paired, ±{self.unpaired:.1f} unpaired")
            text += f" ({band})" + (" (paper Δ small)" if self.small_paper_delta else "")
        return text + (f" [{self.metric}]" if self.metric else "")


def verdict(paper_d: float | None, ours: RowStats, base: RowStats, metric: str) -> Verdict:
    if paper_d is None:
        return Verdict(Kind.NO_PAPER_DELTA)
    m_r, m_b = ours.mean(metric), base.mean(metric)
    if m_r is None or m_b is None:
        return Verdict(Kind.NOT_RUN)
    unpaired = unpaired_noise(ours, base, metric)
    if unpaired is None:
        return Verdict(Kind.ONE_SEED, delta=m_r - m_b)
    paired, noise = paired_noise(ours, base, metric), verdict_noise(ours, base, metric)
    d = m_r - m_b
    if abs(d) <= noise:
        kind = Kind.WITHIN_NOISE
    elif paper_d == 0 or (d > 0) == (paper_d > 0):
        kind = Kind.REPRODUCES
    else:
        kind = Kind.OPPOSITE
    return Verdict(kind, unpaired, paired, abs(paper_d) <= PAPER_NOISE, delta=d)
