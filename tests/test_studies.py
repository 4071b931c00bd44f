"""The studies of docs/results/: statistics against independent formulas, the catalog's sizing, and a one-epoch
miniature of every study's command on real Fashion-MNIST images (skipped where the data set is absent)."""
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from l2bn.cli import main
from l2bn.data import vision
from l2bn.studies import (SECTIONS, STUDIES, Difference, StudyOverrides, compare_groups, detectable_difference,
                          estimate_seconds, get_study, holm, load_study_runs, run_study, study_command)
from l2bn.studies.stats import paired_seeds, rejection_probability
from l2bn.studies.catalog import ZOO
from l2bn.studies.folder import InvocationRecord, code_version, environment, environment_records
from l2bn.studies.page import PAGE_MARKER

# ------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("a,b", [([91.2, 91.5, 90.9, 91.8, 91.1], [90.7, 91.0, 90.8]),
                                 ([1.0, 2.0, 4.0], [1.5, 1.6, 1.7, 1.8]), ([5.0, 5.1], [4.0, 7.0, 9.5])])
def test_welch_matches_the_textbook_formula(a, b):
    d = compare_groups(a, b)
    # Welch–Satterthwaite and the t-interval in float64, written out independently of scipy's ttest_ind
    x, y = np.array(a, np.float64), np.array(b, np.float64)
    sa, sb = ((x - x.mean()) ** 2).sum() / (len(x) - 1) / len(x), ((y - y.mean()) ** 2).sum() / (len(y) - 1) / len(y)
    df = (sa + sb) ** 2 / (sa * sa / (len(x) - 1) + sb * sb / (len(y) - 1))
    t = (x.mean() - y.mean()) / math.sqrt(sa + sb)
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(sa + sb)
    assert d.df == pytest.approx(df, rel=1e-12) and d.t == pytest.approx(t, rel=1e-12) and not d.paired
    assert d.p == pytest.approx(2 * scipy_stats.t.sf(abs(t), df), rel=1e-10)
    assert (d.low, d.high) == pytest.approx((x.mean() - y.mean() - half, x.mean() - y.mean() + half), rel=1e-10)


def test_paired_matches_the_one_sample_test_of_the_differences():
    a, b = [93.4, 93.6, 93.5, 93.3, 93.7], [93.3, 93.5, 93.6, 93.1, 93.5]
    d = compare_groups(a, b, paired=True)
    diff = np.subtract(a, b)
    se = diff.std(ddof=1) / math.sqrt(len(diff))
    assert d.paired and d.df == 4 and d.t == pytest.approx(diff.mean() / se, rel=1e-12)
    half = scipy_stats.t.ppf(0.975, 4) * se
    assert (d.low, d.high) == pytest.approx((diff.mean() - half, diff.mean() + half), rel=1e-10)
    with pytest.raises(ValueError, match="equal length"):
        compare_groups([1.0, 2.0], [1.0, 2.0, 3.0], paired=True)


def test_arms_pair_only_when_they_ran_the_same_seeds():
    assert paired_seeds({122: 2.0, 121: 1.0}, {121: 3.0, 122: 4.0}) == ([1.0, 2.0], [3.0, 4.0], True)
    assert paired_seeds({121: 1.0, 122: 2.0}, {121: 3.0, 123: 4.0})[2] is False


def test_undefined_without_two_seeds_or_without_spread():
    assert math.isnan(compare_groups([1.0], [1.0, 2.0]).p)
    assert math.isnan(compare_groups([1.0, 1.0], [2.0, 2.0]).p)
    d = compare_groups([90.0], [89.0, 89.5])
    assert not d.testable and not d.beyond_spread and d.diff == pytest.approx(0.75) and math.isnan(d.detectable)


@pytest.mark.parametrize("n", [3, 5, 10])
@pytest.mark.parametrize("paired", [False, True])
def test_the_95_percent_interval_covers_95_percent_by_simulation(n, paired):
    """Normal seeds with unequal spreads (Welch) or correlated pairs: the printed 95 % interval must cover the
    true difference 95 % of the time (the percentile bootstrap it replaces covered 81 % at n = 3)."""
    rng = np.random.default_rng(n + 100 * paired)
    trials, true = 600, 0.7
    covered = 0
    for _ in range(trials):
        shared = rng.normal(0.0, 1.0, n) if paired else 0.0
        a = true + shared + rng.normal(0.0, 0.5, n)
        b = shared + rng.normal(0.0, 1.5 if not paired else 0.5, n)
        d = compare_groups(a, b, paired=paired)
        covered += d.low <= true <= d.high
    assert 0.92 <= covered / trials <= 0.98


