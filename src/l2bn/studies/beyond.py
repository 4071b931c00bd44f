"""A study page's section on what its runs record beyond the paper's table, for the evidence studies' questions:

- **the feature cone** (``cone_train``, ``cone_test``: the mean angle of the features to the mean of the class
  centers, :mod:`l2bn.metrics`) — do intra- and inter-class angles shrink together because the cone of all
  features contracts, rather than because the classes separate? (The cone angles also join the page's family
  of tests, :data:`CONE_KEYS`.)
- **per-class test accuracy** (``test_class_acc``) at each run's reported epoch — where a long tail or noisy
  labels cost accuracy;
- **the spread of the per-sample norms** entering every norm layer (``norm_cv``, :mod:`l2bn.norm_spread`),
  summarised by stage, with a figure over the epochs — the quantity the paper says hurts BatchNorm.

Descriptive: means (± std) over seeds; only the cone angles are tested (with the page's other metrics).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..train import report
from ..train.rundir import ANGLE_TITLES

__all__ = ["CONE_KEYS", "CONE_TITLES", "METRIC_TITLES", "METRIC_UNITS", "final_value", "metric_digits",
           "recorded_cone", "section", "seed_values", "stage_of", "stage_spread"]

CONE_KEYS = ("cone_train", "cone_test")
CONE_TITLES = {"cone_train": "Cone(train)", "cone_test": "Cone(test)"}
METRIC_TITLES = {"acc": "accuracy", **ANGLE_TITLES, **CONE_TITLES}  # what seed_values reads, as pages name it
METRIC_UNITS = {"acc": " points", "intra_train": "°", "intra_test": "°", "inter": "°", "iir_train": "", "iir_test": "",
                "cone_train": "°", "cone_test": "°"}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")  # torchvision.datasets.FashionMNIST.classes, label order


def _finished(runs: dict[str, list[report.Run]]) -> dict[str, list[report.Run]]:
    return {label: [r for r in group if not r.failed and r.records] for label, group in runs.items()}


def final_value(run: report.Run, key: str) -> float | None:
    """``key`` at the last epoch that measured the angles (where the cone angles are logged), if recorded."""
    last = run.last_measured_record()
    value = None if last is None else last.get(key)
    return None if value is None else float(value)


def metric_digits(metric: str) -> int:
    """Decimals a page prints ``metric`` with: 3 for the IIR ratios, 2 for accuracy and angles."""
    return 3 if metric.startswith("iir") else 2


def seed_values(runs: Sequence[report.Run], metric: str) -> dict[int, float]:
    """``{seed: value}`` of ``metric`` over the finished runs: ``"acc"`` the test accuracy at the selected epoch,
    a cone key its last measured value, else the final model's angle metric; missing and non-finite values left out."""
    ok = [r for r in runs if not r.failed]
    if metric == "acc":
        values = {r.seed: r.selected_acc for r in ok}
    elif metric in CONE_KEYS:
        values = {r.seed: final_value(r, metric) for r in ok}
    else:
        values = {r.seed: r.final_angles().get(metric) for r in ok}
    return {s: float(v) for s, v in values.items() if v is not None and math.isfinite(v)}


def recorded_cone(runs: dict[str, list[report.Run]]) -> tuple[str, ...]:
    """:data:`CONE_KEYS` when any finished run recorded them (runs from before they were logged: ``()``)."""
    every = [r for group in _finished(runs).values() for r in group]
    return CONE_KEYS if any(final_value(r, CONE_KEYS[0]) is not None for r in every) else ()


