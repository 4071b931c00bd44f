"""Reports of a comparison grid: the paper's Table 1 (Markdown + CSV) and its training-curve figures.

Table columns (Wang et al., Table 1): per norm, test accuracy as mean ± std over seeds (the best epoch of
each run, as the paper reports), then Intra(train), Intra(test), Inter, IIR train and IIR test of the final
model (the last epoch at which the angles were measured), averaged over seeds. Standard deviations are the
sample standard deviation (ddof = 1; 0 for a single seed). Runs that diverged (``failed.json``) are left
out of the means and marked in their row, which states how many runs it averages over. Runs are grouped by
the experiment identity stored in their summary or checkpoint (not by the editable ``config.json``): one
row per experiment, labelled by its norm. Figures: test accuracy and training loss over
epochs (paper Fig. 6) and intra-angle / inter-angle / IIR over training (Fig. 1 and 7), each as the mean
over seeds with a ± std band.

Test sets that record a device per sample (TAU 2020 Mobile) add, from the confusion matrices of each run's
best epoch (``test_confusion``, :mod:`l2bn.train.confusion`): a per-device accuracy table (every device, the
groups s1–s3 and s4–s6, mean ± std over seeds; ``devices.csv``) and ``confusion.png``, the confusion
matrix of each norm summed over seeds and devices, rows normalised to the true class.
"""
from __future__ import annotations

import csv
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .config import TrainConfig
from .rundir import ANGLE_KEYS, ANGLE_TITLES, RunDir

__all__ = [
    "Run", "load_run", "find_runs", "summarize", "write_table", "plot_curves", "write_report", "TABLE_METRICS",
    "device_rows", "write_device_table", "plot_confusion", "grid_title", "mean_curve", "mean_band", "norm_colors",
    "save_figure",
]

# (key in metrics.jsonl, column title), in the paper's column order
TABLE_METRICS: tuple[tuple[str, str], ...] = tuple((key, ANGLE_TITLES[key]) for key in ANGLE_KEYS)


