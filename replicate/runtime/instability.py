"""The instability observatory: detect the kNN-accuracy "dips" and the gradient spikes the paper is about.

The paper (Sec. 4.1, App. A, Fig. 4) finds that unstable ViT training rarely diverges; instead the kNN monitor
shows dips, drops of a few points that partially recover, and the relative gradient magnitude spikes first in
the first layer (the patch projection) and tens of iterations later in the last layers. This module turns the
monitor's curves (``TrainingMonitor.curves()``) into a few numbers:

kNN dips (``find_dips``):
  The monitor's kNN accuracy is measured on one training batch, so it is noisy (docs/code-measurements.md).
  The curve is first smoothed by a centred running median over ``smooth`` samples (by default about 4% of the
  curve, at least 3): a single bad sample can neither open nor close a dip, a dip must persist over about
  half the window. A dip opens when the smoothed accuracy falls below its running best by more than
  ``threshold`` points and closes (is *recovered*) when it climbs back to within ``threshold`` of the best it
  fell from; its depth is that best minus the lowest smoothed value in between. ``threshold = max(min_drop,
  noise_k * noise left after smoothing)``: ``min_drop`` (1 point) is the paper's scale of a dip; the noise term
  (the raw sample-to-sample noise, from the MAD of first differences, times sqrt(pi / 2w) for a median of w)
  raises it where the monitor is too noisy to resolve 1 point, so noise alone is rarely counted as a dip
  (the simulated false-dip rate: docs/code-measurements.md). A drop still open
  at the end is *unrecovered* (``final_gap``: best minus final smoothed value).

Gradient spikes (``find_spikes``):
  Iteration t spikes when g[t] > median + k * 1.4826 * MAD of the trailing ``window`` iterations before t
  (k = 6 by default; 1.4826 * MAD estimates a standard deviation robustly). Consecutive spiking iterations are
  one spike, dated by its first iteration (its onset). Applied to the relative gradient inf-norm
  (grad / weight inf-norm) of the first and of the last layer.

Lead/lag (``spike_lead``): each first-layer onset is paired with the nearest last-layer onset within
``max_lag`` iterations; the median of (last - first) over pairs is how many iterations the first layer leads
(positive: first layer spikes first, as in the paper's Fig. 4).
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import median_filter

MAD_TO_SD = 1.4826  # MAD * this = standard deviation, for Gaussian noise


def noise_sd(values) -> float:
    """Robust sample-to-sample noise of a series: MAD of first differences (a slow trend does not count)."""
    d = np.diff(np.asarray(values, dtype=float))
    if len(d) < 2:
        return 0.0
    return float(MAD_TO_SD * np.median(np.abs(d - np.median(d))) / np.sqrt(2))


def smoothing_window(n: int) -> int:
    """Default running-median width: odd, >= 3, about 4% of the curve (paper dips last epochs, not samples)."""
    return max(3, (n // 25) | 1)


def find_dips(steps, acc, min_drop: float = 1.0, noise_k: float = 4.0, smooth: int | None = None) -> dict:
    """Dips of a kNN-accuracy curve below its running best; see the module docstring for the rule."""
    steps = [int(s) for s in steps]
    raw = np.asarray(acc, dtype=float)
    w = smoothing_window(len(raw)) if smooth is None else smooth
    # Noise left after a running median of w samples: sd * sqrt(pi / 2w) (the median's asymptotic variance).
    threshold = max(min_drop, noise_k * noise_sd(raw) * np.sqrt(np.pi / (2 * w)))
    y = median_filter(raw, size=w, mode="nearest") if w > 1 and len(raw) >= w else raw
    dips, start, low_i = [], None, 0
    best, best_i = (y[0], 0) if len(y) else (0.0, 0)
    for i in range(1, len(y)):
        if start is None:
            if y[i] > best:
                best, best_i = y[i], i
            elif y[i] < best - threshold:
                start, low_i = i, i
        else:
            if y[i] < y[low_i]:
                low_i = i
            if y[i] >= best - threshold:  # recovered to within the threshold of the best it fell from
                dips.append({"from": steps[best_i], "bottom": steps[low_i], "recovered": steps[i],
                             "depth": round(float(best - y[low_i]), 2)})
                start = None
                if y[i] > best:
                    best, best_i = y[i], i
    return {
        "n_dips": len(dips),
        "max_depth": max((d["depth"] for d in dips), default=0.0),
        "unrecovered": start is not None,
        "final_gap": round(max(float(best - y[-1]), 0.0), 2) if len(y) else 0.0,
        "threshold": round(float(threshold), 2),
        "smooth": w,
        "dips": dips,
    }


def find_spikes(values, k: float = 6.0, window: int = 50, min_history: int = 10, rel_floor: float = 0.01) -> dict:
    """Spike onsets of a gradient series: g[t] above median + k * robust sd of the trailing window.

    The first ``min_history`` iterations have too little history to judge and are never spikes. The robust sd
    is floored at ``rel_floor`` x the median so an almost constant series does not flag tiny wiggles.
    """
    g = np.asarray(values, dtype=float)
    onsets, ratios, above_prev = [], [], False
    for t in range(min_history, len(g)):
        hist = g[max(0, t - window):t]
        hist = hist[np.isfinite(hist)]
        if len(hist) < min_history or not np.isfinite(g[t]):
            above_prev = False
            continue
        med = float(np.median(hist))
        scale = max(MAD_TO_SD * float(np.median(np.abs(hist - med))), rel_floor * abs(med), 1e-12)
        above = g[t] > med + k * scale
        if above and not above_prev:
            onsets.append(t)
        if above:
            ratios.append(g[t] / med if med > 0 else float("inf"))  # peak height over the trailing median
        above_prev = above
    return {"n_spikes": len(onsets), "onsets": onsets,
            "max_ratio": round(float(max(ratios)), 2) if ratios else None}


def spike_lead(first_onsets, last_onsets, max_lag: int = 100) -> dict:
    """How many iterations first-layer spikes lead the nearest last-layer spike (median over pairs)."""
    last = np.asarray(last_onsets, dtype=int)
    lags = []
    for t in first_onsets:
        if len(last) == 0:
            break
        d = last - t
        j = int(np.argmin(np.abs(d)))  # ties: argmin takes the earlier, i.e. the last layer leading
        if abs(d[j]) <= max_lag:
            lags.append(int(d[j]))
    return {"first_leads_by": float(np.median(lags)) if lags else None, "n_pairs": len(lags), "lags": lags}


def summarize(curves: dict | None, min_drop: float = 1.0, noise_k: float = 4.0, spike_k: float = 6.0,
              window: int = 50, max_lag: int = 100) -> dict | None:
    """The compact, JSON-ready instability summary of one run's monitor curves (None without curves)."""
    if not curves:
        return None
    series = curves.get("series") or {}
    out: dict = {"knn": find_dips(curves.get("knn_steps", []), curves.get("knn_acc", []), min_drop, noise_k)}
    first = find_spikes(series.get("grad_first_rel", []), spike_k, window)
    last = find_spikes(series.get("grad_last_rel", []), spike_k, window)
    out["grad"] = {"first": first, "last": last, **spike_lead(first["onsets"], last["onsets"], max_lag)}
    return out


