"""A study page's test of whether an effect changes across its grids: the small-batch study's question (does
L2BN's effect against BN change as batch noise grows?) and, in general, any study whose grids hold the same norms
under different conditions.

Per grid, the effect of a norm is its per-seed difference to the grid's baseline norm (paired by seed). Each later
grid's effects are compared with the first grid's (paired by seed where both ran the same seeds, else Welch's
test; :mod:`l2bn.studies.stats`), a difference in differences — the interaction of norm and condition. These
tests form their own family, Holm-corrected, apart from the page's row-against-baseline family.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..train import report
from .beyond import METRIC_TITLES, METRIC_UNITS, metric_digits, seed_values
from .stats import Difference, compare_groups, holm, paired_seeds

__all__ = ["METRICS", "effects", "finished_grids", "interactions", "section"]

METRICS = ("acc", "intra_train", "iir_train")  # titled, united and rounded as on the rest of the page

GridRows = Sequence[tuple[str, dict[str, str]]]  # per grid: (its label, {norm: the page's row label})


def effects(runs: dict[str, list[report.Run]], norm_row: str, base_row: str, metric: str) -> dict[int, float]:
    """``{seed: value(norm) − value(base)}`` over the seeds both rows finished."""
    a, b = seed_values(runs[norm_row], metric), seed_values(runs[base_row], metric)
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def finished_grids(grids: GridRows, runs: dict[str, list[report.Run]]) -> list[tuple[str, dict[str, str]]]:
    """The grids whose every row has a finished run, in order; none unless the first grid is among them."""
    done = [(label, rows) for label, rows in grids
            if all(any(not r.failed for r in runs.get(row, ())) for row in rows.values())]
    return done if done and done[0][0] == grids[0][0] else []


def interactions(grids: GridRows, runs: dict[str, list[report.Run]], baseline: str
                 ) -> dict[tuple[str, str, str], Difference]:
    """``{(norm, grid, metric): effect in grid − effect in the first grid}`` for every norm other than
    ``baseline`` present with it in every grid, Holm-corrected as one family."""
    grids = finished_grids(grids, runs)
    if len(grids) < 2 or any(baseline not in rows for _, rows in grids):  # e.g. one norm a grid (placements)
        return {}
    first_rows = grids[0][1]
    norms = [n for n in first_rows if n != baseline and all(n in rows for _, rows in grids)]
    raw = {}
    for norm in norms:
        for metric in METRICS:
            first = effects(runs, first_rows[norm], first_rows[baseline], metric)
            for label, rows in grids[1:]:
                later = effects(runs, rows[norm], rows[baseline], metric)
                a, b, paired = paired_seeds(later, first)
                raw[(norm, label, metric)] = compare_groups(a, b, paired=paired)
    return dict(zip(raw, holm(list(raw.values()))))


def _cell(d: Difference, unit: str, digits: int) -> str:
    if not d.testable:
        return f"{d.diff:+.{digits}f}{unit} (not testable)"
    verdict = ", **beyond the spread**" if d.beyond_spread else ""
    return (f"{d.diff:+.{digits}f}{unit} [{d.low:+.{digits}f}, {d.high:+.{digits}f}], p = {d.p:.2g}, Holm "
            f"{d.p_holm:.2g}, ±{d.detectable:.{digits}f} detectable{verdict}")


def section(grids: GridRows, runs: dict[str, list[report.Run]], baseline: str) -> list[str]:
    """The section's lines: the effect per grid (mean over seeds) and its change from the first grid, over the
    grids that finished every row (:func:`finished_grids`); empty where fewer than two did."""
    tests = interactions(grids, runs, baseline)
    if not tests:
        return []
    grids = finished_grids(grids, runs)
    first, later = grids[0][0], [label for label, _ in grids[1:]]
    lines = [f"Each norm's effect against {baseline.upper()} (its per-seed difference, mean over seeds) in every "
             f"grid, and how much it changes from {first} (the difference of effects: its 95 % interval, "
             f"p-value, Holm-adjusted p over these {sum(d.testable for d in tests.values())} tests — a family of its "
             "own — and the change detectable at 80 % power).", "",
             "| Norm | Metric | " + " | ".join(label for label, _ in grids) + " | "
             + " | ".join(f"{label} − {first}" for label in later) + " |",
             "|---|---|" + "---:|" * len(grids) + "---|" * len(later)]
    for norm in dict.fromkeys(key[0] for key in tests):
        for metric in METRICS:
            title, unit, digits = METRIC_TITLES[metric], METRIC_UNITS[metric], metric_digits(metric)
            means = []
            for _, rows in grids:
                e = list(effects(runs, rows[norm], rows[baseline], metric).values())
                means.append(f"{np.mean(e):+.{digits}f}{unit} ({len(e)})" if e else "")
            changes = [_cell(tests[(norm, label, metric)], unit, digits) for label in later]
            lines.append(f"| {norm} | {title} | " + " | ".join(means) + " | " + " | ".join(changes) + " |")
    return lines + ["", "(n) is the number of seeds both norms finished in that grid.", ""]
