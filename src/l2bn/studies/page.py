"""A study's page, ``<root>/<study>.md``, rebuilt from its run folders alone.

Sections (:data:`SECTIONS`): the command; machine, versions and time (from ``environment.jsonl`` and the
runs' ``timing.jsonl``); the sizing; the report's table exactly as :func:`l2bn.report.write_report` writes
it; the paper's corresponding rows (:mod:`l2bn.studies.paper`, labelled as the paper's) beside ours and a
"paper vs here" table of the protocols; the report's figures; and a reading generated from the numbers — each
effect's direction against BN (or the study's baseline) and the paper's, with a t-test (paired where the arms
share seeds), its interval, Holm's correction over the page and the difference detectable at 80 % power
(:mod:`l2bn.studies.stats`). The first line names the rows that did not fit their training data. No sentence
states more than those numbers.
"""
from __future__ import annotations

import dataclasses
import hashlib
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
from . import across, beyond
from .beyond import METRIC_TITLES as TITLES, METRIC_UNITS as UNITS, metric_digits, recorded_cone, seed_values
from .catalog import CONTENDED_TIMING, EPOCH_SECONDS, STEP_RATIO, STUDY_JOBS, Grid, Study, estimate_seconds
from .folder import environment_records, grid_dir
from .paper import PAPER_CLAIM, PAPER_PROTOCOL, PAPER_SOURCE, paper_rows
from .stats import Difference, compare_groups, holm, paired_seeds

__all__ = ["SECTIONS", "build_index", "build_page", "load_study_runs"]

SECTIONS = ("## Command", "## Machine, versions and time", "## Sizing", "## Results",
            "## The paper's numbers beside ours", "## Figures", "## Beyond the paper's table", "## Reading")
METRICS = ("acc", *ANGLE_KEYS)  # tested on every page; the cone angles too where the runs recorded them


def _identity(config: TrainConfig, norm: str, seed: int) -> dict:
    return dataclasses.replace(config, norm=norm, seed=seed).identity()


def load_study_runs(study: Study, root: str | os.PathLike) -> tuple[dict[str, list[report.Run]], int]:
    """The finished or failed runs of ``study``'s experiment (others in its folders are ignored), by row
    label in the study's order (:func:`row_label`), and the number of planned runs."""
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
            label = row_label(study, grid, norm)
            if label != run.norm:
                run = dataclasses.replace(run, config={**run.config, "norm": label})
            rows.setdefault(label, []).append(run)
    order = [row_label(study, g, n) for g in study.grids for n in g.norms]
    return {k: sorted(rows[k], key=lambda r: r.seed) for k in dict.fromkeys(order) if k in rows}, study.run_count()


def row_label(study: Study, grid: Grid, norm: str) -> str:
    """A row of the page: the norm of a one-grid study, the grid (e.g. a placement) of a study whose grids have
    one norm each, else ``"<grid>: <norm>"``."""
    if len(study.grids) == 1:
        return norm
    return grid.label if all(len(g.norms) == 1 for g in study.grids) else f"{grid.label}: {norm}"


def baselines(study: Study) -> dict[str, str]:
    """Each row's baseline row: the study's baseline norm within the row's grid (the first grid's row when each
    grid has one norm); the baseline rows themselves are left out."""
    pairs = {}
    for grid in study.grids:
        base_grid = study.grids[0] if all(len(g.norms) == 1 for g in study.grids) else grid
        base = row_label(study, base_grid, study.baseline if study.baseline in base_grid.norms else base_grid.norms[0])
        pairs.update({row_label(study, grid, n): base for n in grid.norms})
    return {row: base for row, base in pairs.items() if row != base}


def _key(identity: dict) -> str:
    return json.dumps(identity, sort_keys=True)


def _values(runs: Sequence[report.Run], metric: str) -> list[float]:
    return list(seed_values(runs, metric).values())


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
        f"Run folders: `{where}/` ({'one folder a grid, ' if len(study.grids) > 1 else ''}"
        "`runs/<norm>-s<seed>/`: config, metrics, timing, summary; checkpoints are not committed). Rerunning the "
        "command skips finished runs and resumes interrupted ones; add `--report-only` to rebuild this page "
        f"from the run folders without training.{shared}", "",
    ]