@pytest.mark.parametrize("df", [1.0, 1.05, 1.2, 1.5])
def test_the_detectable_difference_is_defined_at_welch_degrees_of_freedom_near_one(df):
    """Six seeds against two give Welch df near 1, where scipy's noncentral t returns NaN at large shifts: the
    difference is still found, with 80 % power by a Monte Carlo of the t statistic itself."""
    from scipy.stats import t

    delta = detectable_difference(1.0, df)
    assert math.isfinite(delta) and delta > t.isf(0.025, df)
    rng = np.random.default_rng(0)
    z, v = rng.standard_normal(400_000), rng.chisquare(df, 400_000)
    statistic = (z + delta) / np.sqrt(v / df)
    assert np.mean(np.abs(statistic) > t.isf(0.025, df)) == pytest.approx(0.80, abs=0.005)


def test_the_rejection_probability_integral_equals_scipys_noncentral_t_where_that_is_defined(monkeypatch):
    import scipy.stats
    from scipy.stats import nct, t

    cases = [(df, shift, t.isf(0.025, df)) for df, shift in ((3.0, 2.5), (7.5, 4.0), (1.5, 3.0))]
    expected = [nct.sf(c, df, shift) + nct.cdf(-c, df, shift) for df, shift, c in cases]
    monkeypatch.setattr(scipy.stats.nct, "sf", lambda *args: math.nan)  # force the integral
    got = [rejection_probability(shift, c, df) for df, shift, c in cases]
    assert got == pytest.approx(expected, abs=1e-7)


def test_the_detectable_difference_has_80_percent_power_by_simulation():
    """At the difference detectable_difference() names, a simulated paired t-test with that true effect and
    standard error rejects at 5 % in 80 % of experiments (noncentral t, checked independently)."""
    n, sd = 5, 1.0
    delta = detectable_difference(sd / math.sqrt(n), n - 1)
    rng = np.random.default_rng(7)
    diffs = rng.normal(delta, sd, (20_000, n))
    p = scipy_stats.ttest_1samp(diffs, 0.0, axis=1).pvalue
    assert (p < 0.05).mean() == pytest.approx(0.80, abs=0.015)
    assert detectable_difference(1.0, 1e6) == pytest.approx(1.96 + 0.8416, abs=1e-3)  # the normal limit
    assert math.isnan(detectable_difference(0.0, 4)) and math.isnan(detectable_difference(1.0, math.nan))


def test_holm_matches_the_step_down_definition():
    ps = [0.01, 0.04, 0.03, 0.005, math.nan]
    family = [Difference(0, 0, 0, 1.0, 4.0, p, 0, 0, 3, 3) for p in ps]
    adjusted = [d.p_holm for d in holm(family)]
    # independent: sorted p (0.005, 0.01, 0.03, 0.04), m = 4 -> 0.02, 0.03, max(0.06, 0.03), max(0.04, 0.06)
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(adjusted[4])
    assert holm(family)[0].beyond_spread and not holm(family)[1].beyond_spread


def test_a_clear_difference_is_beyond_the_spread_and_a_null_one_is_not():
    assert compare_groups([92.0, 92.1, 91.9, 92.05, 91.95], [90.0, 90.1, 89.9, 90.05, 89.95]).beyond_spread
    assert not compare_groups([90.0, 91.0, 90.5], [90.4, 90.6, 90.2]).beyond_spread

# ---------------------------------------------------------------------------------------------- catalog


def test_the_catalog_has_the_first_four_studies_within_about_six_hours_and_the_evidence_studies():
    assert list(STUDIES) == ["table1", "norms", "placement", "curves", "converged", "smallbatch", "mechanism"]
    assert ZOO == ("bn", "l2bn", "ln", "in", "gn-cpg4", "gn-cpg8", "sn", "bcn", "bin", "lnbn", "inbn", "pnbn", "ubn")
    table1 = get_study("table1")
    assert table1.seeds == (121, 122, 123, 124, 125) and table1.train_subset is None and table1.epochs >= 10
    assert get_study("norms").grids[0].norms == ZOO and len(get_study("norms").seeds) >= 3
    assert [g.placement for g in get_study("placement").grids] == ["none", "classifier", "stage1", "stage2-3", "all"]
    assert get_study("curves").runs_of == "table1" and estimate_seconds(get_study("curves")) == 0
    total = sum(estimate_seconds(STUDIES[s]) for s in ("table1", "norms", "placement", "curves")) / 3600
    assert 5.0 <= total <= 7.0, total
    converged = get_study("converged")
    assert converged.seeds == tuple(range(121, 131)) and converged.val_size and converged.epochs >= 40
    assert converged.recipe().metrics_max_batches is None  # angles over every training image
    small = get_study("smallbatch")
    assert [(g.label, g.norms) for g in small.grids] == [(f"batch {b}", ("bn", "l2bn", "gn-cpg4")) for b in (128, 16, 8)]
    assert [small.recipe(g).lr for g in small.grids] == pytest.approx([0.1, 0.0125, 0.00625])  # 0.1 · B / 128
    mechanism = get_study("mechanism")
    assert [(c.imbalance, c.label_noise) for c in map(mechanism.config, mechanism.grids)] == [(100.0, 0.0), (None, 0.3)]
    assert mechanism.recipe().norm_spread and len(mechanism.seeds) >= 5
    for study in (small, mechanism):  # defined after the throughput measurement: the fast eager path
        assert all((c.augment, c.channels_last) == ("batched", True) for c in map(study.config, study.grids))
    assert (converged.config(converged.grids[0]).augment, converged.config(converged.grids[0]).channels_last) == (
        "per-sample", False)  # as it started training


