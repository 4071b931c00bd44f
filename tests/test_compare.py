"""l2bn.train.compare (l2bn.train.grid): the grid as a library call — failures recorded and skipped, busy runs, another
experiment in the folder, --jobs giving the sequential records, --train-subset, identity-based reports."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from l2bn.data import build_data
from l2bn.data.subset import stratified_indices, stratified_subset
from l2bn.train import RunDir, TrainConfig, compare, engine, report
from l2bn.train.recipes import get_recipe
from nan_injection import NaNAfter

torch.set_num_threads(1)


def base(**kw) -> TrainConfig:
    recipe = get_recipe("digits-quick", epochs=kw.pop("epochs", 1), batch_size=128, metrics_every=1)
    return TrainConfig(recipe=recipe, device="cpu", threads=1, **{"progress": False, **kw})


def quiet(msg: str) -> None:
    pass


def _diverge(monkeypatch, norm: str, seed: int) -> None:
    """Make exactly the (norm, seed) run produce a NaN loss at epoch 1, step 2."""
    real = engine.train_one_epoch

    def train_one_epoch(state, epoch, progress):
        if (state.config.norm, state.config.seed, epoch) == (norm, seed, 1):
            state.model = NaNAfter(state.model, 2)  # NaN from the first epoch's second step on
        return real(state, epoch, progress)

    monkeypatch.setattr(engine, "train_one_epoch", train_one_epoch)


def test_a_failed_run_does_not_stop_the_grid_and_is_not_retried_unless_asked(tmp_path, monkeypatch):
    out = tmp_path / "grid"
    _diverge(monkeypatch, "l2bn", 122)
    result = compare(base(), ["bn", "l2bn"], [121, 122], out, log=quiet)
    assert [(f["norm"], f["seed"], f["epoch"], f["step"]) for f in result.failed] == [("l2bn", 122, 1, 2)]
    assert len(result.trained) == 3 and result.complete
    rows = {r["norm"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows["l2bn"]["n"] == "1" and rows["l2bn"]["failed"] == "122" and rows["bn"]["failed"] == ""
    md = (out / "results.md").read_text()
    assert "| l2bn | 1 (1 failed: seed 122) |" in md and "1 run(s) diverged" in md
    # the report averages l2bn over the one good run
    good = json.loads((out / "runs" / "l2bn-s121" / "summary.json").read_text())["best_test_acc"]
    assert float(rows["l2bn"]["acc_mean"]) == pytest.approx(good)
    # a rerun skips the recorded failure; --retry-failed retries it (here it no longer diverges)
    monkeypatch.undo()
    again = compare(base(), ["bn", "l2bn"], [121, 122], out, log=quiet)
    assert not again.trained and len(again.failed) == 1
    retried = compare(base(), ["bn", "l2bn"], [121, 122], out, retry_failed=True, log=quiet)
    assert [p.name for p in retried.trained] == ["l2bn-s122"] and not retried.failed
    assert not (out / "runs" / "l2bn-s122" / "failed.json").exists()
    rows = {r["norm"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows["l2bn"]["n"] == "2" and rows["l2bn"]["failed"] == ""


def test_a_run_busy_in_another_process_is_skipped_and_no_report_is_written(tmp_path):
    out = tmp_path / "grid"
    busy = RunDir(out / "runs" / "bn-s121")
    busy.path.mkdir(parents=True)
    messages = []
    with busy.lock():
        result = compare(base(), ["bn", "l2bn"], [121], out, log=messages.append)
    assert result.busy == [busy.path] and [p.name for p in result.trained] == ["l2bn-s121"]
    assert not result.complete and not (out / "results.md").exists()
    assert any("being trained by another process" in m for m in messages)


def test_a_folder_holding_another_experiment_is_refused_before_any_work(tmp_path):
    out = tmp_path / "grid"
    compare(base(), ["bn"], [121], out, log=quiet)
    stamp = (out / "runs" / "bn-s121" / "last.pt").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"bn-s121 holds another experiment \(recipe: stored .*epochs.: 1"):
        compare(base(epochs=2), ["l2bn", "bn"], [121], out, log=quiet)
    assert not (out / "runs" / "l2bn-s121").exists()
    assert (out / "runs" / "bn-s121" / "last.pt").stat().st_mtime_ns == stamp


def test_parallel_jobs_give_the_sequential_records(tmp_path, capsys):
    """--jobs 2: separate spawned processes, the same metrics.jsonl bytes as the sequential grid, one bar."""
    seq = compare(base(), ["bn", "l2bn"], [121], tmp_path / "seq", log=quiet)
    par = compare(base(progress=True), ["bn", "l2bn"], [121], tmp_path / "par", jobs=2, log=quiet)
    assert seq.complete and par.complete and len(par.trained) == 2
    err = capsys.readouterr().err
    assert "grid (2 jobs)" in err and "2/2" in err and err.count("] epoch 1/1") == 2  # the runs' lines, relayed
    for name in ("bn-s121", "l2bn-s121"):
        a = (tmp_path / "seq" / "runs" / name / "metrics.jsonl").read_bytes()
        b = (tmp_path / "par" / "runs" / name / "metrics.jsonl").read_bytes()
        assert a == b and a.count(b"\n") == 1
    assert (tmp_path / "seq" / "results.csv").read_text() == (tmp_path / "par" / "results.csv").read_text()


def test_jobs_value_is_checked(tmp_path):
    with pytest.raises(ValueError, match="jobs must be >= 1, got 0"):
        compare(base(), ["bn"], [121], tmp_path / "g", jobs=0, log=quiet)
    assert not (tmp_path / "g").exists()


def test_half_finished_grid_resumes_to_the_same_report(tmp_path):
    full = compare(base(epochs=2), ["bn"], [121, 122], tmp_path / "full", log=quiet)
    half = compare(base(epochs=2), ["bn"], [121, 122], tmp_path / "half", stop_after=1, log=quiet)
    assert half.stopped and not half.complete
    done = compare(base(epochs=2), ["bn"], [121, 122], tmp_path / "half", log=quiet)
    assert done.complete and full.complete
    assert (tmp_path / "half" / "results.csv").read_text() == (tmp_path / "full" / "results.csv").read_text()


def test_report_uses_the_stored_identity_not_an_edited_config(tmp_path):
    out = tmp_path / "grid"
    compare(base(), ["bn", "l2bn"], [121], out, log=quiet)
    edited = out / "runs" / "l2bn-s121" / "config.json"
    edited.write_text(json.dumps({**json.loads(edited.read_text()), "norm": "bn"}))
    runs = [report.load_run(p) for p in sorted((out / "runs").iterdir())]
    assert [r.norm for r in runs] == ["bn", "l2bn"]
    # two experiments under one norm label are not averaged together
    other = compare(base(epochs=2), ["bn"], [122], tmp_path / "other", log=quiet)
    mixed = runs + [report.load_run(other.run_dirs[0])]
    with pytest.raises(ValueError, match=r"both 'bn' but differ in recipe"):
        report.summarize(mixed)


# ----------------------------------------------------------------------------------------- --train-subset
def test_stratified_indices_keep_class_shares_and_are_seeded():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    chosen = stratified_indices(labels, 50, seed=0)
    assert len(chosen) == 50 and list(chosen) == sorted(set(chosen))
    counts = np.bincount(labels[chosen], minlength=4)
    assert np.all(np.abs(counts - np.array([25, 12.5, 7.5, 5])) <= 1)
    assert list(stratified_indices(labels, 50, seed=0)) == list(chosen)
    assert list(stratified_indices(labels, 50, seed=1)) != list(chosen)
    assert list(stratified_indices(labels, 200)) == list(range(200))
    for bad in (3, 201):
        with pytest.raises(ValueError, match=rf"number of classes \(4\) and the training set size \(200\), got {bad}"):
            stratified_indices(labels, bad)


def test_train_subset_trains_on_the_subset_and_is_part_of_the_identity(tmp_path):
    digits = build_data("digits")
    train_view, eval_view = stratified_subset((digits.train, digits.train_eval), 300)
    assert len(train_view) == len(eval_view) == 300 and train_view.indices == eval_view.indices
    out = tmp_path / "sub"
    result = compare(base(train_subset=300), ["bn"], [121], out, log=quiet)
    timing = json.loads((out / "runs" / "bn-s121" / "timing.jsonl").read_text())
    assert timing["train_seconds"] > 0 and result.complete
    ckpt = torch.load(out / "runs" / "bn-s121" / "last.pt", weights_only=True)
    assert ckpt["config"]["train_subset"] == 300
    summary = json.loads((out / "runs" / "bn-s121" / "summary.json").read_text())
    assert summary["config"]["train_subset"] == 300 and "300-sample training subset" in (out / "results.md").read_text()
    with pytest.raises(ValueError, match=r"train_subset: stored 300 vs now 400"):
        compare(base(train_subset=400), ["bn"], [121], out, log=quiet)
    # 300 samples at batch 128 are 2 steps an epoch: the run really saw the subset
    records = [json.loads(x) for x in (out / "runs" / "bn-s121" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    assert timing["train_images_per_second"] == pytest.approx(256 / timing["train_seconds"])
