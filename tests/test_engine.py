"""Training engine: logged records, checkpoints, exact resume, NaN stop, metrics against float64 formulas, DDP."""
from __future__ import annotations

import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from l2bn.data import build_data
from l2bn.train.report import load_run
from l2bn.norms import get_norm_layer
from l2bn.train import NonFiniteLossError, TrainConfig, analyze_checkpoint, evaluate, train
from l2bn.train.recipes import get_recipe
from nan_injection import NaNAfter

torch.set_num_threads(1)
DIGITS = build_data("digits")


def tiny(num_classes: int, in_channels: int, norm: str) -> nn.Module:
    """Conv → norm → ReLU → pool → Linear: small enough for many epochs in a test."""
    norm_layer = get_norm_layer(norm)
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), norm_layer(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes),
    )


def quick(**overrides):
    base = dict(epochs=3, batch_size=64, lr=0.1, metrics_every=2)
    base.update(overrides)
    return get_recipe("digits-quick", **base)


def run(tmp_path, name="run", recipe=None, norm="l2bn", **kw):
    config = TrainConfig(out=str(tmp_path / name), norm=norm, recipe=recipe or quick(), progress=False)
    return train(config, model_fn=tiny, data=DIGITS, log=lambda m: None, **kw), tmp_path / name


def records(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_records_checkpoints_and_summary(tmp_path):
    summary, out = run(tmp_path)
    recs = records(out)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    # angle metrics at metrics_every=2 and at the last epoch only
    assert ["iir_train" in r for r in recs] == [False, True, True]
    for r in recs:
        assert 0 <= r["test_acc"] <= 100 and math.isfinite(r["train_loss"])
    assert recs[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine reaches 0 at the last step
    best = max(recs, key=lambda r: r["test_acc"])
    assert summary["best_test_acc"] == best["test_acc"] and summary["best_epoch"] == best["epoch"]
    assert json.loads((out / "summary.json").read_text())["best_test_acc"] == best["test_acc"]
    config = json.loads((out / "config.json").read_text())
    assert config["norm"] == "l2bn" and config["recipe"]["epochs"] == 3
    last = torch.load(out / "last.pt", weights_only=False)
    best_ckpt = torch.load(out / "best.pt", weights_only=False)
    assert last["epoch"] == 3 and best_ckpt["epoch"] == best["epoch"]
    assert {"optimizer", "scheduler", "scaler"} <= set(last) and "optimizer" not in best_ckpt
    assert not list(out.glob("*.tmp"))
    # the training loss actually goes down
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]


def test_resume_after_interruption_is_identical(tmp_path):
    recipe = quick(epochs=4)
    _, full = run(tmp_path, "full", recipe)
    stopped, part = run(tmp_path, "part", recipe, stop_after=2)
    assert stopped["stopped_after"] == 2 and not (part / "summary.json").exists()
    assert [r["epoch"] for r in records(part)] == [1, 2]
    # a killed run may have logged an epoch it never checkpointed: resume must drop it
    with open(part / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 3, "test_acc": -1}) + "\n")
    config = TrainConfig(out=str(part), norm="l2bn", recipe=recipe, progress=False, resume=True)
    train(config, model_fn=tiny, data=DIGITS, log=lambda m: None)
    assert (part / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()
    a = torch.load(full / "last.pt", weights_only=False)["model"]
    b = torch.load(part / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _old_schedule_state(steps: int) -> dict:
    """The schedule state of a last.pt written before 515a00f: a LambdaLR's, ``steps`` steps in."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return scheduler.state_dict()


@pytest.mark.parametrize("schedule", [dict(warmup_epochs=1), dict(warmup_epochs=1, schedule="step", milestones=[2, 3])])
def test_a_checkpoint_with_an_unreadable_schedule_state_resumes_on_the_replayed_schedule(schedule, tmp_path):
    """A warm-up run's last.pt written before the schedules became torch's (a LambdaLR's state, which torch's
    SequentialLR cannot load) resumes with a warning, on this version's schedule stepped through the finished
    epochs: the records equal an uninterrupted run's."""
    recipe = quick(epochs=4, **schedule)
    _, full = run(tmp_path, "full", recipe)
    run(tmp_path, "part", recipe, stop_after=2)
    last = tmp_path / "part" / "last.pt"
    ckpt = torch.load(last, weights_only=False)
    ckpt["scheduler"] = _old_schedule_state(2 * (len(DIGITS.train) // 64))
    torch.save(ckpt, last)
    config = TrainConfig(out=str(tmp_path / "part"), norm="l2bn", recipe=recipe, progress=False, resume=True)
    with pytest.warns(RuntimeWarning, match="schedule state was written by an older l2bn"):
        train(config, model_fn=tiny, data=DIGITS, log=lambda m: None)
    assert (tmp_path / "part" / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()


def test_resume_with_loader_workers_is_identical(tmp_path):
    """Worker processes draw the augmentation (random crops here): a resumed run's workers must draw what an
    uninterrupted run's would, so they are seeded from (seed, epoch) every epoch."""
    recipe = quick(epochs=3, metrics_every=3)

    def go(name, resume=False, stop_after=None):
        config = TrainConfig(out=str(tmp_path / name), norm="l2bn", recipe=recipe, progress=False, workers=2,
                             resume=resume)
        train(config, model_fn=tiny, data=DIGITS, log=lambda m: None, stop_after=stop_after)
        return tmp_path / name

    full = go("full")
    go("part", stop_after=1)
    part = go("part", resume=True)
    assert (part / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()


def test_existing_run_needs_resume_and_same_experiment(tmp_path):
    run(tmp_path, stop_after=1)
    with pytest.raises(FileExistsError, match="--resume"):
        run(tmp_path)
    config = TrainConfig(out=str(tmp_path / "run"), norm="bn", recipe=quick(), progress=False, resume=True)
    with pytest.raises(ValueError, match="norm: checkpoint 'l2bn' vs now 'bn'"):
        train(config, model_fn=tiny, data=DIGITS, log=lambda m: None)


def test_nonfinite_loss_stops_naming_epoch_and_step(tmp_path):
    steps = len(DIGITS.train) // 64  # 21
    config = TrainConfig(out=str(tmp_path / "nan"), recipe=quick(), progress=False)
    make = lambda **kw: NaNAfter(tiny(**kw), steps + 3)  # noqa: E731 - step 3 of epoch 2
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3 of 21.*last\.pt \(epoch 1\)"):
        train(config, model_fn=make, data=DIGITS, log=lambda m: None)
    assert torch.load(tmp_path / "nan" / "last.pt", weights_only=False)["epoch"] == 1
    assert len(records(tmp_path / "nan")) == 1


def _angle(u, v):
    cos = np.clip(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)), -1.0, 1.0)
    return math.degrees(math.acos(cos))


def test_evaluate_matches_float64_formulas():
    torch.manual_seed(0)
    model = tiny(10, 1, "bn")
    model.train()
    for _ in range(3):  # non-trivial running statistics
        model(torch.randn(32, 1, 8, 8))
    loader = lambda ds, b: torch.utils.data.DataLoader(ds, batch_size=b)  # noqa: E731
    got = evaluate(model, loader(DIGITS.test, 100), loader(DIGITS.train_eval, 128), num_classes=10,
                   device=torch.device("cpu"))
    assert model.training  # mode restored

    def feats(ds):
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = np.array([ds[i][1] for i in range(len(ds))])
        model.eval()
        with torch.no_grad():
            f = model[:-1](x).double().numpy()
            logits = model(x).double()
        model.train()
        return f, y, logits

    ftr, ytr, _ = feats(DIGITS.train_eval)
    fte, yte, logits = feats(DIGITS.test)
    units = ftr / np.linalg.norm(ftr, axis=1, keepdims=True)
    centers = np.stack([units[ytr == c].mean(0) for c in range(10)])
    intra_train = np.mean([_angle(f, centers[c]) for f, c in zip(ftr, ytr)])
    intra_test = np.mean([_angle(f, centers[c]) for f, c in zip(fte, yte)])
    inter = np.mean([min(_angle(centers[i], centers[j]) for j in range(10) if j != i) for i in range(10)])
    assert got["intra_train"] == pytest.approx(intra_train, rel=1e-5)
    assert got["intra_test"] == pytest.approx(intra_test, rel=1e-5)
    assert got["inter"] == pytest.approx(inter, rel=1e-5)
    assert got["iir_train"] == pytest.approx(intra_train / inter, rel=1e-5)
    assert got["iir_test"] == pytest.approx(intra_test / inter, rel=1e-5)
    acc = 100.0 * (logits.argmax(1).numpy() == yte).mean()
    assert got["test_acc"] == pytest.approx(acc)
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(yte)).item()
    assert got["test_loss"] == pytest.approx(loss, rel=1e-5)


def test_analyze_checkpoint_reproduces_logged_metrics(tmp_path):
    _, out = run(tmp_path)
    got = analyze_checkpoint(out / "last.pt", model_fn=tiny, data=DIGITS)
    last = records(out)[-1]
    for key in ("test_acc", "intra_train", "intra_test", "inter", "iir_test"):
        assert got[key] == pytest.approx(last[key], rel=1e-6)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        analyze_checkpoint(out / "missing.pt", model_fn=tiny, data=DIGITS)


def test_regnet_style_recipe_and_bf16_autocast_run(tmp_path):
    recipe = quick(epochs=2, warmup_epochs=1, mixup_alpha=0.5, label_smoothing=0.1, metrics_every=1)
    config = TrainConfig(out=str(tmp_path / "mix"), norm="l2bn", recipe=recipe, progress=False, amp="bf16")
    summary = train(config, model_fn=tiny, data=DIGITS, log=lambda m: None)
    recs = records(tmp_path / "mix")
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["iir_test"]) for r in recs)
    # warm-up: after epoch 1 the lr is exactly the peak, then cosine reaches 0
    assert recs[0]["lr"] == pytest.approx(0.1, rel=1e-6) and recs[1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert summary["best_test_acc"] > 10.0


def test_bad_config_values():
    with pytest.raises(ValueError, match="amp must be one of"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="workers"):
        TrainConfig(workers=-1)


# ------------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, norm: str, sync_bn: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    recipe = get_recipe("digits-quick", epochs=2, batch_size=64, metrics_every=1)
    config = TrainConfig(out=out, norm=norm, model="resnet20", recipe=recipe, device="cpu", progress=False,
                         sync_bn=sync_bn)
    train(config, log=lambda m: None)


@pytest.mark.parametrize("norm,sync_bn", [("bn", False), ("l2bn", True)])
def test_ddp_two_gloo_processes_rank0_writes_and_metrics_cover_all_data(tmp_path, norm, sync_bn):
    out = tmp_path / "ddp"
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(out), norm, sync_bn), nprocs=2, start_method="spawn")
    recs = records(out)
    assert [r["epoch"] for r in recs] == [1, 2]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    written = sorted(p.name for p in out.iterdir() if p.name != "tensorboard")  # events: with the extra only
    assert written == sorted(["best.pt", "config.json", "last.pt", "metrics.jsonl", "summary.json", "timing.jsonl"])
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert not any("module." in k for k in ckpt["model"])  # unwrapped from DDP
    # a single process on the whole test / train sets gives the numbers the two ranks reduced
    got = analyze_checkpoint(out / "last.pt", device="cpu")
    for key in ("test_acc", "test_loss", "intra_train", "intra_test", "inter"):
        assert got[key] == pytest.approx(recs[-1][key], rel=1e-5), key