def test_the_estimate_is_the_documented_formula():
    one = get_study("norms").apply(StudyOverrides(epochs=2, seeds=(121,), only=("sn",)))  # angles at epoch 2 only
    test_pass = 15.4 * 10_000 / 20_240
    expected = 1.99 * (2 * (132.2 * 5_000 / 60_000 + test_pass) + (15.4 - test_pass) * 5_000 / 10_240)
    assert estimate_seconds(one) == pytest.approx(expected, rel=1e-12)


def test_overrides_make_a_miniature_and_unknown_names_are_refused():
    mini = get_study("norms").apply(StudyOverrides(epochs=1, train_subset=128, seeds=(121,), only=("bn", "ubn")))
    assert mini.grids[0].norms == ("bn", "ubn") and mini.epochs == 1 and mini.metrics_every == 1
    assert mini.run_count() == 2
    with pytest.raises(ValueError, match="has no norm 'bogus'; it has: bn, l2bn"):
        get_study("table1").apply(StudyOverrides(only=("bogus",)))
    with pytest.raises(ValueError, match="has no norm 'bogus'"):
        get_study("norms").apply(StudyOverrides(only=("bogus",)))
    small = get_study("smallbatch").apply(StudyOverrides(only=("batch 8", "l2bn")))
    assert [(g.label, g.norms) for g in small.grids] == [("batch 8", ("l2bn",))]
    assert [g.norms for g in get_study("smallbatch").apply(StudyOverrides(only=("gn-cpg4",))).grids] == [
        ("gn-cpg4",)] * 3
    with pytest.raises(ValueError, match="has no grid or norm 'stage9'"):
        get_study("placement").apply(StudyOverrides(only=("stage9",)))
    with pytest.raises(ValueError, match="unknown study"):
        get_study("table9")
    for bad in (0, -1):  # 0 is not "the study's own epochs" (that is None): refused, not the full study
        with pytest.raises(ValueError, match=f"epochs must be >= 1 .*got {bad}"):
            StudyOverrides(epochs=bad)
    assert get_study("table1").apply(StudyOverrides(seeds=(1,))).epochs == get_study("table1").epochs
    assert study_command("norms", StudyOverrides(epochs=1, only=("bn",))) == \
        "python -m l2bn study norms --epochs 1 --only bn"

# ------------------------------------------------------------------------------ miniatures on real data

needs_fashion = pytest.mark.skipif(
    vision._find_fashion_files([vision.FASHION_MNIST_SYSTEM_DIR]) is None,
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


def _idx(array: np.ndarray) -> bytes:
    magic = (0x0803 if array.ndim == 3 else 0x0801).to_bytes(4, "big")
    return magic + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()


@pytest.fixture(scope="module")
def mini_fashion(tmp_path_factory):
    """The first 2000 training and 200 test images of the installed Fashion-MNIST, in its own idx format."""
    import torchvision

    root = tmp_path_factory.mktemp("fashion")
    system = str(vision._fashion_raw_root(None, None))  # decompressed once into the cache, as the loader does
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 2000), ("t10k", 200)):
        source = torchvision.datasets.FashionMNIST(system, train=split == "train")
        (raw / f"{split}-images-idx3-ubyte").write_bytes(_idx(source.data[:n].numpy().astype(np.uint8)))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(_idx(source.targets[:n].numpy().astype(np.uint8)))
    return root


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The studies pin one thread a run (torch.set_num_threads in-process with jobs=1); restore it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


MINIATURES = {"table1": ("bn", "l2bn"), "norms": ("bn", "gn-cpg4"), "placement": ("none", "stage1"),
              "curves": ("bn", "l2bn"), "converged": ("bn", "l2bn")}


def _mini(name: str, only, subset: int | None = None) -> StudyOverrides:
    """One epoch, one seed, a small subset: 128 images, or 160 where a validation split leaves fewer than a batch."""
    subset = subset or (160 if get_study(name).val_size else 128)
    return StudyOverrides(epochs=1, train_subset=subset, seeds=(121,), only=tuple(only))