@dataclass
class Run:
    """One finished or partial run directory: its config, per-epoch records and summary (if finished)."""

    path: Path
    config: dict
    records: list[dict]
    summary: dict | None
    failure: dict | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None

    @property
    def norm(self) -> str:
        return str(self.config.get("norm", "?"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", -1))

    @property
    def best_acc(self) -> float:
        """The best test accuracy over epochs (selected on the test set itself)."""
        if self.summary is not None:
            return float(self.summary["best_test_acc"])
        return max(r["test_acc"] for r in self.records)

    @property
    def validated(self) -> bool:
        """Whether the run held out a validation split (its records carry ``val_acc``)."""
        return bool(self.records) and "val_acc" in self.records[0]

    @property
    def selected_acc(self) -> float:
        """The run's accuracy as reported: the test accuracy at the epoch of the best validation accuracy (the
        earliest on ties) when it held out a validation split, else :attr:`best_acc`."""
        if not self.validated:
            return self.best_acc
        return float(self.selected_record()["test_acc"])

    def selected_record(self) -> dict:
        """The epoch record :attr:`selected_acc` comes from: the best validation accuracy (the earliest on ties)
        with a validation split, else the best logged test accuracy."""
        key = "val_acc" if self.validated else "test_acc"
        return max(self.records, key=lambda r: (r[key], -r["epoch"]))

    @property
    def final_acc(self) -> float:
        """The test accuracy of the last epoch logged."""
        return float(self.records[-1]["test_acc"])

    def best_confusion(self) -> dict | None:
        """The ``test_confusion`` of the best epoch (the summary's, else the best logged one), if recorded."""
        if not any("test_confusion" in r for r in self.records):
            return None
        best = (self.summary or {}).get("best_epoch") or max(self.records, key=lambda r: r["test_acc"])["epoch"]
        return self.records[int(best) - 1].get("test_confusion") if 1 <= int(best) <= len(self.records) else None

    def final_angles(self) -> dict[str, float]:
        """Angle metrics of the last epoch that measured them (empty if none did)."""
        last = self.last_measured_record()
        return {k: float(last[k]) for k, _ in TABLE_METRICS} if last is not None else {}

    def last_measured_record(self) -> dict | None:
        """The record of the last epoch that measured the angle metrics (and the cone angles with them)."""
        measured = [r for r in self.records if "iir_train" in r]
        return measured[-1] if measured else None


def load_run(path: str | os.PathLike) -> Run:
    """Read a run folder through :class:`~l2bn.train.rundir.RunDir` (torn or edited files raise, naming them)."""
    run = RunDir(path)
    failure = run.read_failure()
    if not run.metrics_path.is_file() and failure is None:
        raise FileNotFoundError(f"{run.path} is not a run directory (no metrics.jsonl)")
    records = run.read_records()
    if not records and failure is None:
        raise ValueError(f"{run.metrics_path} holds no epoch yet")
    return Run(run.path, run.stored_config(), records, run.read_summary_if_any(), failure)


def find_runs(root: str | os.PathLike) -> list[Run]:
    """Every run directory below ``root`` that has logged an epoch or recorded a failure, sorted by path."""
    root = Path(root)
    folders = {p.parent for p in root.rglob("metrics.jsonl") if p.stat().st_size} | {
        p.parent for p in root.rglob("failed.json")}
    return [load_run(folder) for folder in sorted(folders)]


def grid_title(config: TrainConfig, seeds: Sequence[int]) -> str:
    """The report's title: dataset, model, placement and subset when not the default, epochs and seeds."""
    parts = [config.dataset, config.model]
    if config.placement != "all":
        parts.append(f"placement {config.placement}")
    if config.train_subset is not None:
        parts.append(f"{config.train_subset}-sample training subset")
    return f"{' / '.join(parts)} ({config.recipe.epochs} epochs, seeds {','.join(map(str, seeds))})"


def _experiment(run: Run) -> dict:
    """The run's experiment identity without its seed (runs of one experiment differ only in the seed)."""
    try:
        identity = TrainConfig.from_dict(run.config).identity()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{run.path}: its stored configuration is not readable ({exc})") from None
    identity.pop("seed")
    return identity


def _group(runs: Iterable[Run], norms: Sequence[str] | None) -> dict[str, list[Run]]:
    """Runs by experiment, labelled by norm; two experiments with one norm (another recipe, say) are refused."""
    groups: dict[str, list[Run]] = {}
    identities: dict[str, tuple[dict, Path]] = {}
    for run in runs:
        identity = _experiment(run)
        if run.norm in identities and identities[run.norm][0] != identity:
            other, where = identities[run.norm]
            diff = ", ".join(k for k in identity if identity[k] != other[k])
            raise ValueError(f"runs {where} and {run.path} are both {run.norm!r} but differ in {diff}; report "
                             "them separately")
        identities.setdefault(run.norm, (identity, run.path))
        groups.setdefault(run.norm, []).append(run)
    order = list(norms) if norms is not None else list(groups)
    return {n: sorted(groups[n], key=lambda r: r.seed) for n in order if n in groups}


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: Iterable[Run], norms: Sequence[str] | None = None) -> list[dict]:
    """One row per norm: the seeds averaged over (failed runs left out and listed), accuracy mean/std, and
    mean/std of every angle metric of the final models."""
    rows = []
    for norm, group in _group(runs, norms).items():
        ok = [r for r in group if not r.failed]
        accs = [r.selected_acc for r in ok]
        row: dict = {
            "norm": norm,
            "seeds": " ".join(str(r.seed) for r in ok),
            "n": len(ok),
            "failed": " ".join(str(r.seed) for r in group if r.failed),
            "acc_mean": float(np.mean(accs)) if accs else float("nan"),
            "acc_std": _std(accs) if accs else float("nan"),
        }
        finals = [r.final_angles() for r in ok]
        for key, _ in TABLE_METRICS:
            values = [f[key] for f in finals if key in f]
            row[f"{key}_mean"] = float(np.mean(values)) if values else float("nan")
            row[f"{key}_std"] = _std(values) if values else float("nan")
        rows.append(row)
    return rows


def write_table(rows: Sequence[dict], out_dir: str | os.PathLike, *, title: str | None = None) -> tuple[Path, Path]:
    """``results.md`` (the paper's Table 1 layout) and ``results.csv`` (every number) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = ["Norm", "Seeds", "Accuracy (%)"] + [title_ for _, title_ in TABLE_METRICS]
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for row in rows:
        failed = row["failed"].split()
        seeds = f"{row['n']} ({len(failed)} failed: seed {', '.join(failed)})" if failed else str(row["n"])
        cells = [row["norm"], seeds, f"{row['acc_mean']:.2f} ± {row['acc_std']:.2f}"]
        for key, _ in TABLE_METRICS:
            digits = 3 if key.startswith("iir") else 2
            cells.append(f"{row[f'{key}_mean']:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    md = out / "results.md"
    md.write_text("\n".join(lines) + "\n")
    csv_path = out / "results.csv"
    fields = ["norm", "n", "seeds", "failed", "acc_mean", "acc_std"]
    fields += [f"{k}_{s}" for k, _ in TABLE_METRICS for s in ("mean", "std")]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in fields})
    return md, csv_path


def mean_curve(group: Sequence[Run], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Epochs every run of ``group`` logged ``key`` at, with the mean and std across runs."""
    return mean_band([{r["epoch"]: r[key] for r in run.records if key in r} for run in group])


def mean_band(per_run: Sequence[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """From one ``{epoch: value}`` a run: the epochs all runs have, with the mean and std (ddof 1) across runs."""
    epochs = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    if not epochs:
        return None
    values = np.array([[d[e] for e in epochs] for d in per_run], dtype=np.float64)
    std = values.std(axis=0, ddof=1) if len(per_run) > 1 else np.zeros(len(epochs))
    return np.array(epochs), values.mean(axis=0), std


def _plot_band(ax, group: Sequence[Run], key: str, label: str, color, linestyle: str = "-") -> None:
    curve = mean_curve(group, key)
    if curve is None:
        return
    epochs, mean, std = curve
    ax.plot(epochs, mean, linestyle=linestyle, color=color, label=label, marker="." if len(epochs) < 30 else None)
    ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def norm_colors(names: Sequence[str]) -> dict[str, tuple]:
    """One distinct colour a norm: tab10 up to ten norms, tab20 up to twenty (cycling beyond)."""
    import matplotlib.pyplot as plt

    cmap, size = (plt.get_cmap("tab10"), 10) if len(names) <= 10 else (plt.get_cmap("tab20"), 20)
    return {n: cmap(i % size) for i, n in enumerate(names)}


def save_figure(fig, axes, title: str | None, path: Path, extra_handles: Sequence = ()) -> Path:
    """Grid on every panel, one legend for the figure (outside, right; its norms, plus ``extra_handles``
    such as the train/test styles), the common title; then write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    labels: dict[str, object] = {}
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    handles = list(extra_handles) + list(labels.values())
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize="small")
    if title:  # wrapped to the figure's width (about eleven characters an inch at this size)
        fig.suptitle(textwrap.fill(f"{title} (mean ± std over seeds)", width=int(fig.get_figwidth() * 11)))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


_ANGLE_PANELS = (  # (keys drawn solid for train and dashed or hollow for test, y label, title)
    (("intra_train", "intra_test"), "degrees", "Intra-class angle (smaller is better)"),
    (("inter",), "degrees", "Inter-class angle (larger is better)"),
    (("iir_train", "iir_test"), "intra / inter", "IIR (smaller is better)"),
)


def _train_test_handles(dots: bool) -> list:
    from matplotlib.lines import Line2D

    if dots:
        return [Line2D([], [], color="k", marker="o", linestyle="", label="train"),
                Line2D([], [], color="k", marker="s", markerfacecolor="none", linestyle="", label="test")]
    return [Line2D([], [], color="k", label="train"), Line2D([], [], color="k", linestyle="--", label="test")]


def _plot_angle_dots(axes, groups: dict[str, list[Run]], colors: dict[str, tuple]) -> None:
    """Angles measured at one epoch only: per norm, the mean ± std over seeds as points (train filled,
    test hollow), the norms along the x axis."""
    names = [n for n, g in groups.items() if g]
    for ax, (keys, ylabel, title) in zip(axes, _ANGLE_PANELS):
        for i, norm in enumerate(names):
            for key, offset in zip(keys, (-0.15, 0.15) if len(keys) == 2 else (0.0,)):
                curve = mean_curve(groups[norm], key)
                if curve is None:
                    continue
                _, mean, std = curve
                hollow = key.endswith("_test")
                ax.errorbar(i + offset, mean[-1], yerr=std[-1], color=colors[norm], capsize=3,
                            marker="s" if hollow else "o", markerfacecolor="none" if hollow else colors[norm])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set(ylabel=ylabel, title=title)


def _angle_epochs(groups: dict[str, list[Run]]) -> set[int]:
    return {r["epoch"] for g in groups.values() for run in g for r in run.records if "inter" in r}


def plot_curves(runs: Iterable[Run], out_dir: str | os.PathLike, norms: Sequence[str] | None = None,
                *, title: str | None = None) -> list[Path]:
    """``curves.png`` (test accuracy, training loss) and ``angles.png`` (intra, inter, IIR) in ``out_dir``.

    The angles are curves over the epochs they were measured at, or — measured at one epoch only — points
    per norm.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = {n: [r for r in g if not r.failed] for n, g in _group(runs, norms).items()}
    colors = norm_colors(list(groups))
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for norm, group in groups.items():
        _plot_band(axes[0], group, "test_acc", norm, colors[norm])
        _plot_band(axes[1], group, "train_loss", norm, colors[norm])
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    axes[1].set(xlabel="epoch", ylabel="training loss", title="Training loss", yscale="log")
    written.append(save_figure(fig, axes, title, out / "curves.png"))

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), layout="constrained")
    dots = len(_angle_epochs(groups)) <= 1
    if dots:
        _plot_angle_dots(axes, groups, colors)
    else:
        for norm, group in groups.items():
            for ax, (keys, _, _) in zip(axes, _ANGLE_PANELS):
                for key in keys:
                    _plot_band(ax, group, key, norm, colors[norm], "--" if key.endswith("_test") else "-")
        for ax, (_, ylabel, panel_title) in zip(axes, _ANGLE_PANELS):
            ax.set(xlabel="epoch", ylabel=ylabel, title=panel_title)
    written.append(save_figure(fig, axes, title, out / "angles.png", _train_test_handles(dots)))
    return written


def _device_columns(confusions: Sequence[dict]) -> list[tuple[str, tuple[str, ...]]]:
    """(column, devices) pairs: each device seen, then the DCASE groups whose devices are all present."""
    from ..data.tau2020 import DEVICE_GROUPS

    names = sorted({g for c in confusions for g in c["groups"]})
    columns = [(name, (name,)) for name in names]
    columns += [(group, members) for group, members in DEVICE_GROUPS.items() if set(members) <= set(names)]
    return columns


def device_rows(runs: Iterable[Run], norms: Sequence[str] | None = None) -> list[dict]:
    """Per norm: accuracy (%) per device and device group at each run's best epoch, mean and std over seeds
    (empty when no run recorded a confusion matrix)."""
    groups = {n: [r for r in g if not r.failed and r.best_confusion() is not None]
              for n, g in _group(runs, norms).items()}
    confusions = [r.best_confusion() for g in groups.values() for r in g]
    if not confusions:
        return []
    columns = _device_columns(confusions)
    rows = []
    from .confusion import group_accuracy

    for norm, group in groups.items():
        row: dict = {"norm": norm, "n": len(group)}
        for column, members in columns:
            values = [group_accuracy(r.best_confusion(), members) for r in group]
            values = [v for v in values if np.isfinite(v)]
            row[f"{column}_mean"] = float(np.mean(values)) if values else float("nan")
            row[f"{column}_std"] = _std(values) if values else float("nan")
        rows.append(row)
    return rows


def write_device_table(rows: Sequence[dict], out_dir: str | os.PathLike) -> tuple[str, Path]:
    """The per-device accuracy table as Markdown (returned) and ``devices.csv`` in ``out_dir``."""
    columns = [k[: -len("_mean")] for k in rows[0] if k.endswith("_mean")]
    lines = ["| Norm | Seeds | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = [f"{row[f'{c}_mean']:.2f} ± {row[f'{c}_std']:.2f}" for c in columns]
        lines.append(f"| {row['norm']} | {row['n']} | " + " | ".join(cells) + " |")
    csv_path = Path(out_dir) / "devices.csv"
    fields = ["norm", "n"] + [f"{c}_{s}" for c in columns for s in ("mean", "std")]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in fields})
    return "\n".join(lines), csv_path