def test_progress_bar_reports_throughput(tmp_path, capsys):
    config = TrainConfig(out=str(tmp_path / "p"), norm="bn", recipe=quick(epochs=1), progress=True)
    train(config, model_fn=tiny, data=DIGITS, log=lambda m: None)
    err = capsys.readouterr().err
    assert "img/s" in err and "epoch 1/1" in err
    timing = json.loads((tmp_path / "p" / "timing.jsonl").read_text())
    assert timing["train_images_per_second"] == pytest.approx(21 * 64 / timing["train_seconds"])


def _flag_run(tmp_path, name, **flags):
    config = TrainConfig(out=str(tmp_path / name), norm="l2bn", recipe=quick(epochs=1, metrics_every=1),
                         progress=False, **flags)
    train(config, model_fn=tiny, data=DIGITS, log=lambda m: None)
    return records(tmp_path / name)[-1], json.loads((tmp_path / name / "config.json").read_text())


@pytest.mark.parametrize("flags,rel", [({"channels_last": True}, 1e-5), ({"amp": "fp16"}, 2e-3)])
def test_execution_flags_train_the_same_model(tmp_path, flags, rel):
    """--channels-last changes only the memory layout; --amp fp16 (autocast + gradient scaler) stays close."""
    plain, _ = _flag_run(tmp_path, "plain")
    got, config = _flag_run(tmp_path, "flagged", **flags)
    assert all(config[k] == v for k, v in flags.items())
    for key in ("train_loss", "test_loss", "intra_train", "intra_test", "inter", "iir_test"):
        assert got[key] == pytest.approx(plain[key], rel=rel), key
    weight = torch.load(tmp_path / "flagged" / "last.pt", weights_only=False)["model"]["0.weight"]
    if "channels_last" in flags:  # the flag did reach the model
        assert weight.stride() == weight.contiguous(memory_format=torch.channels_last).stride() != (9, 9, 3, 1)
    else:  # half-precision convolutions did run: close to, but not bit-equal with, float32
        assert got["train_loss"] != plain["train_loss"]