@needs_fashion
@pytest.mark.parametrize("name", list(MINIATURES))
def test_each_study_command_reruns_byte_identically_and_builds_its_page(name, mini_fashion, tmp_path):
    only = MINIATURES[name]
    kw = dict(data_dir=str(mini_fashion), jobs=1, progress=False)
    first = run_study(name, tmp_path / "a", overrides=_mini(name, only), **kw)
    assert len(first.trained) == 2 and not first.failed
    again = run_study(name, tmp_path / "a", overrides=_mini(name, only), **kw)
    assert not again.trained and len(again.skipped) == 2  # a later invocation skips finished runs
    second = run_study(name, tmp_path / "b", overrides=_mini(name, only[1:]), **kw)
    assert len(second.trained) == 1
    rel = first.trained[1].relative_to(tmp_path / "a")
    metrics = [(tmp_path / side / rel / "metrics.jsonl").read_bytes() for side in ("a", "b")]
    assert metrics[0] == metrics[1]

    page = first.page.read_text()
    positions = [page.find(heading) for heading in SECTIONS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), positions
    command = study_command(name, _mini(name, only), root=tmp_path / "a", data_dir=str(mini_fashion))
    assert f"```bash\n{command}\n```" in page
    folder = tmp_path / "a" / get_study(name).folder
    table = [line for line in (folder / "results.md").read_text().splitlines() if line.startswith("|")]
    assert table and all(line in page for line in table)  # the report's own table, verbatim
    assert (folder / "curves.png").is_file() and (folder / "angles.png").is_file()
    assert f"]({get_study(name).folder}/curves.png)" in page
    assert "Wang et al., arXiv:2207.02625" in page and "Paper vs here:" in page
    first_row = {"table1": "Table 1, row “ResNet-20 BN”", "curves": "Table 1, row “ResNet-20 BN”",
                 "converged": "Table 1, row “ResNet-20 BN”",
                 "norms": "Table 3, row “BN (baseline)”", "placement": "Table 4, row “None (baseline)”"}[name]
    assert f"paper, {first_row}" in page and f"| {only[0]} | here |" in page
    assert page.splitlines()[4].startswith("**Not fitted**")  # one epoch on a few images fits nothing
    assert "Runs finished: 2 of 2 planned" in page and "| date | command | CPU |" in page
    baseline = only[0].upper() if name != "placement" else "BN everywhere (placement none)"
    assert f"**{only[1]}** against {baseline}: accuracy" in page
    assert "not testable: fewer than two seeds in an arm" in page
    if name in ("table1", "curves"):
        assert "The paper reports, for L2BN against BN" in page
    if name == "curves":
        assert "Per epoch, mean over seeds" in page and "in the paper's direction at" in page


@needs_fashion
def test_the_command_runs_two_jobs_with_the_records_of_one_and_rebuilds_a_page_without_training(
        mini_fashion, tmp_path, capsys):
    args = ["study", "placement", "--root", str(tmp_path), "--data-dir", str(mini_fashion), "--epochs", "1",
            "--train-subset", "128", "--seeds", "121", "--only", "none,all", "--no-progress"]
    assert main(args) == 0  # --jobs 2 (the default): two single-thread processes
    [record] = environment_records(get_study("placement"), tmp_path)  # kept current as each parallel run ended
    assert record["runs_trained"] == 2 and record["status"] == "finished" and record["jobs"] == 2
    assert record["code"] == code_version() and record["code"]  # the commit (or version) that trained them
    alone = run_study("placement", tmp_path / "one-job", data_dir=str(mini_fashion), jobs=1, progress=False,
                      overrides=StudyOverrides(epochs=1, train_subset=128, seeds=(121,), only=("all",)))
    rel = alone.trained[0].relative_to(tmp_path / "one-job")
    assert (tmp_path / rel / "metrics.jsonl").read_bytes() == (tmp_path / "one-job" / rel / "metrics.jsonl").read_bytes()
    page = tmp_path / "placement.md"
    page.unlink()
    assert main(args + ["--report-only"]) == 0
    assert "0 run(s) trained" in capsys.readouterr().out and "**all** against BN everywhere" in page.read_text()
    for checkpoint in tmp_path.rglob("*.pt"):  # what a checkout of the committed files holds: no checkpoints
        checkpoint.unlink()
    assert main(args) == 0 and "0 run(s) trained, 2 skipped" in capsys.readouterr().out
    # the page reads only runs of its own experiment: another recipe in the same folders is not mixed in
    same = StudyOverrides(epochs=1, train_subset=128, seeds=(121,), only=("none", "all"))
    assert [len(v) for v in load_study_runs(get_study("placement").apply(same), tmp_path)[0].values()] == [1, 1]
    longer = StudyOverrides(epochs=2, train_subset=128, seeds=(121,), only=("none", "all"))
    assert load_study_runs(get_study("placement").apply(longer), tmp_path) == ({}, 2)