def _mean_std(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return ""
    spread = f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else ""
    return f"{np.mean(values):.{digits}f}{spread}"


def _cone_lines(runs: dict[str, list[report.Run]]) -> list[str]:
    if not recorded_cone(runs):
        return []
    keys = ("intra_train", "inter", *CONE_KEYS)
    lines = ["**Feature cone.** The mean angle of each feature to the mean of the class centers (degrees; final "
             "model), beside the intra- and inter-class angles: intra- and inter-angles shrinking together with "
             "a narrower cone read as a contracting cone of features, not as more separate classes. Mean ± std "
             "over seeds; the cone angles are tested with the other metrics under Reading.", "",
             "| Row | Seeds | Intra(train) | Inter | Cone(train) | Cone(test) |", "|---|---:|---:|---:|---:|---:|"]
    for label, group in _finished(runs).items():
        cells = [_mean_std([v for r in group if (v := final_value(r, k)) is not None]) for k in keys]
        lines.append(f"| {label} | {len(group)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _class_lines(study, runs: dict[str, list[report.Run]]) -> list[str]:
    chosen = {label: [r.selected_record() for r in group] for label, group in _finished(runs).items()}
    per_row = {label: [record["test_class_acc"] for record in records if "test_class_acc" in record]
               for label, records in chosen.items()}
    per_row = {label: np.array(v, dtype=np.float64) for label, v in per_row.items() if v}
    if not per_row:
        return []
    classes = next(iter(per_row.values())).shape[1]
    names = (FASHION_CLASSES if study.config(study.grids[0]).dataset == "fashion-mnist" and classes == 10
             else tuple(str(c) for c in range(classes)))
    tail = ("; in the long-tailed grid class 0 has the most training images and class 9 the fewest"
            if any(g.imbalance for g in study.grids) else "")
    lines = [f"**Per-class test accuracy** (%) at each run's reported epoch, mean over seeds (classes in label "
             f"order{tail}):", "",
             "| Row | Seeds | " + " | ".join(f"{c} {n}" for c, n in enumerate(names)) + " |",
             "|---|---:|" + "---:|" * classes]
    for label, values in per_row.items():
        lines.append(f"| {label} | {len(values)} | " + " | ".join(f"{m:.1f}" for m in values.mean(axis=0)) + " |")
    return lines + [""]


def stage_of(layer: str) -> str:
    """The stage a norm layer belongs to: the first part of its qualified name (``layer2.1.bn1`` → ``layer2``);
    a top-level layer (``bn1``) is the ``stem``."""
    return layer.split(".")[0] if "." in layer else "stem"


def stage_spread(record: dict) -> dict[str, float]:
    """One epoch record's ``norm_cv`` averaged over the layers of each stage (stages in network order)."""
    stages: dict[str, list[float]] = {}
    for layer, cv in record.get("norm_cv", {}).items():
        stages.setdefault(stage_of(layer), []).append(float(cv))
    return {stage: float(np.mean(v)) for stage, v in stages.items()}


def _spread_curves(group: Sequence[report.Run]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per stage: the epochs every run of ``group`` logged the spread at, its mean and std over the runs."""
    per_run = [{r["epoch"]: stage_spread(r) for r in run.records if "norm_cv" in r} for run in group]
    stages = dict.fromkeys(s for d in per_run for spread in d.values() for s in spread)
    bands = {s: report.mean_band([{e: spread[s] for e, spread in d.items() if s in spread} for d in per_run])
             for s in stages}
    return {s: band for s, band in bands.items() if band is not None}


def _spread_lines(runs: dict[str, list[report.Run]], out_dir: Path, rel: Path) -> list[str]:
    curves = {label: c for label, group in _finished(runs).items() if (c := _spread_curves(group))}
    if not curves:
        return []
    stages = list(dict.fromkeys(s for c in curves.values() for s in c))
    lines = ["**Spread of the per-sample norms** entering the norm layers: the coefficient of variation of ‖x_n‖ "
             "across a training batch (std / mean), averaged over the steps of an epoch and over each stage's "
             "layers; first → last epoch, mean over seeds. (For L2BN this is the input of its l2 step, which "
             "the step itself then equalises.)", "",
             "| Row | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    for label, c in curves.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{c[s][1][0]:.3f} → {c[s][1][-1]:.3f}" if s in c else "" for s in stages) + " |")
    path = _plot_spread(curves, stages, out_dir / "norm_spread.png")
    return lines + ["", f"![norm spread by stage over training]({(rel / path.name).as_posix()})", ""]


def _plot_spread(curves: dict, stages: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages) + 1.5, 3.6), layout="constrained",
                             squeeze=False)
    colors = report.norm_colors(list(curves))
    for ax, stage in zip(axes[0], stages):
        for label, c in curves.items():
            if stage in c:
                epochs, mean, std = c[stage]
                ax.plot(epochs, mean, color=colors[label], label=label, marker="." if len(epochs) < 30 else None)
                ax.fill_between(epochs, mean - std, mean + std, color=colors[label], alpha=0.2, linewidth=0)
        ax.set(xlabel="epoch", ylabel="CV of ‖x_n‖ across the batch", title=stage)
    return report.save_figure(fig, list(axes[0]), "Spread of the per-sample norms at the norm layers' input",
                               path)


def section(study, runs: dict[str, list[report.Run]], out_dir: Path, rel: Path) -> list[str]:
    """The section's lines (and ``norm_spread.png`` in ``out_dir`` where the runs logged the spread)."""
    lines = [*_cone_lines(runs), *_class_lines(study, runs), *_spread_lines(runs, out_dir, rel)]
    if lines:
        return lines
    return ["The runs of this study record none of these (the cone angle, per-class accuracy and the norm spread "
            "were logged only from the evidence studies on).", ""]
