"""The studies of docs/results/: statistics against independent formulas, the catalog's sizing, and a one-epoch
miniature of every study's command on real Fashion-MNIST images (skipped where the data set is absent)."""
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from l2bn.cli import main
from l2bn.data import vision
from l2bn.studies import (SECTIONS, STUDIES, StudyOverrides, bootstrap_interval, compare_groups,
                          estimate_seconds, get_study, load_study_runs, run_study, study_command, welch_t_test)
from l2bn.studies.catalog import ZOO
from l2bn.studies.folder import code_version, environment_records

# ------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("a,b", [([91.2, 91.5, 90.9, 91.8, 91.1], [90.7, 91.0, 90.8]),
                                 ([1.0, 2.0, 4.0], [1.5, 1.6, 1.7, 1.8]), ([5.0, 5.1], [4.0, 7.0, 9.5])])
def test_welch_matches_scipy_and_the_textbook_formula(a, b):
    t, df, p = welch_t_test(a, b)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic, rel=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-10)
    # Welch–Satterthwaite in float64, written out independently
    x, y = np.array(a, np.float64), np.array(b, np.float64)
    sa, sb = ((x - x.mean()) ** 2).sum() / (len(x) - 1) / len(x), ((y - y.mean()) ** 2).sum() / (len(y) - 1) / len(y)
    assert df == pytest.approx((sa + sb) ** 2 / (sa * sa / (len(x) - 1) + sb * sb / (len(y) - 1)), rel=1e-12)


def test_welch_is_undefined_without_two_seeds_or_without_spread():
    assert all(math.isnan(v) for v in welch_t_test([1.0], [1.0, 2.0]))
    assert all(math.isnan(v) for v in welch_t_test([1.0, 1.0], [2.0, 2.0]))
    d = compare_groups([90.0], [89.0, 89.5])
    assert not d.testable and not d.beyond_spread and d.diff == pytest.approx(0.75)


def test_bootstrap_interval_is_seeded_and_close_to_the_normal_interval_for_large_groups():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 1.0, 400), rng.normal(0.0, 2.0, 500)
    low, high = bootstrap_interval(a, b)
    assert (low, high) == bootstrap_interval(a, b)
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    center = a.mean() - b.mean()
    z = scipy_stats.norm.ppf(0.975)
    assert low == pytest.approx(center - z * se, abs=0.05) and high == pytest.approx(center + z * se, abs=0.05)
    assert bootstrap_interval([3.0, 3.0], [1.0, 1.0, 1.0]) == (2.0, 2.0)  # no spread: the exact difference
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_interval(a, b, level=1.5)


def test_a_clear_difference_is_beyond_the_spread_and_a_null_one_is_not():
    assert compare_groups([92.0, 92.1, 91.9, 92.05, 91.95], [90.0, 90.1, 89.9, 90.05, 89.95]).beyond_spread
    assert not compare_groups([90.0, 91.0, 90.5], [90.4, 90.6, 90.2]).beyond_spread

# ---------------------------------------------------------------------------------------------- catalog


def test_the_catalog_has_the_issues_four_studies_within_about_six_hours():
    assert list(STUDIES) == ["table1", "norms", "placement", "curves"]
    assert ZOO == ("bn", "l2bn", "ln", "in", "gn-cpg4", "gn-cpg8", "sn", "bcn", "bin", "lnbn", "inbn", "pnbn", "ubn")
    table1 = get_study("table1")
    assert table1.seeds == (121, 122, 123, 124, 125) and table1.train_subset is None and table1.epochs >= 10
    assert get_study("norms").grids[0].norms == ZOO and len(get_study("norms").seeds) >= 3
    assert [g.placement for g in get_study("placement").grids] == ["none", "classifier", "stage1", "stage2-3", "all"]
    assert get_study("curves").runs_of == "table1" and estimate_seconds(get_study("curves")) == 0
    total = sum(estimate_seconds(s) for s in STUDIES.values()) / 3600
    assert 5.0 <= total <= 7.0, total


def test_the_estimate_is_the_documented_formula():
    one = get_study("norms").apply(StudyOverrides(epochs=2, seeds=(121,), only=("sn",)))  # angles at epoch 2 only
    test_pass = 15.4 * 10_000 / 20_240
    expected = 1.99 * (2 * (132.2 * 5_000 / 60_000 + test_pass) + (15.4 - test_pass) * 5_000 / 10_240)
    assert estimate_seconds(one) == pytest.approx(expected, rel=1e-12)


def test_overrides_make_a_miniature_and_unknown_names_are_refused():
    mini = get_study("norms").apply(StudyOverrides(epochs=1, train_subset=128, seeds=(121,), only=("bn", "ubn")))
    assert mini.grids[0].norms == ("bn", "ubn") and mini.epochs == 1 and mini.metrics_every == 1
    assert mini.run_count() == 2
    with pytest.raises(ValueError, match="has no norm 'bogus'"):
        get_study("norms").apply(StudyOverrides(only=("bogus",)))
    with pytest.raises(ValueError, match="has no grid 'stage9'"):
        get_study("placement").apply(StudyOverrides(only=("stage9",)))
    with pytest.raises(ValueError, match="unknown study"):
        get_study("table9")
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
    """The first 500 training and 200 test images of the installed Fashion-MNIST, in its own idx format."""
    import torchvision

    root = tmp_path_factory.mktemp("fashion")
    system = str(vision._fashion_raw_root(None, None))  # decompressed once into the cache, as the loader does
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 500), ("t10k", 200)):
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
              "curves": ("bn", "l2bn")}


def _mini(name: str, only) -> StudyOverrides:
    return StudyOverrides(epochs=1, train_subset=128, seeds=(121,), only=tuple(only))


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
    assert "not available" in page and "Wang et al., arXiv:2207.02625" in page
    assert "Runs finished: 2 of 2 planned" in page and "| date | command | CPU |" in page
    baseline = only[0].upper() if name != "placement" else "BN everywhere (placement none)"
    assert f"**{only[1]}** against {baseline}: accuracy" in page
    assert "not testable: fewer than two seeds in a group" in page
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