def record_summary(record: dict) -> dict | None:
    """A result record's summary: the stored one, or computed from its curves (results from before it existed)."""
    return record.get("instability") or summarize(record.get("curves"))


def n_dips(record: dict) -> int:
    """The kNN dips the detector finds in a run (0 for a run without monitor curves)."""
    return (record_summary(record) or {}).get("knn", {}).get("n_dips", 0)


def knn_dips(record: dict) -> list[dict]:
    """The kNN dips the detector finds in a run, each with its ``from``, ``bottom`` and ``recovered`` monitor steps."""
    return (record_summary(record) or {}).get("knn", {}).get("dips", [])


def first_lead(record: dict) -> float | None:
    """How many iterations a run's first-layer gradient spikes lead its last layer's (None: no paired spikes)."""
    return (record_summary(record) or {}).get("grad", {}).get("first_leads_by")


def shows_instability(record: dict) -> bool:
    """A run shows instability when it diverged, or the detector finds a kNN dip or a drop still open at its end (the
    rule of docs/reduced-scale.md, stage v3-2 (a) and (c), and of the v3 instability target)."""
    if record.get("status") == "diverged":
        return True
    knn = (record_summary(record) or {}).get("knn", {})
    return knn.get("n_dips", 0) > 0 or bool(knn.get("unrecovered"))


def aggregate(records: list[dict]) -> dict | None:
    """One row over its seeds: mean dip and spike counts, the deepest dip, the median first-layer lead."""
    sums = [s for s in map(record_summary, records) if s]
    if not sums:
        return None
    leads = [s["grad"]["first_leads_by"] for s in sums if s["grad"]["first_leads_by"] is not None]
    return {
        "n_runs": len(sums),
        "n_dips": float(np.mean([s["knn"]["n_dips"] for s in sums])),
        "unrecovered": sum(bool(s["knn"]["unrecovered"]) for s in sums),
        "max_depth": max(s["knn"]["max_depth"] for s in sums),
        "spikes_first": float(np.mean([s["grad"]["first"]["n_spikes"] for s in sums])),
        "spikes_last": float(np.mean([s["grad"]["last"]["n_spikes"] for s in sums])),
        "first_leads_by": float(np.median(leads)) if leads else None,
    }