def _machine_section(study: Study, runs: dict[str, list[report.Run]], planned: int, root: Path) -> list[str]:
    lines = []
    envs = environment_records(study, root)
    if envs:
        lines.append("| date | command | CPU | instruction sets | cores | threads a run | jobs | torch | L2BN impl | code "
                     "| runs trained | wall |")
        lines.append("|---|---|---|---|---:|---:|---:|---|---|---|---:|---:|")
        for e in envs:
            lines.append(f"| {e['date']} | `{e['command']}` | {e['cpu']} | {e.get('isa', 'not recorded')} | {e['cores']} "
                         f"| {e['threads']} | {e['jobs']} | {e['torch']} | {e['l2bn_impl']} "
                         f"| {e.get('code', 'not recorded')} | {e['runs_trained']} | {_wall(e)} |")
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
             *table, "", *notes, "", *_repeated_line(study, runs, root)]
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
    curve = report.mean_curve([r for r in group if not r.failed], key)
    return {} if curve is None else {int(e): float(m) for e, m in zip(curve[0], curve[1])}


def _ours(runs: Sequence[report.Run], metric: str) -> str:
    values = _values(runs, metric)
    if not values:
        return ""
    digits = metric_digits(metric)
    spread = f" ± {np.std(values, ddof=1):.{digits}f}" if metric == "acc" and len(values) > 1 else ""
    return f"{np.mean(values):.{digits}f}{spread}"