@needs_fashion
def test_an_interrupted_invocation_keeps_its_record_of_the_runs_it_finished(mini_fashion, tmp_path, monkeypatch):
    from l2bn.studies import run as study_run

    real_compare, ended = study_run.compare, []

    def compare_interrupted_after_one_run(*args, on_run_end, **kwargs):
        def end(path, status):
            on_run_end(path, status)
            ended.append(path)
            raise KeyboardInterrupt  # Ctrl-C just after the first run finished
        return real_compare(*args, on_run_end=end, **kwargs)

    monkeypatch.setattr(study_run, "compare", compare_interrupted_after_one_run)
    overrides = StudyOverrides(epochs=1, train_subset=128, seeds=(121,), only=("none", "all"))
    kw = dict(data_dir=str(mini_fashion), jobs=1, progress=False, overrides=overrides)
    with pytest.raises(KeyboardInterrupt):
        run_study("placement", tmp_path, **kw)
    [record] = environment_records(get_study("placement"), tmp_path)
    assert len(ended) == 1 and record["runs_trained"] == 1 and record["status"] == "interrupted"
    assert record["wall_seconds"] > 0 and record["command"].startswith("python -m l2bn study placement")

    monkeypatch.setattr(study_run, "compare", real_compare)
    result = run_study("placement", tmp_path, **kw)  # resumes: the other run, a second record
    first, second = environment_records(get_study("placement"), tmp_path)
    assert first == record and len(result.trained) == 1 and len(result.skipped) == 1
    assert second["runs_trained"] == 1 and second["status"] == "finished"
    assert second["invocation"] != first["invocation"]
    page = result.page.read_text()
    assert "interrupted (Ctrl-C)" in page and "Runs finished: 2 of 2 planned" in page


def _study_process(root: Path, data_dir: Path):
    import os
    import signal
    import subprocess
    import sys

    import l2bn

    src = str(Path(l2bn.__file__).resolve().parents[1])  # this checkout's src, first on the child's path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "l2bn", "study", "placement", "--root", str(root), "--data-dir", str(data_dir),
            "--epochs", "2", "--train-subset", "128", "--seeds", "121", "--only", "none,all", "--jobs", "1",
            "--no-progress"]
    # a shell that runs the suite in the background starts it with SIGINT ignored (the child then takes no Ctrl-C
    # and finishes with 0): give the child the default handler, as a terminal would
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow  # four study processes: about two minutes a signal on the shared 2-core machine
@needs_fashion
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGKILL"])
def test_a_study_interrupted_by_a_signal_resumes_to_the_records_of_an_uninterrupted_one(
        mini_fashion, tmp_path, signal_name):
    import signal

    first = tmp_path / "cut" / "placement" / "none" / "runs" / "l2bn-s121" / "metrics.jsonl"
    process = _study_process(tmp_path / "cut", mini_fashion)
    deadline = time.monotonic() + 300
    while not (first.is_file() and first.read_text().count("\n") >= 1) and process.poll() is None:
        assert time.monotonic() < deadline, "the study logged no epoch in 5 minutes"
        time.sleep(0.05)
    process.send_signal(getattr(signal, signal_name))  # in epoch 2 of the first run
    _, err = process.communicate(timeout=120)
    if signal_name == "SIGINT":
        # ended by SIGINT after the message, as l2bn.cli.run ends an interrupted command
        assert process.returncode == -signal.SIGINT and "run the same command again to continue" in err, err
    else:
        assert process.returncode == -signal.SIGKILL
    resumed = _study_process(tmp_path / "cut", mini_fashion)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    whole = _study_process(tmp_path / "whole", mini_fashion)
    assert whole.communicate(timeout=600) and whole.returncode == 0
    for grid in ("none", "all"):
        rel = Path("placement") / grid / "runs" / "l2bn-s121" / "metrics.jsonl"
        assert (tmp_path / "cut" / rel).read_bytes() == (tmp_path / "whole" / rel).read_bytes()
    records = environment_records(get_study("placement"), tmp_path / "cut")
    assert records[-1]["status"] == "finished" and sum(r["runs_trained"] for r in records) == 2
    assert "Runs finished: 2 of 2 planned" in (tmp_path / "cut" / "placement.md").read_text()


