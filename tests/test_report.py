"""Report: Table 1 numbers from synthetic run directories against independent statistics; figures written."""
from __future__ import annotations

import csv
import json
import statistics

import pytest
from PIL import Image

from l2bn.train import report

KEYS = ("intra_train", "intra_test", "inter", "iir_train", "iir_test")


def _fake_run(root, norm, seed, accs, angle_every=2, complete=True):
    """A run directory as the engine writes it, with made-up but known numbers."""
    path = root / "runs" / f"{norm}-s{seed}"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"norm": norm, "seed": seed}))
    recs = []
    for epoch, acc in enumerate(accs, start=1):
        rec = {"epoch": epoch, "train_loss": 2.0 / epoch + seed * 1e-3, "test_acc": acc}
        if epoch % angle_every == 0 or epoch == len(accs):
            intra = 30.0 - epoch - seed % 7
            rec.update(intra_train=intra, intra_test=intra + 1.5, inter=60.0 + seed % 5)
            rec.update(iir_train=rec["intra_train"] / rec["inter"], iir_test=rec["intra_test"] / rec["inter"])
        recs.append(rec)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if complete:
        best = max(accs)
        (path / "summary.json").write_text(json.dumps({"best_test_acc": best, "final": recs[-1]}))
    return path, recs


@pytest.fixture
def grid(tmp_path):
    made = {}
    for norm, base in (("bn", 80.0), ("l2bn", 82.0)):
        for seed in (121, 122, 123):
            accs = [base - 10 + seed % 3, base + seed % 4, base - 1 + seed % 2]
            made[(norm, seed)] = _fake_run(tmp_path, norm, seed, accs)
    return tmp_path, made


def test_summarize_matches_independent_statistics(grid):
    root, made = grid
    rows = report.summarize(report.find_runs(root), norms=["l2bn", "bn"])
    assert [r["norm"] for r in rows] == ["l2bn", "bn"]  # requested order
    for row in rows:
        recs = [made[(row["norm"], s)][1] for s in (121, 122, 123)]
        best = [max(r["test_acc"] for r in rec) for rec in recs]
        assert row["acc_mean"] == pytest.approx(statistics.mean(best))
        assert row["acc_std"] == pytest.approx(statistics.stdev(best))  # sample std
        for key in KEYS:
            finals = [rec[-1][key] for rec in recs]
            assert row[f"{key}_mean"] == pytest.approx(statistics.mean(finals))
            assert row[f"{key}_std"] == pytest.approx(statistics.stdev(finals))
        assert row["n"] == 3 and row["seeds"] == "121 122 123"


def test_partial_run_uses_logged_best_and_last_measured_angles(tmp_path):
    _, recs = _fake_run(tmp_path, "bn", 5, [50.0, 70.0, 60.0, 65.0], angle_every=2, complete=False)
    recs[-1] = {k: v for k, v in recs[-1].items() if k not in KEYS}  # epoch 4 measured nothing
    (tmp_path / "runs" / "bn-s5" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (row,) = report.summarize(report.find_runs(tmp_path))
    assert row["acc_mean"] == 70.0 and row["acc_std"] == 0.0
    assert row["intra_train_mean"] == recs[1]["intra_train"]  # epoch 2, the last measured


def test_table_and_csv_have_the_paper_columns(grid):
    root, _ = grid
    md, csv_path = report.write_table(report.summarize(report.find_runs(root)), root / "out", title="demo")
    lines = md.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| Norm"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Norm", "Seeds", "Accuracy (%)", "Intra(train)", "Intra(test)", "Inter", "IIR train", "IIR test"]
    bn_line = next(line for line in lines if line.startswith("| bn "))
    rows = {r["norm"]: r for r in csv.DictReader(open(csv_path))}
    acc = f"{float(rows['bn']['acc_mean']):.2f} ± {float(rows['bn']['acc_std']):.2f}"
    assert acc in bn_line
    assert set(rows) == {"bn", "l2bn"} and float(rows["l2bn"]["iir_test_mean"]) > 0


def test_figures_are_pngs_with_content(grid):
    root, _ = grid
    paths = report.write_report(report.find_runs(root), root / "out", ["bn", "l2bn"], title="demo")
    for key in ("curves", "angles"):
        img = Image.open(paths[key])
        assert img.format == "PNG" and img.size[0] > 600
        # not blank: plotted lines give many distinct colours
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 50
    assert "![angles](angles.png)" in paths["markdown"].read_text()


def test_curve_mean_and_band_over_common_epochs(grid):
    root, made = grid
    runs = [r for r in report.find_runs(root) if r.norm == "bn"]
    epochs, mean, std = report.mean_curve(runs, "intra_test")
    assert list(epochs) == [2, 3]
    values = [[made[("bn", s)][1][e - 1]["intra_test"] for s in (121, 122, 123)] for e in (2, 3)]
    assert list(mean) == pytest.approx([statistics.mean(v) for v in values])
    assert list(std) == pytest.approx([statistics.stdev(v) for v in values])


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        report.load_run(tmp_path)
    with pytest.raises(ValueError, match="no runs"):
        report.write_report([], tmp_path)