def _paper_section(study: Study, runs: dict[str, list[report.Run]]) -> list[str]:
    rows = paper_rows(study.name, study.config(study.grids[0]).model)
    if not rows:
        return ["The paper has no table this study corresponds to.", ""]
    head = ["Row", "Source", "Accuracy (%)"] + [ANGLE_TITLES[k] for k in ANGLE_KEYS]
    lines = [f"The paper's rows ({PAPER_SOURCE}; CIFAR-100, ResNet-56 for Tables 3–5, 200-epoch recipes: other "
             "data, models and budgets, so no number is expected to match) beside this study's (Fashion-MNIST, "
             "the model and budget of the table below). Cells the paper's table does not report are empty.", "",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for row in rows:
        cells = [row.norm, f"paper, {row.citation}"]
        acc = row.values.get("acc")
        cells.append("" if acc is None else f"{acc:.2f}" + (f" ± {row.values['acc_std']:.2f}" if "acc_std" in
                                                             row.values else ""))
        cells += [_paper_cell(row.values.get(k), k) for k in ANGLE_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
        if row.norm in runs and not any(r.norm == row.norm for r in rows[:rows.index(row)]):
            lines.append("| " + " | ".join([row.norm, "here"] + [_ours(runs[row.norm], m) for m in METRICS]) + " |")
    return lines + ["", *_protocol_table(study)]


def _paper_cell(value: float | None, metric: str) -> str:
    return "" if value is None else f"{value:.{metric_digits(metric)}f}"


def _protocol_table(study: Study) -> list[str]:
    """The paper's protocol against this study's, one line an aspect."""
    config = study.config(study.grids[0])
    recipe = config.recipe
    subset = (f"a stratified {study.train_subset}-image subset (the same for every seed and norm)"
              if study.train_subset else "the whole training set (60 000 images)")
    if study.val_size:
        subset += f", less a stratified {study.val_size}-image validation split"
    centers = ("every training image" if recipe.metrics_max_batches is None
               else f"the first {recipe.metrics_max_batches * 256} training images (in order)")
    selection = ("accuracy: the test accuracy at the epoch of the best validation accuracy; angles: final model"
                 if study.val_size else "accuracy: best test accuracy over epochs (selected on the test set: "
                 "optimistic); angles: final model")
    here = {
        "data": "Fashion-MNIST (28×28 grey, 10 classes, 60 000 training / 10 000 test images)",
        "model": config.model,
        "epochs": f"{study.epochs}",
        "schedule": f"SGD, {'Nesterov ' if recipe.nesterov else ''}momentum {recipe.momentum}, lr {recipe.lr}, "
                    f"{recipe.schedule}; weight decay {recipe.weight_decay}",
        "augmentation": "random crop (padding 2) and horizontal flip"
                        + (", drawn for whole batches (`--augment batched`)" if config.augment == "batched" else "")
                        + ("; channels_last tensors" if config.channels_last else ""),
        "batch": f"{recipe.batch_size}",
        "training subset": subset,
        "angle sample": f"{centers} for the class centers and Intra(train); the test set for Intra(test)",
        "epoch selection": selection,
    }
    paper = {**PAPER_PROTOCOL, "model": "ResNet-56 (Tables 3–5), the models of Table 1"}
    lines = ["| | paper | here |", "|---|---|---|"]
    lines += [f"| {aspect} | {paper.get(aspect, '')} | {value} |" for aspect, value in here.items()]
    return ["Paper vs here:", "", *lines, ""]


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
    digits = metric_digits(metric)
    unit = UNITS[metric]
    text = f"{TITLES[metric]} {d.mean_a:.{digits}f} vs {d.mean_b:.{digits}f} ({d.diff:+.{digits}f}{unit}"
    if not d.testable:
        why = "fewer than two seeds in an arm" if min(d.n_a, d.n_b) < 2 else "no seed-to-seed spread"
        return text + f"; not testable: {why})"
    verdict = "larger than the seed-to-seed spread" if d.beyond_spread else "not distinguishable"
    return (text + f"; {d.test_name} = {d.t:.2f}, df = {d.df:.1f}, p = {d.p:.3g}, Holm p = {d.p_holm:.3g}; "
            f"{int(d.level * 100)} % interval [{d.low:+.{digits}f}, {d.high:+.{digits}f}]; detectable at 80 % power: "
            f"±{d.detectable:.{digits}f}{unit}: {verdict})")


def _direction(diff: float) -> int:
    return 0 if diff == 0 or not math.isfinite(diff) else (1 if diff > 0 else -1)


def _paper_comparison(diffs: dict[str, Difference]) -> str:
    diffs = {m: d for m, d in diffs.items() if m in PAPER_CLAIM}  # the paper makes no claim on the cone
    agree = [TITLES[m] for m, d in diffs.items() if _direction(d.diff) == PAPER_CLAIM[m]]
    disagree = [TITLES[m] for m, d in diffs.items() if _direction(d.diff) == -PAPER_CLAIM[m]]
    shown = [TITLES[m] for m, d in diffs.items() if d.beyond_spread and _direction(d.diff) == PAPER_CLAIM[m]]
    text = ("The paper reports, for L2BN against BN on CIFAR-100, higher accuracy, smaller intra-angles, a "
            "larger inter-angle and so a smaller IIR. Here the direction agrees for "
            f"{', '.join(agree) or 'no metric'} and is opposite for {', '.join(disagree) or 'no metric'}")
    if shown:
        return text + f"; of the agreeing ones, only {', '.join(shown)} differ by more than the seed-to-seed spread."
    return text + "; no agreeing difference is larger than the seed-to-seed spread."


def _family(study: Study, runs: dict[str, list[report.Run]]) -> dict[str, dict[str, Difference]]:
    """Every row against its baseline (:func:`baselines`) on every metric — the page's family of tests,
    Holm-corrected together. Arms that ran the same seeds are compared paired (seed by seed), others with
    Welch's test."""
    raw = {}
    for label, baseline in baselines(study).items():
        if label not in runs or baseline not in runs:
            continue
        raw[label] = {}
        for metric in (*METRICS, *recorded_cone(runs)):
            a, b, paired = paired_seeds(seed_values(runs[label], metric), seed_values(runs[baseline], metric))
            raw[label][metric] = compare_groups(a, b, paired=paired)
    flat = holm([d for row in raw.values() for d in row.values()])
    it = iter(flat)
    return {label: {metric: next(it) for metric in row} for label, row in raw.items()}


def _reading_section(study: Study, runs: dict[str, list[report.Run]]) -> list[str]:
    bases = baselines(study)
    family = _family(study, runs)
    if not family:
        return [f"Not enough finished runs to compare with {', '.join(sorted(set(bases.values())))} yet.", ""]
    size = sum(d.testable for row in family.values() for d in row.values())
    chosen = ("test accuracy at the epoch of the best validation accuracy" if _validated(runs)
              else "best test accuracy")
    lines = [f"Every row against {_base_names(study)}, over the seeds that finished ({chosen} of each run; "
             "angles of the final model). Arms that ran the same seeds are compared seed by seed (paired t-test), "
             "others with Welch's t-test; the intervals are the tests' 95 % t-intervals of the difference. "
             f"This page's {size} tests form one family, corrected with Holm's method: \"larger than the "
             "seed-to-seed spread\" means a Holm-adjusted p < 0.05. \"Detectable\" is the difference the same "
             "test would find with 80 % power at this spread and seed count, so a \"not distinguishable\" rules "
             "out differences about that large, not smaller ones.", ""]
    ranked = sorted(runs, key=lambda k: -np.mean(_values(runs[k], "acc") or [-math.inf]))
    lines.append("Accuracy order: " + " > ".join(
        f"{k} ({np.mean(_values(runs[k], 'acc')):.2f} %)" for k in ranked if _values(runs[k], "acc")) + ".")
    lines.append("")
    for label, diffs in family.items():
        lines.append(f"- **{label}** against {_display(study, bases[label])}: " + "; ".join(
            _describe(m, d) for m, d in diffs.items()) + ".")
        if label in ("l2bn", "all") or label.endswith(": l2bn"):
            lines.append(f"  {_paper_comparison(diffs)}")
    failed = [f"{r.norm} seed {r.seed}" for group in runs.values() for r in group if r.failed]
    if failed:
        lines.append(f"- Diverged and left out: {', '.join(failed)}.")
    if study.runs_of:
        lines += _curves_reading(runs, study.baseline)
    lines.append("")
    grid_rows = [(g.label, {n: row_label(study, g, n) for n in g.norms}) for g in study.grids]
    if changes := across.section(grid_rows, runs, study.baseline):
        lines += ["**Across the grids.** " + changes[0], *changes[1:]]
    return lines


def _validated(runs: dict[str, list[report.Run]]) -> bool:
    return any(r.validated for group in runs.values() for r in group if not r.failed)


def _display(study: Study, row: str) -> str:
    """How the page names a baseline row."""
    if len(study.grids) > 1 and all(len(g.norms) == 1 for g in study.grids):
        return "BN everywhere (placement none)" if study.grids[0].placement == "none" else row
    return row.upper() if len(study.grids) == 1 else row


def _base_names(study: Study) -> str:
    names = list(dict.fromkeys(_display(study, b) for b in baselines(study).values()))
    return names[0] if len(names) == 1 else "its grid's " + study.baseline.upper() + " (" + ", ".join(names) + ")"


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


def _repeated_line(study: Study, runs: dict[str, list[report.Run]], root: Path) -> list[str]:
    """Name the rows whose runs repeat another study's byte for byte (the same computation, so no new evidence)."""
    own = (root / study.folder).resolve()
    elsewhere = {}
    for path in root.glob("*/**/metrics.jsonl"):
        if own not in path.resolve().parents:
            elsewhere.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), path.parent.relative_to(root))
    repeated = []
    for label, group in runs.items():
        same = [elsewhere.get(hashlib.sha256((r.path / "metrics.jsonl").read_bytes()).hexdigest()) for r in group]
        if same and all(same):
            repeated.append(f"{label} (= `{same[0].parent}/…`)")
    if not repeated:
        return []
    return [f"Rows that repeat another study's runs byte for byte (the same computation: not new evidence): "
            f"{', '.join(repeated)}.", ""]


