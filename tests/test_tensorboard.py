"""TensorBoard event files of a run: what the records hold, read back, once per epoch after a resume."""
from __future__ import annotations

import json

import pytest
import torch

from l2bn.data import build_data
from l2bn.train import TrainConfig, train
from l2bn.train.recipes import get_recipe
from l2bn.train.tensorboard import TENSORBOARD_DIR, scalars, write_record
from test_engine import tiny

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

torch.set_num_threads(1)
DIGITS = build_data("digits")
RECIPE = get_recipe("digits-quick", epochs=4, batch_size=64, lr=0.1, metrics_every=2, norm_spread=True)


def run(out, **kw):
    config = TrainConfig(out=str(out), norm="l2bn", recipe=RECIPE, progress=False, resume=kw.pop("resume", False))
    return train(config, model_fn=tiny, data=DIGITS, log=lambda m: None, **kw)


def events(out) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(out / TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(out) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list[tuple[int, float]]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for tag, value in scalars(record):
            found.setdefault(tag, []).append((record["epoch"], value))
    return found


def assert_same(got, want):
    assert set(got) == set(want)
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=1e-6, abs=1e-7), tag


def test_scalars_flatten_dicts_and_lists_and_skip_the_epoch_and_confusion_counts():
    record = {"epoch": 3, "lr": 0.5, "test_confusion": {"a": [[1, 0], [0, 1]]}, "norm_cv": {"0.bn": 0.25}, "test_class_acc": [90.0, 80.0], "flag": True}
    assert dict(scalars(record)) == {"lr": 0.5, "norm_cv/0.bn": 0.25, "test_class_acc/0": 90.0,
                                     "test_class_acc/1": 80.0}


def test_a_run_writes_its_records_as_events(tmp_path):
    run(tmp_path / "run")
    got = events(tmp_path / "run")
    assert {"lr", "train_loss", "train_acc", "test_acc", "intra_train", "iir_test", "cone_train"} <= set(got)
    assert any(tag.startswith("norm_cv/") for tag in got)
    assert [s for s, _ in got["train_loss"]] == [1, 2, 3, 4] and [s for s, _ in got["inter"]] == [2, 4]
    assert_same(got, expected(tmp_path / "run"))


def test_resume_shows_every_epoch_once(tmp_path):
    out = tmp_path / "part"
    run(out, stop_after=2)
    # a killed run may have logged an epoch it never checkpointed: resume replaces it
    write_record(out, {"epoch": 3, "test_acc": -1.0, "train_loss": 99.0})
    run(out, resume=True)
    assert_same(events(out), expected(out))
    assert [s for s, _ in events(out)["test_acc"]] == [1, 2, 3, 4]