@pytest.mark.slow
def test_compiled_model_trains_the_same_and_the_feature_hook_still_fires(tmp_path):
    plain, _ = _flag_run(tmp_path, "plain")
    got, config = _flag_run(tmp_path, "compiled", compile=True)
    assert config["compile"] is True
    for key in ("train_loss", "test_acc", "intra_train", "intra_test", "inter"):
        assert got[key] == pytest.approx(plain[key], rel=1e-5), key


# ------------------------------------------------------------------------------------------------ faults
def test_diverged_run_is_recorded_as_failed_in_its_folder(tmp_path):
    config = TrainConfig(out=str(tmp_path / "nan"), norm="l2bn", seed=7, recipe=quick(), progress=False)
    make = lambda **kw: NaNAfter(tiny(**kw), 21 + 3)  # noqa: E731 - step 3 of epoch 2
    with pytest.raises(NonFiniteLossError, match=r"^\[l2bn seed 7\] non-finite"):
        train(config, model_fn=make, data=DIGITS, log=lambda m: None)
    failure = json.loads((tmp_path / "nan" / "failed.json").read_text())
    assert {k: failure[k] for k in ("norm", "seed", "epoch", "step")} == {"norm": "l2bn", "seed": 7, "epoch": 2, "step": 3}
    assert "non-finite training loss" in failure["reason"]
    # a retry (resume) clears the record and starts from the last good checkpoint
    config.resume = True
    train(config, model_fn=lambda **kw: NaNAfter(tiny(**kw), 10**9), data=DIGITS, log=lambda m: None)
    assert not (tmp_path / "nan" / "failed.json").exists() and [r["epoch"] for r in records(tmp_path / "nan")] == [1, 2, 3]