def plot_confusion(runs: Iterable[Run], out_dir: str | os.PathLike, norms: Sequence[str] | None = None,
                   *, title: str | None = None) -> Path | None:
    """``confusion.png``: per norm, the best-epoch confusion matrices summed over seeds and devices, each row
    divided by its true-class count (``None`` when no run recorded one)."""
    groups = {n: [r.best_confusion() for r in g if not r.failed and r.best_confusion() is not None]
              for n, g in _group(runs, norms).items()}
    groups = {n: c for n, c in groups.items() if c}
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    classes = next(iter(groups.values()))[0]["classes"]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 5), constrained_layout=True, squeeze=False)
    for ax, (norm, confusions) in zip(axes[0], groups.items()):
        counts = sum(np.asarray(c["counts"], dtype=np.float64).sum(axis=0) for c in confusions)
        rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(rates, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set(xlabel="predicted", ylabel="true", title=f"{norm} ({len(confusions)} seed(s))")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    if title:
        fig.suptitle(f"{title}: confusion at the best epoch")
    path = Path(out_dir) / "confusion.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(runs: Sequence[Run], out_dir: str | os.PathLike, norms: Sequence[str] | None = None,
                 *, title: str | None = None) -> dict[str, Path]:
    """Table (Markdown + CSV) and figures for ``runs`` in ``out_dir``; returns the written paths by kind."""
    if not runs:
        raise ValueError("no runs to report")
    rows = summarize(runs, norms)
    md, csv_path = write_table(rows, out_dir, title=title)
    curves, angles = plot_curves(runs, out_dir, norms, title=title)
    failed = sum(len(r["failed"].split()) for r in rows)
    note = (f" {failed} run(s) diverged and are left out of the means (see their failed.json); the Seeds column "
            "counts the runs each row averages over." if failed else "")
    with open(md, "a") as f:
        chosen = ("test accuracy at the epoch of the best validation accuracy" if runs[0].validated
                  else "best test accuracy")
        f.write(f"\nAccuracy: {chosen} of each run, mean ± sample std over seeds. Angles (degrees) and "
                f"IIR: final model, mean over seeds; test intra-angles use the train class centers.{note}\n\n"
                f"![accuracy and loss]({curves.name})\n\n![angles]({angles.name})\n")
    paths = {"markdown": md, "csv": csv_path, "curves": curves, "angles": angles}
    devices = device_rows(runs, norms)
    if devices:
        table, paths["devices"] = write_device_table(devices, out_dir)
        paths["confusion"] = plot_confusion(runs, out_dir, norms, title=title)
        with open(md, "a") as f:
            f.write(f"\n### Accuracy per device (%)\n\nBest epoch of each run, mean ± sample std over seeds; "
                    f"s1-s3 and s4-s6 pool their devices' clips.\n\n{table}\n\n"
                    f"![confusion]({paths['confusion'].name})\n")
    return paths
