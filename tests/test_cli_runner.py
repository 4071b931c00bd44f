"""`python -m l2bn train / compare / analyze` end to end on digits with ResNet-20 (small sizes)."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2bn.cli import build_parser, main
from l2bn.commands.train import config_from_args, recipe_from_args

torch.set_num_threads(1)
FAST = ["--threads", "1", "--no-progress"]


def test_compare_end_to_end_then_skip_then_analyze(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--seeds", "121,122", "--epochs", "2", "--out", str(out), *FAST]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "| bn | 2 |" in printed.out and "| l2bn | 2 |" in printed.out
    rows = {r["norm"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"bn", "l2bn"}
    for row in rows.values():
        assert row["seeds"] == "121 122" and 10.0 < float(row["acc_mean"]) <= 100.0
        assert 0 < float(row["iir_test_mean"]) < 2 and float(row["inter_mean"]) > 0
    for png in ("curves.png", "angles.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for norm in ("bn", "l2bn"):
        for seed in (121, 122):
            run = out / "runs" / f"{norm}-s{seed}"
            config = json.loads((run / "config.json").read_text())
            assert (config["model"], config["dataset"], config["norm"], config["seed"]) == ("resnet20", "digits", norm, seed)
            assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    # run again: every run is complete, so nothing trains and the report is rewritten from disk
    stamp = (out / "runs" / "bn-s121" / "last.pt").stat().st_mtime_ns
    assert main(args) == 0
    assert capsys.readouterr().err.count("(complete)") == 4
    assert (out / "runs" / "bn-s121" / "last.pt").stat().st_mtime_ns == stamp
    # analyze reproduces the last logged epoch of a run
    assert main(["analyze", str(out / "runs" / "l2bn-s122" / "last.pt"), "--json", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    last = json.loads((out / "runs" / "l2bn-s122" / "metrics.jsonl").read_text().splitlines()[-1])
    assert got["norm"] == "l2bn" and got["epoch"] == 2
    for key in ("test_acc", "intra_train", "intra_test", "inter", "iir_train", "iir_test"):
        assert got[key] == pytest.approx(last[key], rel=1e-6)


def test_train_stop_after_and_resume_via_cli(tmp_path, capsys):
    out = tmp_path / "t"
    base = ["train", "--norm", "l2bn", "--epochs", "3", "--batch-size", "128", "--metrics-every", "3", "--out", str(out), *FAST]
    assert main([*base, "--stop-after", "1"]) == 0
    assert "continue with --resume" in capsys.readouterr().out
    assert main(base) == 1  # refuses to overwrite
    assert "--resume" in capsys.readouterr().err
    assert main([*base, "--resume"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3] and "iir_test" in recs[-1] and "iir_test" not in recs[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["recipe"]["batch_size"] == 128 and summary["config"]["recipe"]["lr"] == 0.05


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--dataset", "cifar10", "--data-dir", "{tmp}"], "cifar-10-batches-py"),
        (["train", "--dataset", "svhn"], "unknown dataset 'svhn'"),
        (["train", "--lr", "-1"], "need lr > 0"),
        (["compare", "--norms", "bn,nope", "--epochs", "1", "--seeds", "1", "--out", "{tmp}/c"], "unknown norm 'nope'"),
        (["analyze", "{tmp}/none.pt"], "no checkpoint at"),
    ],
)
def test_bad_input_gives_one_line_errors(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*argv, "--threads", "1"] if argv[0] != "analyze" else argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "l2bn", "train", "--help"], capture_output=True, text=True, check=True)
    for flag in ("--recipe", "--amp", "--channels-last", "--compile", "--device", "--resume", "--sync-bn"):
        assert flag in done.stdout


def test_augment_flag_sets_the_runs_identity():
    parser = build_parser()
    default = config_from_args(parser.parse_args(["train"]), "bn", 121, "out")
    batched = config_from_args(parser.parse_args(["train", "--augment", "batched"]), "bn", 121, "out")
    assert (default.augment, batched.augment) == ("per-sample", "batched")
    assert default.identity()["augment"] == "per-sample" and batched.identity()["augment"] == "batched"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--augment", "gpu"])


def test_compare_without_arguments_is_the_quick_digits_bn_vs_l2bn_grid():
    args = build_parser().parse_args(["compare"])
    assert (args.dataset, args.model, args.norms, args.seeds) == ("digits", "resnet20", ["bn", "l2bn"], None)
    recipe = recipe_from_args(args)  # seeds=None → the recipe's seeds
    assert (recipe.epochs, recipe.seeds, recipe.metrics_every) == (15, (121, 122, 123), 1)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["compare", "--seeds", ""], "expected a non-empty comma-separated list, got ''"),
        (["compare", "--seeds", "121,x"], "expected comma-separated integers, got '121,x'"),
        (["compare", "--seeds", "121,122,121"], "repeated entries 121"),
        (["compare", "--norms", " , "], "expected a non-empty comma-separated list"),
        (["compare", "--norms", "bn,l2bn,bn"], "repeated entries bn"),
        (["compare", "--stop-after", "-1"], "expected a positive integer (>= 1), got -1"),
        (["train", "--stop-after", "0"], "expected a positive integer (>= 1), got 0"),
        (["train", "--seed", "99999999999999999999"], "accepted: 0 to 2**64 - 1"),
        (["train", "--seed", "-3"], "seed -3 is out of range"),
        (["compare", "--seeds", "1,99999999999999999999"], "accepted: 0 to 2**64 - 1"),
        (["study", "table1", "--epochs", "0"], "expected a positive integer (>= 1), got 0"),
        (["study", "table1", "--seeds", "1,-1"], "seed -1 is out of range"),
    ],
)
def test_bad_lists_seeds_and_counts_are_refused_before_any_training(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)  # were one accepted, its runs (or study) would land here, not in the checkout
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_interrupted_compare_grid_resumes_the_unfinished_run(tmp_path, capsys):
    out = tmp_path / "grid"
    args = ["compare", "--norms", "l2bn", "--seeds", "121", "--epochs", "2", "--batch-size", "128",
            "--metrics-every", "2", "--out", str(out), *FAST]
    assert main([*args, "--stop-after", "1"]) == 0
    assert "run compare again to continue" in capsys.readouterr().out
    run = out / "runs" / "l2bn-s121"
    assert not (run / "summary.json").exists() and not (out / "results.md").exists()
    assert main(args) == 0
    printed = capsys.readouterr()
    assert f"resuming {run} after epoch 1" in printed.err and "| l2bn | 1 |" in printed.out
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2] and "iir_test" in recs[1]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_last_pt_fails_only_its_run_and_says_how_to_recover(tmp_path, capsys, damage):
    out = tmp_path / "grid"
    args = ["compare", "--norms", "bn,l2bn", "--seeds", "121", "--epochs", "2", "--batch-size", "128",
            "--metrics-every", "2", "--train-subset", "200", "--jobs", "1", "--out", str(out), *FAST]
    assert main([*args, "--stop-after", "1"]) == 0
    last = out / "runs" / "bn-s121" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\x80\x02garbage" * 20)
    capsys.readouterr()
    assert main(args) == 0  # the other run trains and the report is written without the broken one
    printed = capsys.readouterr()
    assert (out / "runs" / "l2bn-s121" / "summary.json").is_file() and "| l2bn | 1 |" in printed.out
    assert not (out / "runs" / "bn-s121" / "summary.json").exists() and "| bn |" not in printed.out
    assert f"run failed: {last} is not a readable l2bn checkpoint" in printed.err
    assert "delete it to restart that run from epoch 1" in printed.err and "weights_only" not in printed.err
    assert "1 run(s) failed: bn seed 121 (" in printed.err
    last.unlink()  # the recovery the hint names
    assert main(args) == 0
    assert json.loads((out / "runs" / "bn-s121" / "summary.json").read_text())["epochs"] == 2
    assert "| bn | 1 |" in capsys.readouterr().out


def test_placement_flag_reaches_the_model(tmp_path, capsys):
    """--placement (the paper's Table 4) builds the norm into the named parts only; the rest keeps BN."""
    import torch.nn as nn

    from l2bn import L2BatchNorm2d
    from l2bn.train.model import build_model

    out = tmp_path / "p"
    argv = ["train", "--norm", "l2bn", "--placement", "stage1", "--epochs", "1", "--out", str(out), *FAST]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["placement"] == "stage1" and config["model_kwargs"] == {}
    model = build_model(config["model"], num_classes=10, in_channels=1, norm=config["norm"], placement="stage1")
    l2 = [name for name, m in model.named_modules() if isinstance(m, L2BatchNorm2d)]
    bn = [name for name, m in model.named_modules() if type(m) is nn.BatchNorm2d]
    assert l2 and bn
    assert {name.split(".")[0] for name in l2} == {"layer1"}
    assert all(not name.startswith("layer1.") for name in bn)
    assert main(["train", "--placement", "stage9", "--epochs", "1", "--out", str(tmp_path / "bad"), *FAST]) == 1
    assert "stage9" in capsys.readouterr().err


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--lr", "nan"], "lr must be a finite number, got nan"),
        (["train", "--lr", "inf"], "lr must be a finite number, got inf"),
        (["train", "--weight-decay", "nan"], "weight_decay must be a finite number"),
        (["compare", "--mixup-alpha", "inf"], "mixup_alpha must be a finite number"),
        (["train", "--gamma", "-0.5"], "gamma (the step schedule's factor) must be > 0, got -0.5"),
        (["compare", "--metrics-max-batches", "0"], "metrics_max_batches must be >= 1"),
        (["train", "--device", "bogus"], "unknown device 'bogus'; accepted: auto, cpu, cuda, cuda:N, mps"),
        (["compare", "--device", "cuda:7"], "cuda:7"),
        (["train", "--out", "{tmp}/file"], "is a file; pass a folder"),
        (["compare", "--out", "{tmp}/file/below"], "lies under {tmp}/file, which is a file"),
        (["train", "--data-dir", "{tmp}/file"], "--data-dir {tmp}/file is a file"),
        (["train", "--train-subset", "0"], "train_subset must be >= 1"),
        (["compare", "--train-subset", "5"], "train_subset must be between the number of classes (10)"),
        (["compare", "--jobs", "0"], "jobs must be >= 1, got 0"),
        (["bench", "--shapes", "4x3x4"], "--shapes wants NxCxHxW with four positive integers"),
        (["bench", "--shapes", "4x3xax4"], "got '4x3xax4'"),
        (["bench", "--shapes", "1x3x1x1"], "BatchNorm needs at least 2"),
        (["bench", "--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["bench", "--device", "bogus"], "unknown device 'bogus'"),
        (["bench", "--cuda-graphs"], "--cuda-graphs replays CUDA graphs: it needs --device cuda, got device 'cpu'"),
        (["analyze", "{tmp}/run/last.pt", "--metrics-max-batches", "0"], "max_batches must be >= 1"),
    ],
)
def test_bad_values_are_refused_before_any_work(tmp_path, monkeypatch, capsys, argv, message):
    """One `error:` line, exit 1, no traceback, and nothing left on disk (run in an empty working folder)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = _listing(tmp_path)
    extra = [] if argv[0] in ("analyze", "bench") else ["--epochs", "1", *FAST]
    if argv[0] == "bench":
        extra = ["--repeats", "1"] if "--repeats" not in argv else []
    assert main([*argv, *extra]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    assert message.replace("{tmp}", str(tmp_path)) in lines[0]
    assert _listing(tmp_path) == before  # no runs/ folder, no empty folders


def test_read_only_out_is_refused(tmp_path, monkeypatch, capsys):
    import os

    from l2bn.train import rundir

    locked = tmp_path / "ro"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(rundir.os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    assert main(["train", "--out", str(locked / "run"), "--epochs", "1", *FAST]) == 1
    assert f"{locked} is read-only" in capsys.readouterr().err and list(locked.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_triton_without_cuda_is_refused(capsys):
    assert main(["bench", "--impl", "triton", "--repeats", "1", "--shapes", "4x3x4x4"]) == 1
    assert "--impl triton needs a CUDA device" in capsys.readouterr().err


def test_analyze_refuses_a_crafted_checkpoint_without_running_it(tmp_path, capsys):
    from pathlib import Path

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "config": {}}, path)
    assert main(["analyze", str(path), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} is not a readable l2bn checkpoint") and "only files you trust" in err
    assert not (tmp_path / "pwned").exists()
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    assert main(["analyze", str(path), "--device", "cpu"]) == 1
    assert "is not an l2bn checkpoint (it holds a dict without model" in capsys.readouterr().err


def _stacks(shell: int) -> str:
    """Where the shell's training child is stuck: its threads' states and, where gdb is installed, their stacks."""
    import shutil

    children = Path(f"/proc/{shell}/task/{shell}/children")
    listed = children.read_text().split() if children.is_file() else []
    pid = listed[0] if listed else str(shell)
    states = subprocess.run(["sh", "-c", f"grep -H State /proc/{pid}/task/*/status"], capture_output=True, text=True)
    stacks = "" if shutil.which("gdb") is None else subprocess.run(
        ["gdb", "-p", pid, "-batch", "-ex", "thread apply all bt 25"], capture_output=True, text=True,
        timeout=120).stdout
    return f"\nthe child after 90 s:\n{states.stdout}{stacks}"


def test_ctrl_c_says_how_to_resume_and_stops_a_shell_script(tmp_path):
    """Ctrl-C in a shell script of runs (a user's loop over seeds) ends the run with how to resume and ends the
    script: the process dies by SIGINT (``l2bn.cli.run``), so the shell stops too; after an exit with 130 it would
    take the child to have handled the signal and go on to the next command."""
    import os
    import shlex
    import signal
    import time

    out, following = tmp_path / "t", tmp_path / "following"
    run = shlex.join([sys.executable, "-m", "l2bn", "train", "--epochs", "40", *FAST, "--out", str(out)])
    script = f"{run}; touch {shlex.quote(str(following))}"
    # a terminal's Ctrl-C reaches its foreground process group: the shell and the run. A shell that runs the suite
    # in the background starts it with SIGINT ignored, and Python then raises no KeyboardInterrupt: give the
    # script the default handler, as a terminal would
    shell = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text()):
        time.sleep(0.2)
    os.killpg(shell.pid, signal.SIGINT)
    where = ""
    try:  # the exit takes ~1 s (most of it the interpreter's final garbage collection)
        _, err = shell.communicate(timeout=90)
    except subprocess.TimeoutExpired as slow:
        where = _stacks(shell.pid)
        partial = slow.stderr.decode(errors="replace") if isinstance(slow.stderr, bytes) else slow.stderr or ""
        assert "interrupted;" not in partial, f"the run did not exit within 90 s of its message{where}"
        # CPython drops a SIGINT that lands while a weakref callback runs (an import lock's, printing "Exception
        # ignored in ..."), and training goes on, as after a lost first Ctrl-C at a terminal: press it again
        os.killpg(shell.pid, signal.SIGINT)
        _, err = shell.communicate(timeout=120)
    assert shell.returncode == -signal.SIGINT and not following.exists(), err + where
    dropped = re.compile(r"Exception ignored in: [^\n]*\nTraceback \(most recent call last\):\n.*?\nKeyboardInterrupt: ?\n", re.S)
    assert f"continue with the same command plus --resume --out {out}" in err and "Traceback" not in dropped.sub("", err)
    assert main(["train", "--epochs", "40", "--out", str(out), "--resume", "--stop-after", "2", *FAST]) == 0


def test_the_process_entry_ends_by_sigint_after_an_interrupted_command(monkeypatch, capsys):
    """``l2bn.cli.run`` (``python -m l2bn``, the ``l2bn`` script) exits with a command's status, and after a Ctrl-C
    re-raises KeyboardInterrupt with a hook that prints no traceback (CPython then ends the process by SIGINT)."""
    import l2bn.cli as cli

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    for status in (0, 1):
        monkeypatch.setattr(cli, "main", lambda: status)
        with pytest.raises(SystemExit) as exited:
            cli.run()
        assert exited.value.code == status and sys.excepthook is not cli._quiet_on_interrupt
    monkeypatch.setattr(cli, "main", lambda: cli.INTERRUPTED)
    with pytest.raises(KeyboardInterrupt):
        cli.run()
    assert sys.excepthook is cli._quiet_on_interrupt
    sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert capsys.readouterr().err == ""
    sys.excepthook(ValueError, ValueError("a bug keeps its traceback"), None)
    assert "ValueError: a bug keeps its traceback" in capsys.readouterr().err


def test_compare_jobs_default_is_two_on_a_multicore_cpu(monkeypatch):
    from l2bn.commands.train import default_jobs

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_jobs("cpu") == 2
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert default_jobs("cpu") == 1