class Collapse(nn.Module):
    """The tiny model with its classifier input multiplied by zero: no feature has a direction."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner[-1](self.inner[:-1](x) * 0.0)


def test_collapsed_features_give_nan_angles_with_a_warning_and_the_epoch_is_checkpointed(tmp_path):
    config = TrainConfig(out=str(tmp_path / "zero"), norm="bn", recipe=quick(epochs=1, metrics_every=1), progress=False)
    with pytest.warns(RuntimeWarning, match="angle metrics undefined, logged as NaN"):
        train(config, model_fn=lambda **kw: Collapse(tiny(**kw)), data=DIGITS, log=lambda m: None)
    (rec,) = records(tmp_path / "zero")
    assert all(math.isnan(rec[k]) for k in ("intra_train", "intra_test", "inter", "iir_train", "iir_test"))
    assert math.isfinite(rec["test_acc"]) and (tmp_path / "zero" / "last.pt").is_file()
    assert (tmp_path / "zero" / "summary.json").is_file()


class BlowUp(nn.Module):
    """Logits scaled by ``factor`` from the second epoch on: a finite but absurd loss."""

    def __init__(self, inner: nn.Module, factor: float) -> None:
        super().__init__()
        self.inner, self.factor, self.calls = inner, factor, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls > 21:
                return out * self.factor
        return out


def test_absurd_but_finite_loss_warns_once(tmp_path):
    import warnings

    config = TrainConfig(out=str(tmp_path / "big"), norm="bn", recipe=quick(epochs=3, metrics_every=5), progress=False)
    logged = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config, model_fn=lambda **kw: BlowUp(tiny(**kw), 1e12), data=DIGITS, log=logged.append)
    absurd = [w for w in caught if "times the first epoch's" in str(w.message)]
    assert len(absurd) == 1 and "[bn seed 121] training loss" in str(absurd[0].message)
    assert sum("warning:" in m for m in logged) == 1
    recs = records(tmp_path / "big")
    assert all(math.isfinite(r["train_loss"]) for r in recs) and recs[1]["train_loss"] > 1e6 * recs[0]["train_loss"]


def test_resume_under_another_l2bn_impl_warns(tmp_path, monkeypatch):
    monkeypatch.setenv("L2BN_IMPL", "reference")
    run(tmp_path, stop_after=1)
    monkeypatch.setenv("L2BN_IMPL", "fused")
    config = TrainConfig(out=str(tmp_path / "run"), norm="l2bn", recipe=quick(), progress=False, resume=True)
    with pytest.warns(RuntimeWarning, match=r"L2BN_IMPL='fused', but it started with 'reference'"):
        train(config, model_fn=tiny, data=DIGITS, log=lambda m: None)


def test_resume_refuses_a_foreign_last_checkpoint(tmp_path):
    from l2bn.train.rundir import CheckpointError

    _, out = run(tmp_path, stop_after=1)
    torch.save(tiny(10, 1, "bn").state_dict(), out / "last.pt")
    config = TrainConfig(out=str(out), norm="l2bn", recipe=quick(), progress=False, resume=True)
    with pytest.raises(CheckpointError, match=rf"{out / 'last.pt'} is not an l2bn resume checkpoint"):
        train(config, model_fn=tiny, data=DIGITS, log=lambda m: None)


def test_data_loaders_are_built_once_per_run_with_epoch_seeded_training_workers(tmp_path, monkeypatch):
    from torch.utils.data import TensorDataset

    from l2bn.data.batched import InMemoryBatches
    from l2bn.train import engine, loaders

    built = []
    real = loaders.DataLoader
    monkeypatch.setattr(loaders, "DataLoader", lambda *a, **kw: (built.append(kw), real(*a, **kw))[1])
    run(tmp_path, recipe=quick(epochs=3, metrics_every=1))
    assert len(built) == 1 and not built[0]["persistent_workers"]  # train; the in-memory eval sets need none
    built.clear()
    config = TrainConfig(out=str(tmp_path / "w"), norm="bn", recipe=quick(epochs=2), progress=False, workers=1)
    state = engine.setup(config, engine.DistEnv(), engine.RunDir(config.out), tiny, DIGITS, print)
    # the training loader's workers restart each epoch (seeded from it)
    assert len(built) == 1 and not built[0]["persistent_workers"]
    assert state.train_loader.generator is state.shuffle_generators[1]
    assert isinstance(state.test_loader, InMemoryBatches) and isinstance(state.train_eval_loader, InMemoryBatches)
    assert not (tmp_path / "w").exists()  # set-up writes nothing
    # an evaluation set that is not in memory keeps a DataLoader whose workers persist over the run
    other = loaders.make_eval_loader(TensorDataset(torch.zeros(4, 1)), 2, 1, torch.device("cpu"))
    assert other.persistent_workers and built[-1]["persistent_workers"]


def test_a_busy_run_folder_is_refused(tmp_path):
    from l2bn.train.rundir import RunBusyError, RunDir

    (tmp_path / "run").mkdir()
    with RunDir(tmp_path / "run").lock():
        with pytest.raises(RunBusyError, match="being trained by another process"):
            run(tmp_path)
    assert list((tmp_path / "run").iterdir()) == []


def test_interrupt_mid_epoch_then_resume_is_identical(tmp_path):
    """Ctrl-C (KeyboardInterrupt) in the middle of epoch 3: resuming gives the uninterrupted records."""

    class Interrupt(nn.Module):
        def __init__(self, inner, at):
            super().__init__()
            self.inner, self.at, self.calls = inner, at, 0

        def forward(self, x):
            if self.training:
                self.calls += 1
                if self.calls == self.at:
                    raise KeyboardInterrupt
            return self.inner(x)

    recipe = quick(epochs=4)
    _, full = run(tmp_path, "full", recipe)
    config = TrainConfig(out=str(tmp_path / "part"), norm="l2bn", recipe=recipe, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(config, model_fn=lambda **kw: Interrupt(tiny(**kw), 2 * 21 + 5), data=DIGITS, log=lambda m: None)
    assert [r["epoch"] for r in records(tmp_path / "part")] == [1, 2]
    config.resume = True
    train(config, model_fn=lambda **kw: Interrupt(tiny(**kw), -1), data=DIGITS, log=lambda m: None)
    assert (tmp_path / "part" / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()


_KILL_SCRIPT = """
import os, signal, sys
import torch
from l2bn.train import rundir
sys.path.insert(0, {tests!r})
import test_engine as t