def test_code_version_names_the_commit_and_local_changes(tmp_path, monkeypatch):
    import subprocess

    import l2bn
    from l2bn import __version__

    version = code_version()
    root = Path(l2bn.__file__).resolve().parents[2]  # src/l2bn/__init__.py -> the checkout
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI's clone, a developer's): the commit, and whether src/ differs
        assert version.split("+")[0] == head.stdout.strip()
    else:
        assert version == f"l2bn {__version__}"
    monkeypatch.setattr("subprocess.run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("git")))
    assert code_version() == f"l2bn {__version__}"  # no git: the package version


def test_the_command_refuses_unknown_names_before_any_work(tmp_path, capsys):
    assert main(["study", "norms", "--root", str(tmp_path), "--only", "bogus"]) == 1
    assert "has no norm 'bogus'" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_pages_never_overwrite_a_file_the_project_did_not_write(tmp_path):
    from l2bn.studies.page import PAGE_MARKER, ForeignFileError, build_index, build_page, check_pages

    (tmp_path / "README.md").write_text("MINE\n")
    with pytest.raises(ForeignFileError, match=r"README.md exists and was not written by l2bn.*--overwrite"):
        check_pages(tmp_path, "table1")
    with pytest.raises(ForeignFileError):
        build_index(tmp_path)
    assert (tmp_path / "README.md").read_text() == "MINE\n"
    (tmp_path / "table1.md").write_text("my notes\n")
    with pytest.raises(ForeignFileError, match="table1.md"):
        build_page(get_study("table1"), tmp_path, "python -m l2bn study table1")
    assert (tmp_path / "table1.md").read_text() == "my notes\n"
    page = build_page(get_study("table1"), tmp_path, "cmd", overwrite=True)
    assert page.read_text().startswith(PAGE_MARKER)
    build_page(get_study("table1"), tmp_path, "cmd")  # its own page: rebuilt without asking
    (tmp_path / "README.md").unlink()
    assert build_index(tmp_path).read_text().startswith(PAGE_MARKER)
    check_pages(tmp_path, "table1")


def test_the_command_refuses_to_overwrite_pages_it_did_not_write_before_any_work(tmp_path, capsys):
    mine = tmp_path / "p"
    mine.mkdir()
    (mine / "README.md").write_text("MINE\n")  # the reproduction
    assert main(["study", "table1", "--root", str(mine), "--report-only"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "README.md exists and was not written by l2bn" in lines[0] and "--overwrite" in lines[0]
    assert (mine / "README.md").read_text() == "MINE\n" and sorted(p.name for p in mine.iterdir()) == ["README.md"]
    (mine / "table1.md").write_text("my notes\n")  # training is refused too, before any run folder appears
    assert main(["study", "table1", "--root", str(mine), "--epochs", "1", "--seeds", "1"]) == 1
    assert "table1.md exists" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["README.md", "table1.md"]
    assert main(["study", "table1", "--root", str(mine), "--report-only", "--overwrite"]) == 0
    assert all((mine / f).read_text().startswith(PAGE_MARKER) for f in ("README.md", "table1.md"))


@pytest.mark.parametrize("line", ["{}", "[1, 2]", '"text"', '{"date": "today"}'])
def test_a_wrong_shaped_environment_record_is_one_line_naming_the_file_and_line(tmp_path, capsys, line):
    folder = tmp_path / "table1"
    folder.mkdir()
    good = json.dumps(environment("python -m l2bn study table1", 2))
    (folder / "environment.jsonl").write_text(f"{good}\n{line}\n")
    assert main(["study", "table1", "--root", str(tmp_path), "--report-only"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert f"{folder / 'environment.jsonl'}, line 2: not an invocation record" in err[0]


@pytest.mark.parametrize("config", [{"recipe": [1, 2]}, {"recipe": "fashion-mnist-quick"}, [1, 2]])
def test_a_summary_with_an_edited_configuration_is_one_line_naming_it(tmp_path, capsys, config):
    run = tmp_path / "table1" / "runs" / "bn-s121"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_acc": 10.0, "test_acc": 10.0}\n')
    (run / "summary.json").write_text(json.dumps({"best_test_acc": 10.0, "config": config}))
    assert main(["study", "table1", "--root", str(tmp_path), "--report-only"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and f"{run / 'summary.json'}: its configuration" in err[0]


def _record_many(path: Path, updates: int) -> None:
    record = InvocationRecord(path, environment("python -m l2bn study table1", 2), time.perf_counter())
    for _ in range(updates):
        record.update(trained=1)
    record.update(status="finished")


def test_invocations_ending_at_once_keep_every_record_whole(tmp_path):
    """Four invocations updating one environment.jsonl at once (the read-modify-write of each update): no
    line is lost or torn."""
    import multiprocessing

    path = tmp_path / "table1" / "environment.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_record_many, args=(path, 40)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0] * 4
    records = environment_records(get_study("table1"), tmp_path)
    assert len(records) == 4 and len({r["invocation"] for r in records}) == 4
    assert all(r["runs_trained"] == 40 and r["status"] == "finished" for r in records)


@needs_fashion
@pytest.mark.parametrize("name,only,subset,keys", [
    ("smallbatch", ("batch 8", "l2bn"), 160, {"val_acc", "train_eval_acc", "cone_train"}),
    ("mechanism", ("imbalance 100:1", "l2bn"), 2000, {"val_acc", "norm_cv", "test_class_acc"}),
    ("mechanism", ("30 % label noise", "bn"), 160, {"val_acc", "norm_cv", "test_class_acc"}),
])
def test_the_evidence_studies_miniatures_train_what_they_promise(name, only, subset, keys, mini_fashion, tmp_path):
    result = run_study(name, tmp_path, overrides=_mini(name, only, subset), data_dir=str(mini_fashion), jobs=1,
                       progress=False)
    assert len(result.trained) == 1 and not result.failed
    run = result.trained[0]
    config = json.loads((run / "config.json").read_text())
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert keys <= set(record) and config["val_size"] == 1000 * subset // 6000  # the split keeps its share
    assert (config["augment"], config["channels_last"]) == ("batched", True)
    if name == "smallbatch":
        assert config["recipe"]["batch_size"] == 8 and config["recipe"]["lr"] == pytest.approx(0.00625)
    else:
        assert len(record["norm_cv"]) == 19  # every norm layer of ResNet-20
        assert (config["imbalance"], config["label_noise"]) == ((100.0, 0.0) if "imbalance" in only[0] else (None, 0.3))
    page = result.page.read_text()
    assert f"**{only[0]}: {only[1]}**" not in page  # one row only: nothing to compare yet
    assert "Not enough finished runs" in page
    beyond = page[page.index("## Beyond the paper's table"):page.index("## Reading")]
    assert "**Feature cone.**" in beyond and "**Per-class test accuracy**" in beyond
    spread = (tmp_path / get_study(name).folder / "norm_spread.png").is_file()
    assert spread == ("**Spread of the per-sample norms**" in beyond) == (name == "mechanism")
    assert ("long-tailed grid" in beyond) == ("imbalance" in only[0])


@pytest.mark.parametrize("fits,reading", [
    ({"bn": [99.0, 98.5], "l2bn": [98.2, 99.1]}, "Every row fits"),
    ({"bn": [97.5, 97.7], "l2bn": [97.8, 98.0]}, "nearly, not fully, converged networks."),
    ({"ln": [56.0, 57.6], "gn": [65.0, 65.0]}, "Their rows measure early training"),
    ({"bn": [97.0, 96.0], "ln": [56.0, 57.6]}, "Those under 95 % (ln) measure early training"),
])
def test_fit_line_grades_unfitted_rows(monkeypatch, fits, reading):
    """The first line names every row under the 98 % line and says which are nearly fitted (≥ 95 %) and
    which measure early training."""
    from l2bn.studies import page

    class FakeRun:  # what _fit_line reads of a run
        def __init__(self, acc):
            self.failed, self.records = False, [{"train_eval_acc": acc, "train_acc": acc - 1}]

    runs = {label: [FakeRun(a) for a in accs] for label, accs in fits.items()}
    line = page._fit_line(STUDIES["converged"], runs)[0]
    assert reading in line
    for label, accs in fits.items():
        assert (f"{label} ({np.mean(accs):.1f} %)" in line) == (np.mean(accs) < 98)


def _fake_run(tmp_path, norm, seed, records):
    from l2bn.train.report import Run

    return Run(tmp_path / f"{norm}-s{seed}", {"norm": norm, "seed": seed}, records, summary={"best_test_acc": 0.0})


def _records(seed, cone, classes, spread):
    """Two epochs with a validation split; the angles (and cone) measured at epoch 2; the norm spread each epoch."""
    base = {"intra_train": 15.0 + seed % 3, "intra_test": 16.0, "inter": 45.0 + seed % 2, "iir_train": 0.33,
            "iir_test": 0.36}
    return [{"epoch": 1, "val_acc": 50.0, "test_acc": 49.0, "test_class_acc": [0.0] * 10,
             "norm_cv": {"bn1": spread[0], "layer1.0.bn1": spread[0] + 0.1, "layer1.0.bn2": spread[0] + 0.3}},
            {"epoch": 2, "val_acc": 60.0, "test_acc": 59.0, "test_class_acc": classes, **base,
             "cone_train": cone, "cone_test": cone - 1,
             "norm_cv": {"bn1": spread[1], "layer1.0.bn1": spread[1], "layer1.0.bn2": spread[1] + 0.2}}]


def test_beyond_section_tables_and_figure_from_the_records(tmp_path):
    """Cone means ± std, per-class accuracy at the selected epoch, the stage means of the norm spread (first →
    last epoch) and the figure, each computed here independently from the same records."""
    from l2bn.studies import beyond

    study = STUDIES["converged"]
    runs = {norm: [_fake_run(tmp_path, norm, s, _records(s, 40.0 + s % 4 + (norm == "l2bn"),
                                                         [float(s % 7 + c) for c in range(10)], (0.2 + s / 1000, 0.1)))
                   for s in (121, 122, 123)] for norm in ("bn", "l2bn")}
    lines = beyond.section(study, runs, tmp_path, Path("converged"))
    text = "\n".join(lines)
    cones = [40.0 + s % 4 + 1 for s in (121, 122, 123)]
    assert f"| l2bn | 3 | " in text and f"{np.mean(cones):.2f} ± {np.std(cones, ddof=1):.2f}" in text
    classes = np.mean([[float(s % 7 + c) for c in range(10)] for s in (121, 122, 123)], axis=0)
    assert "| bn | 3 | " + " | ".join(f"{m:.1f}" for m in classes) + " |" in text  # epoch 2: the best val_acc
    assert "0 T-shirt/top" in text and "long-tailed" not in text
    stem_first = np.mean([0.2 + s / 1000 for s in (121, 122, 123)])
    layer1_first, layer1_last = np.mean([0.2 + s / 1000 + 0.2 for s in (121, 122, 123)]), 0.2
    assert "| Row | stem | layer1 |" in text
    assert f"| bn | {stem_first:.3f} → 0.100 | {layer1_first:.3f} → {layer1_last:.3f} |" in text
    assert (tmp_path / "norm_spread.png").stat().st_size > 0 and "](converged/norm_spread.png)" in text
    assert beyond.stage_of("layer2.1.bn1") == "layer2" and beyond.stage_of("bn1") == "stem"


def test_beyond_section_without_the_records_says_so_and_tests_no_cone(tmp_path):
    from l2bn.studies import beyond, page

    plain = [{"epoch": 1, "test_acc": 50.0, "train_acc": 60.0, "intra_train": 15.0, "intra_test": 16.0,
              "inter": 45.0, "iir_train": 0.33, "iir_test": 0.36}]
    runs = {n: [_fake_run(tmp_path, n, s, plain) for s in (121, 122)] for n in ("bn", "l2bn")}
    assert "record none of these" in beyond.section(STUDIES["table1"], runs, tmp_path, Path("table1"))[0]
    assert list(page._family(STUDIES["table1"], runs)["l2bn"]) == list(page.METRICS)
    with_cone = {n: [_fake_run(tmp_path, n, s, _records(s, 40.0 + s % 2, [1.0] * 10, (0.2, 0.1)))
                     for s in (121, 122, 123)] for n in ("bn", "l2bn")}
    family = page._family(STUDIES["converged"], with_cone)["l2bn"]
    assert list(family) == [*page.METRICS, "cone_train", "cone_test"] and family["cone_test"].paired
    assert "Cone" not in page._paper_comparison(family)  # the paper makes no claim on the cone


def _angle_records(acc: float, intra: float, iir: float) -> list[dict]:
    return [{"epoch": 1, "val_acc": acc, "test_acc": acc, "intra_train": intra, "intra_test": intra, "inter": 40.0,
             "iir_train": iir, "iir_test": iir}]


def test_across_grids_tests_the_change_of_each_effect_against_scipy_and_holm(tmp_path):
    """The small-batch page's interaction: per seed, (L2BN − BN) in batch 16 against (L2BN − BN) in batch 128,
    paired by seed (scipy's ttest_rel on the two effect lists), Holm over the section's own family; a grid
    without runs (batch 8) is left out; recomputed here from the fake records."""
    from scipy.stats import ttest_rel

    from l2bn.studies import across, page

    study = STUDIES["smallbatch"]
    seeds = (121, 122, 123, 124)
    acc = {("batch 128", "bn"): [86.0, 86.5, 85.8, 86.2], ("batch 128", "l2bn"): [86.4, 86.6, 86.3, 86.1],
           ("batch 128", "gn-cpg4"): [76.0, 75.1, 77.2, 74.9], ("batch 16", "bn"): [87.0, 87.2, 86.9, 86.6],
           ("batch 16", "l2bn"): [86.9, 86.8, 87.1, 86.2], ("batch 16", "gn-cpg4"): [82.0, 83.1, 82.4, 81.7]}
    runs = {}
    for (grid, norm), values in acc.items():
        label = page.row_label(study, next(g for g in study.grids if g.label == grid), norm)
        runs[label] = [_fake_run(tmp_path, f"{grid}-{norm}", s, _angle_records(v, 14.0 + i * 0.3 + (norm == "l2bn"),
                                                                               0.45 + 0.01 * i))
                       for i, (s, v) in enumerate(zip(seeds, values))]
    text = "\n".join(page._reading_section(study, runs))
    assert "**Across the grids.**" in text and "batch 8" not in text.split("**Across the grids.**")[1]
    effect = {g: np.subtract(acc[(g, "l2bn")], acc[(g, "bn")]) for g in ("batch 128", "batch 16")}
    expected = ttest_rel(effect["batch 16"], effect["batch 128"])
    grid_rows = [(g.label, {n: page.row_label(study, g, n) for n in g.norms}) for g in study.grids]
    tests = across.interactions(grid_rows, runs, "bn")
    got = tests[("l2bn", "batch 16", "acc")]
    assert got.paired and got.p == pytest.approx(expected.pvalue)
    assert got.diff == pytest.approx(effect["batch 16"].mean() - effect["batch 128"].mean())
    p_values = sorted(d.p for d in tests.values() if d.testable)
    assert min(d.p_holm for d in tests.values() if d.testable) == pytest.approx(min(1.0, len(p_values) * p_values[0]))
    assert (f"| l2bn | accuracy | {effect['batch 128'].mean():+.2f} points (4) | {effect['batch 16'].mean():+.2f} "
            f"points (4) | {got.diff:+.2f} points [{got.low:+.2f}, {got.high:+.2f}]") in text
    # one grid finished, or a study of one grid: no section
    assert across.interactions(grid_rows[:1], runs, "bn") == {}
    assert "Across the grids" not in "\n".join(page._reading_section(STUDIES["table1"], {
        "bn": runs["batch 128: bn"], "l2bn": runs["batch 128: l2bn"]}))
    placements = STUDIES["placement"]  # one norm a grid, the baseline a placement: nothing to compare across
    rows = [(g.label, {n: page.row_label(placements, g, n) for n in g.norms}) for g in placements.grids]
    assert across.interactions(rows, {label: runs["batch 128: bn"] for _, r in rows for label in r.values()},
                               placements.baseline) == {}
