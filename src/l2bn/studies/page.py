"""A study's page, ``<root>/<study>.md``, rebuilt from its run folders alone.

Sections (:data:`SECTIONS`): the command; machine, versions and time (from ``environment.jsonl`` and the
runs' ``timing.jsonl``); the sizing; the report's table exactly as :func:`l2bn.report.write_report` writes
it; the paper's corresponding CIFAR-100 rows (labelled as the paper's; "not available" where we have no
number); the report's figures; and a reading generated from the numbers — each effect's direction against
BN (or the study's baseline) and the paper's, with Welch's t-test and a bootstrap interval on every
difference (:mod:`l2bn.studies.stats`). No sentence states more than those numbers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..train import report
from ..train.config import TrainConfig
from ..train.report import grid_title
from ..train.rundir import ANGLE_KEYS, ANGLE_TITLES, RunDir, read_jsonl
from .catalog import CONTENDED_TIMING, EPOCH_SECONDS, STEP_RATIO, STUDY_JOBS, Study, estimate_seconds
from .paper import PAPER_CLAIM, PAPER_ROWS, PAPER_SOURCE
from .folder import environment_records, grid_dir
from .stats import Difference, compare_groups

__all__ = ["SECTIONS", "build_index", "build_page", "load_study_runs"]

SECTIONS = ("## Command", "## Machine, versions and time", "## Sizing", "## Results",
            "## The paper's numbers (CIFAR-100, different data)", "## Figures", "## Reading")
METRICS = ("acc", *ANGLE_KEYS)
TITLES = {"acc": "accuracy", **ANGLE_TITLES}
UNITS = {"acc": " points", "intra_train": "°", "intra_test": "°", "inter": "°", "iir_train": "", "iir_test": ""}


def _identity(config: TrainConfig, norm: str, seed: int) -> dict:
    return dataclasses.replace(config, norm=norm, seed=seed).identity()


def load_study_runs(study: Study, root: str | os.PathLike) -> tuple[dict[str, list[report.Run]], int]:
    """The finished or failed runs of ``study``'s experiment (others in its folders are ignored), by row
    label in the study's order, and the number of planned runs. Rows are the norms of a one-grid study,
    the grid labels (placements) otherwise."""
    rows: dict[str, list[report.Run]] = {}
    for index, grid in enumerate(study.grids):
        config = study.config(grid)
        folder = grid_dir(study, index, root) / "runs"
        wanted = {_key(_identity(config, n, s)): n for n in grid.norms for s in study.seeds}
        found = report.find_runs(folder) if folder.is_dir() else []
        for run in found:
            if not (run.summary is not None or run.failed):
                continue
            norm = wanted.get(_key(TrainConfig.from_dict(run.config).identity()))
            if norm is None:
                continue
            label = norm if len(study.grids) == 1 else grid.label
            if label != run.norm:
                run = dataclasses.replace(run, config={**run.config, "norm": label})
            rows.setdefault(label, []).append(run)
    order = list(study.grids[0].norms) if len(study.grids) == 1 else [g.label for g in study.grids]
    return {k: sorted(rows[k], key=lambda r: r.seed) for k in order if k in rows}, study.run_count()


def _key(identity: dict) -> str:
    return json.dumps(identity, sort_keys=True)


def _values(runs: Sequence[report.Run], metric: str) -> list[float]:
    ok = [r for r in runs if not r.failed]
    if metric == "acc":
        return [r.best_acc for r in ok]
    return [v for v in (r.final_angles().get(metric) for r in ok) if v is not None and math.isfinite(v)]


def _title(study: Study) -> str:
    config = study.config(study.grids[0])
    if len(study.grids) == 1:
        return grid_title(config, study.seeds)
    placements = ", ".join(g.label for g in study.grids)
    return f"L2BN placements {placements}: " + grid_title(dataclasses.replace(config, placement="all"), study.seeds)


def _command_section(study: Study, command: str, root: Path) -> list[str]:
    where = root / study.folder
    shared = (f" It trains nothing of its own: its runs are those of the `{study.runs_of}` study "
              f"(`python -m l2bn study {study.runs_of}`), which this command runs (or skips when finished)."
              if study.runs_of else "")
    return [
        "```bash", command, "```", "",
        f"Run folders: `{where}/` ({'one grid a placement, ' if len(study.grids) > 1 else ''}"
        "`runs/<norm>-s<seed>/`: config, metrics, timing, summary; checkpoints are not committed). Rerunning the "
        "command skips finished runs and resumes interrupted ones; add `--report-only` to rebuild this page "
        f"from the run folders without training.{shared}", "",
    ]


def _machine_section(study: Study, runs: dict[str, list[report.Run]], planned: int, root: Path) -> list[str]:
    lines = []
    envs = environment_records(study, root)
    if envs:
        lines.append("| date | command | CPU | cores | threads a run | jobs | torch | L2BN impl | code | runs trained | wall |")
        lines.append("|---|---|---|---:|---:|---:|---|---|---|---:|---:|")
        for e in envs:
            lines.append(f"| {e['date']} | `{e['command']}` | {e['cpu']} | {e['cores']} | {e['threads']} | {e['jobs']} "
                         f"| {e['torch']} | {e['l2bn_impl']} | {e.get('code', 'not recorded')} | {e['runs_trained']} | {_wall(e)} |")
        lines.append("")
    else:
        lines += ["No invocation recorded its machine yet (`environment.jsonl` is written when runs are trained).", ""]
    every = [r for group in runs.values() for r in group]
    seconds = [_run_seconds(r) for r in every]
    done = sum(1 for r in every if not r.failed)
    lines.append(f"Runs finished: {done} of {planned} planned" + (
        f", {len(every) - done} failed (recorded in their `failed.json`)" if len(every) > done else "") + ".")
    if seconds:
        lines.append(f"Run time from the runs' `timing.jsonl` (training + evaluation, summed over runs; runs trained "
                     f"side by side overlap in wall time): {_hours(sum(seconds))} "
                     f"({_hours(sum(seconds) / len(seconds))} a run on average).")
    lines.append("")
    return lines


def _wall(record: dict) -> str:
    """An invocation's wall time; one that did not finish says so (and how far its record got)."""
    status = record.get("status", "finished")  # records written before statuses were kept were final
    if status == "finished":
        return _hours(record["wall_seconds"])
    ended = {"running": "no final record: still running, or killed", "interrupted": "interrupted (Ctrl-C)",
             "error": "stopped by an error"}.get(status, status)
    return f"≥ {_hours(record['wall_seconds'])}, {ended}"