FIT_ACCURACY = 98.0  # train accuracy (%) at the last epoch from which a network counts as fitting its data
NEAR_FIT_ACCURACY = 95.0  # below the fit line but from here on nearly fitted; under it, early training


def _fit_line(study: Study, runs: dict[str, list[report.Run]]) -> list[str]:
    """The page's first line: which rows did not fit their training data (last-epoch train accuracy below
    :data:`FIT_ACCURACY`, mean over seeds) — their angles are those of unconverged networks."""
    final = {label: [_fit(r) for r in group if not r.failed and r.records] for label, group in runs.items()}
    under = {label: float(np.mean(v)) for label, v in final.items() if v and np.mean(v) < FIT_ACCURACY}
    what = ("training accuracy of the final model (evaluation mode, un-augmented images; the running, augmented "
            "training accuracy where a run did not measure it)")
    if not final:
        return ["No run has finished yet."]
    if not under:
        return [f"Every row fits its training data: {what} ≥ {FIT_ACCURACY:.0f} %, mean over seeds."]
    names = ", ".join(f"{label} ({acc:.1f} %)" for label, acc in under.items())
    early = [label for label, acc in under.items() if acc < NEAR_FIT_ACCURACY]
    if not early:
        reading = (f"They are within {FIT_ACCURACY - NEAR_FIT_ACCURACY:.0f} points of it: nearly, not fully, "
                   "converged networks.")
    elif len(early) == len(under):
        reading = "Their rows measure early training, not converged networks."
    else:
        reading = (f"Those under {NEAR_FIT_ACCURACY:.0f} % ({', '.join(early)}) measure early training, not "
                   "converged networks; the others are nearly converged.")
    return [f"**Not fitted** ({what} below {FIT_ACCURACY:.0f} %, mean over seeds): {names}. {reading}"]