real, calls = rundir._write_fully, {{}}
def dying_writer(fd, data):
    name = os.readlink(f"/proc/self/fd/{{fd}}").rsplit("/", 1)[-1]
    name = "last.pt" if name.startswith(".last.pt.") else name
    calls[name] = calls.get(name, 0) + 1
    if (name, calls[name]) == ({target!r}, 3):  # epoch 3: half of this write, then SIGKILL
        os.write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real(fd, data)
rundir._write_fully = dying_writer
from pathlib import Path
t.run(Path({root!r}), "part", t.quick(epochs=4))
"""


@pytest.mark.parametrize("target", ["last.pt", "metrics.jsonl"])
def test_sigkill_during_a_write_then_resume_is_identical(tmp_path, target):
    """SIGKILL half-way through epoch 3's last.pt (a torn temporary) or its metrics line (a torn log tail)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    script = _KILL_SCRIPT.format(tests=tests, target=target, root=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr
    part = tmp_path / "part"
    assert torch.load(part / "last.pt", weights_only=True)["epoch"] == 2
    config = TrainConfig(out=str(part), norm="l2bn", recipe=quick(epochs=4), progress=False, resume=True)
    train(config, model_fn=tiny, data=DIGITS, log=lambda m: None)
    _, full = run(tmp_path, "full", quick(epochs=4))
    assert (part / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()
    assert not [p.name for p in part.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_mid_run_then_resume_after_freeing_space_is_identical(tmp_path, monkeypatch):
    from l2bn.train import rundir
    from l2bn.train.rundir import DiskFullError

    real, seen = rundir._write_fully, {"last": 0}

    def full_at_second_last_pt(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".last.pt."):
            seen["last"] += 1
            if seen["last"] == 2:
                os.write(fd, data[:1000])
                raise OSError(28, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(rundir, "_write_fully", full_at_second_last_pt)
    recipe = quick(epochs=3)
    with pytest.raises(DiskFullError, match=f"^no space left on device: {tmp_path / 'run'}$"):
        run(tmp_path, recipe=recipe)
    part = tmp_path / "run"
    assert torch.load(part / "last.pt", weights_only=True)["epoch"] == 1
    assert not [p for p in part.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()  # space freed
    config = TrainConfig(out=str(part), norm="l2bn", recipe=recipe, progress=False, resume=True)
    train(config, model_fn=tiny, data=DIGITS, log=lambda m: None)
    _, full = run(tmp_path, "full", recipe)
    assert (part / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()


def test_two_processes_on_one_out_train_it_once(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "same"
    cmd = [sys.executable, "-m", "l2bn", "train", "--epochs", "3", "--batch-size", "128", "--metrics-every", "3",
           "--out", str(out), "--threads", "1", "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    err = next(e for code, e in results if code == 1)
    assert "being trained by another process" in err or "already holds a run" in err
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_ubn_gate_state_is_logged_every_epoch_and_absent_for_other_norms(tmp_path):
    lines = []
    config = TrainConfig(out=str(tmp_path / "ubn"), norm="ubn", recipe=quick(), progress=False)
    train(config, model_fn=tiny, data=DIGITS, log=lines.append)
    recs = records(tmp_path / "ubn")
    for r in recs:
        assert -1.0 <= r["ubn_condensation"] <= 1.0 and r["ubn_gated"] in (0.0, 1.0)  # one UBN layer
    model = tiny(10, 1, "ubn")
    model.load_state_dict(torch.load(tmp_path / "ubn" / "last.pt", weights_only=True)["model"])
    assert recs[-1]["ubn_condensation"] == pytest.approx(model[1].running_condensation.item())
    assert sum(" ubn_condensation " in line and " ubn_gated " in line for line in lines) == len(recs)
    _, out = run(tmp_path, "bn", norm="bn")
    assert all("ubn_condensation" not in r for r in records(out))


def test_sync_conversion_of_plain_bn_leaves_l2bn_alone():
    from l2bn import L2BatchNorm2d
    from l2bn.train.ddp import convert_plain_bn_to_sync

    net = nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(L2BatchNorm2d(4), nn.BatchNorm1d(3)))
    net = convert_plain_bn_to_sync(net)
    assert [type(m) for m in (net[0], net[1][0], net[1][1])] == [nn.SyncBatchNorm, L2BatchNorm2d, nn.SyncBatchNorm]


# ------------------------------------------------------------------------ acoustic-scene recipe pieces
def test_conv_only_weight_decay_groups_and_sgd_step():
    from l2bn.models import create_model
    from l2bn.train.optim import conv_weight_decay_groups

    model = create_model("fcnn", num_classes=10, widths=(4, 8, 8))
    groups = conv_weight_decay_groups(model, 2e-3)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [len(g["params"]) for g in groups] == [len(convs), len(list(model.parameters())) - len(convs)]
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (2e-3, 0.0)
    opt = torch.optim.SGD(groups, lr=0.5, momentum=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():  # zero gradient: only the decay moves a parameter
        shrink = 1 - 0.5 * 2e-3 if any(p is c for c in convs) else 1.0
        assert torch.allclose(p, before[name] * shrink), name


def test_mixup_per_sample_matches_the_formula():
    from l2bn.train.mixup import mixup_per_sample

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()
    x, y = torch.randn(6, 3, 2, 2, dtype=torch.float64), torch.randint(0, 5, (6,))
    beta = torch.distributions.Beta(0.4, 0.4)
    torch.manual_seed(7)
    logits, loss = mixup_per_sample(model, x, y, nn.CrossEntropyLoss(), beta)
    torch.manual_seed(7)
    lam, perm = beta.sample((6,)).double(), torch.randperm(6)
    assert len(set(lam.tolist())) == 6  # one λ per sample
    mixed = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[perm]
    expected_logits = model(mixed)
    log_p = torch.log_softmax(expected_logits, 1)
    expected = -(lam * log_p[range(6), y] + (1 - lam) * log_p[range(6), y[perm]]).mean()
    assert torch.allclose(logits, expected_logits) and torch.allclose(loss, expected)


def test_spec_masks_need_an_audio_dataset(tmp_path):
    config = TrainConfig(out=str(tmp_path / "r"), recipe=quick(spec_masks=True), progress=False)
    with pytest.raises(ValueError, match="spec_masks needs an acoustic-scene dataset"):
        train(config, model_fn=tiny, data=DIGITS, log=lambda m: None)


def test_validation_split_imbalance_noise_and_norm_spread_in_a_run(tmp_path):
    """A run that holds out a validation split, trains on a long-tailed, noisy-labelled training set and logs the
    norm spread: the records carry val_acc, per-class test accuracy, cone angles and norm_cv; the epoch is
    selected on the validation split; resuming gives the uninterrupted records byte for byte."""
    recipe = quick(epochs=3, metrics_every=3, norm_spread=True)
    flags = dict(val_size=200, imbalance=5.0, label_noise=0.3)

    def go(name, **kw):
        config = TrainConfig(out=str(tmp_path / name), norm="l2bn", recipe=recipe, progress=False, **flags, **kw)
        return train(config, model_fn=tiny, data=DIGITS, log=lambda m: None,
                     **({"stop_after": 1} if name == "part" and not kw else {}))

    summary = go("full")
    recs = records(tmp_path / "full")
    assert all({"val_loss", "val_acc", "test_class_acc", "norm_cv"} <= set(r) for r in recs)
    assert len(recs[0]["test_class_acc"]) == 10 and set(recs[0]["norm_cv"]) == {"1"}  # tiny's one norm layer
    assert {"cone_train", "cone_test"} <= set(recs[-1]) and "cone_train" not in recs[0]
    chosen = max(recs, key=lambda r: (r["val_acc"], -r["epoch"]))
    assert summary["best_epoch"] == chosen["epoch"] and summary["best_val_acc"] == chosen["val_acc"]
    assert summary["selected_test_acc"] == chosen["test_acc"]
    assert load_run(tmp_path / "full").selected_acc == chosen["test_acc"]
    go("part")
    go("part", resume=True)
    assert (tmp_path / "part" / "metrics.jsonl").read_bytes() == (tmp_path / "full" / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match="label_noise must be in"):
        TrainConfig(label_noise=1.5)
    with pytest.raises(ValueError, match="imbalance must be >= 1"):
        TrainConfig(imbalance=0.5)