def _run_seconds(run: report.Run) -> float:
    records = read_jsonl(RunDir(run.path).timing_path)
    return float(sum(r.get("train_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in records))


def _hours(seconds: float) -> str:
    seconds = float(seconds)
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _sizing_section(study: Study) -> list[str]:
    size, train, evaluation = EPOCH_SECONDS["full set"]
    subset = f"a stratified {study.train_subset}-sample subset" if study.train_subset else f"the full {size} images"
    norms = dict.fromkeys(n for g in study.grids for n in g.norms if n in STEP_RATIO)
    ratios = ", ".join(f"{n} {STEP_RATIO[n]:.2f}" for n in norms)
    return [
        f"Basis: one ResNet-20 Fashion-MNIST epoch (BN, batch 128, `--threads 2`, uncontended) takes {train:.1f} s "
        f"of training and {evaluation:.1f} s of evaluation with the angle metrics on this 2-core machine "
        f"(docs/performance.md). Timed again for this sizing under other sessions' load ({CONTENDED_TIMING}): "
        "such times say nothing about the cost of an uncontended run, so the estimate uses the basis. "
        f"The studies run one thread a run, {STUDY_JOBS} runs at once (the records then do not depend on "
        "`--jobs`); the estimate assumes the two cores together train as fast as one 2-thread run. "
        f"This study: {study.run_count()} runs × {study.epochs} epoch(s) on {subset}, angle metrics every "
        f"{study.metrics_every} epoch(s)" + (f", training-step cost relative to BN: {ratios}" if study.train_subset
                                             else "")
        + f" — estimated {_hours(estimate_seconds(study))} of the 2-core machine (`l2bn.studies.catalog.estimate_seconds`)"
        + (f"; it reuses the runs of `{study.runs_of}`, so it costs nothing more." if study.runs_of else "."), "",
    ]


def _results_section(study: Study, runs: dict[str, list[report.Run]], root: Path) -> tuple[list[str], dict]:
    if not runs:
        return ["No run of this study has finished yet.", ""], {}
    out = root / study.folder
    flat = [r for group in runs.values() for r in group]
    paths = report.write_report(flat, out, list(runs), title=_title(study))
    text = paths["markdown"].read_text().splitlines()
    table = [line for line in text if line.startswith("|")]
    notes = [line for line in text if line.startswith("Accuracy:")]
    lines = [f"The report (`{paths['markdown']}`, also `{paths['csv'].name}`), as `l2bn.report` writes it:", "",
             *table, "", *notes, ""]
    if study.runs_of:
        lines += _per_epoch_table(runs)
    return lines, paths


def _per_epoch_table(runs: dict[str, list[report.Run]]) -> list[str]:
    keys = ("test_acc", "train_loss", "intra_test", "inter", "iir_test")
    labels = list(runs)
    head = ["Epoch"] + [f"{label} {key}" for key in keys for label in labels]
    lines = ["Per epoch, mean over seeds (the numbers the figures draw):", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * len(head)) + "|"]
    means = {(label, key): _epoch_means(group, key) for label, group in runs.items() for key in keys}
    epochs = sorted(set.union(*(set(m) for m in means.values()))) if means else []
    for epoch in epochs:
        cells = [str(epoch)]
        for key in keys:
            for label in labels:
                value = means[(label, key)].get(epoch)
                cells.append("" if value is None else f"{value:.{3 if 'iir' in key or 'loss' in key else 2}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _epoch_means(group: Sequence[report.Run], key: str) -> dict[int, float]:
    """Mean over the group's finished runs of ``key`` at every epoch they all logged (the figures' curve)."""
    curve = report._curve([r for r in group if not r.failed], key)
    return {} if curve is None else {int(e): float(m) for e, m in zip(curve[0], curve[1])}


def _paper_section(study: Study) -> list[str]:
    head = ["Paper's row (CIFAR-100)", "Accuracy (%)"] + [ANGLE_TITLES[k] for k in ANGLE_KEYS]
    lines = [f"From {PAPER_SOURCE}, for reference only: another data set (CIFAR-100), other models and "
             "200–300-epoch recipes, so no number here is expected to match ours. Cells read \"not available\" where "
             "the paper's table could not be read on this machine (see `l2bn/studies/paper.py`); nothing is "
             "guessed.", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, values in PAPER_ROWS.get(study.name, []):
        cells = [label] + ["not available" if values[m] is None else f"{values[m]:.2f}" for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _figures_section(study: Study, paths: dict, root: Path) -> list[str]:
    if not paths:
        return ["No figures yet (no run has finished).", ""]
    rel = Path(study.folder)
    return [f"![test accuracy and training loss]({(rel / paths['curves'].name).as_posix()})", "",
            f"![intra-angle, inter-angle and IIR over training]({(rel / paths['angles'].name).as_posix()})", "",
            "Mean over seeds with a ± std band (Fig. 6: accuracy and loss; Fig. 1 and 7: the angles)."
            + ("" if study.metrics_every == 1 else f" The angles were measured every {study.metrics_every} "
               "epochs, so their panels show those epochs only."), ""]


def _describe(metric: str, d: Difference) -> str:
    digits = 3 if metric.startswith("iir") else 2
    unit = UNITS[metric]
    text = (f"{TITLES[metric]} {d.mean_a:.{digits}f} vs {d.mean_b:.{digits}f} "
            f"({d.diff:+.{digits}f}{unit}")
    if not d.testable:
        why = "fewer than two seeds in a group" if min(d.n_a, d.n_b) < 2 else "no seed-to-seed spread"
        return text + f"; not testable: {why})"
    verdict = ("larger than the seed-to-seed spread" if d.beyond_spread
               else "not distinguishable from the seed-to-seed spread")
    return (text + f"; Welch t = {d.t:.2f}, df = {d.df:.1f}, p = {d.p:.3g}; {int(d.level * 100)} % bootstrap "
            f"interval [{d.low:+.{digits}f}, {d.high:+.{digits}f}]: {verdict})")


def _direction(diff: float) -> int:
    return 0 if diff == 0 or not math.isfinite(diff) else (1 if diff > 0 else -1)


def _paper_comparison(diffs: dict[str, Difference]) -> str:
    agree = [TITLES[m] for m, d in diffs.items() if _direction(d.diff) == PAPER_CLAIM[m]]
    disagree = [TITLES[m] for m, d in diffs.items() if _direction(d.diff) == -PAPER_CLAIM[m]]
    shown = [TITLES[m] for m, d in diffs.items() if d.beyond_spread and _direction(d.diff) == PAPER_CLAIM[m]]
    text = ("The paper reports, for L2BN against BN on CIFAR-100, higher accuracy, smaller intra-angles, a "
            "larger inter-angle and so a smaller IIR. Here the direction agrees for "
            f"{', '.join(agree) or 'no metric'} and is opposite for {', '.join(disagree) or 'no metric'}")
    if shown:
        return text + f"; of the agreeing ones, only {', '.join(shown)} differ by more than the seed-to-seed spread."
    return text + "; no agreeing difference is larger than the seed-to-seed spread."


def _reading_section(study: Study, runs: dict[str, list[report.Run]]) -> list[str]:
    baseline = study.baseline if len(study.grids) == 1 else study.grids[0].label
    if baseline not in runs or len(runs) < 2:
        return [f"Not enough finished runs to compare with {baseline!r} yet.", ""]
    base_name = "BN everywhere (placement none)" if len(study.grids) > 1 else baseline.upper()
    lines = [f"Every row against {base_name}, over the seeds that finished (best test accuracy of each run; "
             "angles of the final model). \"Larger than the seed-to-seed spread\" means Welch's two-sided "
             "p < 0.05 and a 95 % bootstrap interval of the difference that excludes 0; with three to five "
             "seeds a group, both are coarse.", ""]
    ranked = sorted(runs, key=lambda k: -np.mean(_values(runs[k], "acc") or [-math.inf]))
    lines.append("Accuracy order: " + " > ".join(
        f"{k} ({np.mean(_values(runs[k], 'acc')):.2f} %)" for k in ranked if _values(runs[k], "acc")) + ".")
    lines.append("")
    for label, group in runs.items():
        if label == baseline:
            continue
        diffs = {m: compare_groups(_values(group, m), _values(runs[baseline], m)) for m in METRICS}
        lines.append(f"- **{label}** against {base_name}: " + "; ".join(
            _describe(m, d) for m, d in diffs.items()) + ".")
        if label in ("l2bn", "all"):
            lines.append(f"  {_paper_comparison(diffs)}")
    failed = [f"{r.norm} seed {r.seed}" for group in runs.values() for r in group if r.failed]
    if failed:
        lines.append(f"- Diverged and left out: {', '.join(failed)}.")
    if study.runs_of:
        lines += _curves_reading(runs, baseline)
    return lines + [""]


def _curves_reading(runs: dict[str, list[report.Run]], baseline: str) -> list[str]:
    lines = []
    claims = {"test_acc": +1, "intra_test": -1, "inter": +1, "iir_test": -1}
    for label in runs:
        if label == baseline:
            continue
        parts = []
        for key, sign in claims.items():
            ours, base = _epoch_means(runs[label], key), _epoch_means(runs[baseline], key)
            epochs = sorted(set(ours) & set(base))
            if epochs:
                hits = sum(1 for e in epochs if _direction(ours[e] - base[e]) == sign)
                parts.append(f"{key} in the paper's direction at {hits} of {len(epochs)} epochs")
        if parts:
            lines.append(f"- Over training, {label} against {baseline} (means over seeds): " + "; ".join(parts) + ".")
    return lines


def build_page(study: Study, root: str | os.PathLike, command: str) -> Path:
    """Write ``<root>/<study.name>.md`` from the study's run folders (and its report into its folder)."""
    root = Path(root)
    runs, planned = load_study_runs(study, root)
    results, paths = _results_section(study, runs, root)
    body = [f"# {study.title}", "",
            f"Reproduces the paper's {study.reproduces} on Fashion-MNIST (28×28 grey images, 10 classes, 60000 "
            "training and 10000 test images), with the paper's protocol: seeds from 121, best test accuracy "
            "mean ± std over seeds, intra/inter-class angles and IIR of the classifier-input features of train "
            "and test data (test intra-angles against train class centers). Generated by "
            "`l2bn.studies.page` from the run folders; no number is edited by hand.", ""]
    sections = {
        "## Command": _command_section(study, command, root),
        "## Machine, versions and time": _machine_section(study, runs, planned, root),
        "## Sizing": _sizing_section(study),
        "## Results": results,
        "## The paper's numbers (CIFAR-100, different data)": _paper_section(study),
        "## Figures": _figures_section(study, paths, root),
        "## Reading": _reading_section(study, runs),
    }
    for heading in SECTIONS:
        body += [heading, "", *sections[heading]]
    page = root / f"{study.name}.md"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(body).rstrip() + "\n")
    return page


def build_index(root: str | os.PathLike) -> Path:
    """Write ``<root>/README.md``: every study with its command, page, progress and time (from its run folders)."""
    from .catalog import STUDIES
    from .folder import study_command

    root = Path(root)
    lines = ["# Studies on real data", "",
             "The paper's tables rerun on Fashion-MNIST (the largest real data reachable on these machines; CIFAR-100 "
             "and ImageNet are not), each one command that trains its runs into its folder here, skips finished "
             "runs and rebuilds its page. Generated by `l2bn.studies.page.build_index`; every page states its "
             "machine, versions, time and the paper's corresponding rows. How the studies are defined, sized and "
             "read: [docs/studies.md](../studies.md).", "",
             "| study | reproduces | command | runs finished | estimated (wall) | run time (Σ over runs) |", "|---|---|---|---:|---:|---:|"]
    for name, study in STUDIES.items():
        runs, planned = load_study_runs(study, root)
        done = sum(1 for group in runs.values() for r in group if not r.failed)
        seconds = sum(_run_seconds(r) for group in runs.values() for r in group)
        estimate = f"shares `{study.runs_of}`" if study.runs_of else _hours(estimate_seconds(study))
        lines.append(f"| [{name}]({name}.md) | {study.reproduces} | `{study_command(name)}` | {done} of {planned} "
                     f"| {estimate} | {_hours(seconds) if seconds else '—'} |")
    total = sum(estimate_seconds(s) for s in STUDIES.values())
    lines += ["", f"Estimated total: {_hours(total)} of this 2-core machine (sizing on each page). Run them in the "
              "background, e.g. `nohup python -m l2bn study table1 &`; an interrupted study continues where it "
              "stopped when its command is run again, and `--report-only` rebuilds a page without training.", ""]
    index = root / "README.md"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text("\n".join(lines))
    return index