def _fit(run: report.Run) -> float:
    last = run.records[-1]
    return float(last.get("train_eval_acc", last["train_acc"]))


# The first line of every file this module writes; a file without it (or the legacy sentence below, which the
# pages written before the marker carry) is someone else's and is never overwritten unless asked.
PAGE_MARKER = "<!-- written by l2bn.studies.page from the run folders: edits are lost when it is rebuilt -->"
_LEGACY_MARKERS = ("Generated by `l2bn.studies.page", )


class ForeignFileError(FileExistsError):
    """A page would overwrite a file that this project did not write."""


def ours(path: Path) -> bool:
    """Whether ``path`` is absent or a file that :mod:`l2bn.studies.page` wrote."""
    if not path.exists():
        return True
    if not path.is_file():
        return False
    head = path.read_text(errors="replace")
    return head.startswith(PAGE_MARKER) or any(marker in head for marker in _LEGACY_MARKERS)


def check_pages(root: str | os.PathLike, name: str, *, overwrite: bool = False) -> None:
    """Refuse, before any work, to write a study's page or the index over files the project did not write."""
    if overwrite:
        return
    for path in (Path(root) / f"{name}.md", Path(root) / "README.md"):
        _refuse_foreign(path)


def _refuse_foreign(path: Path) -> None:
    if not ours(path):
        raise ForeignFileError(f"{path} exists and was not written by l2bn; move it away, choose another --root, "
                               "or pass --overwrite to replace it")


def _write_generated(path: Path, lines: list[str], overwrite: bool) -> Path:
    if not overwrite:
        _refuse_foreign(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([PAGE_MARKER, "", *lines]).rstrip() + "\n")
    return path


def build_page(study: Study, root: str | os.PathLike, command: str, *, overwrite: bool = False) -> Path:
    """Write ``<root>/<study.name>.md`` from the study's run folders (and its report into its folder)."""
    root = Path(root)
    runs, planned = load_study_runs(study, root)
    results, paths = _results_section(study, runs, root)
    body = [f"# {study.title}", "", *_fit_line(study, runs), "",
            f"Tests the claims of the paper's {study.reproduces} on Fashion-MNIST (28×28 grey images, 10 classes, "
            "60000 training and 10000 test images) — not the paper's protocol, whose data, models and budgets differ "
            "(\"Paper vs here\" below): seeds from 121, accuracy mean ± std over seeds, intra/inter-class "
            "angles and IIR of the classifier-input features of train and test data (test intra-angles against "
            "train class centers). Generated by `l2bn.studies.page` from the run folders; no number is edited by "
            "hand.", "", *([study.notes, ""] if study.notes else [])]
    sections = {
        "## Command": _command_section(study, command, root),
        "## Machine, versions and time": _machine_section(study, runs, planned, root),
        "## Sizing": _sizing_section(study),
        "## Results": results,
        "## The paper's numbers beside ours": _paper_section(study, runs),
        "## Figures": _figures_section(study, paths, root),
        "## Beyond the paper's table": beyond.section(study, runs, root / study.folder, Path(study.folder)),
        "## Reading": _reading_section(study, runs),
    }
    for heading in SECTIONS:
        body += [heading, "", *sections[heading]]
    return _write_generated(root / f"{study.name}.md", body, overwrite)


def build_index(root: str | os.PathLike, *, overwrite: bool = False) -> Path:
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
    return _write_generated(root / "README.md", lines, overwrite)
