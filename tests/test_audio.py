"""TAU 2020 Mobile on a miniature set in the real layout: parsing, features, the cache, and bad input."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np
import pytest
import soundfile
import torch

from l2bn.data import DataError, build_data
from l2bn.data import tau2020
from l2bn.data.tau2020 import cache as tau2020_cache
from l2bn.data.tau2020 import dataset as tau2020_dataset

# Scaled-down extraction: 0.5 s at 8 kHz, n_fft 256, hop 64 → 1 + 62 = 63 STFT frames, 55 after the trims.
SMALL = tau2020.FeatureParams(sample_rate=8000, duration=0.5, n_fft=256, hop_length=64, n_mels=32)
TRAIN_DEVICES, TEST_DEVICES = ("a", "b", "s1"), ("a", "s2", "s4")


def _clip(scene: int, device: int, rate: int = 8000, seconds: float = 0.5) -> np.ndarray:
    """A tone per scene (distinct frequencies) with a device-dependent gain and a little noise."""
    t = np.arange(int(rate * seconds)) / rate
    rng = np.random.default_rng(100 * scene + device)
    return (0.3 + 0.1 * device) * np.sin(2 * np.pi * 150 * (scene + 1) * t) + 0.01 * rng.standard_normal(t.size)


def write_tau2020(base: Path, *, rate: int = 8000, seconds: float = 0.5, train_devices=TRAIN_DEVICES,
                  test_devices=TEST_DEVICES) -> Path:
    """A miniature development set one folder down: audio/, meta.csv, evaluation_setup/ (the evaluate list in
    CRLF, as the official fold1_evaluate.csv)."""
    root = base / tau2020.SUBFOLDER
    (root / "audio").mkdir(parents=True)
    (root / "evaluation_setup").mkdir()
    rows = {"train": [], "evaluate": []}
    for k, scene in enumerate(tau2020.SCENES):
        for split, devices in (("train", train_devices), ("evaluate", test_devices)):
            for d, device in enumerate(devices):
                name = f"audio/{scene}-lyon-{k}-{d}{split[0]}-{device}.wav"
                soundfile.write(root / name, _clip(k, d + (3 if split == "evaluate" else 0), rate, seconds), rate)
                rows[split].append((name, scene))
    meta = ["filename\tscene_label\tidentifier\tsource_label"]
    meta += [f"{n}\t{s}\tlyon-0\t{n.rsplit('-', 1)[1][:-4]}" for split in rows.values() for n, s in split]
    (root / "meta.csv").write_text("\n".join(meta) + "\n")
    for split, lines in rows.items():
        text = "\n".join(["filename\tscene_label"] + [f"{n}\t{s}" for n, s in lines]) + "\n"
        path = root / "evaluation_setup" / tau2020.SPLIT_FILES[split]
        path.write_bytes(text.replace("\n", "\r\n").encode() if split == "evaluate" else text.encode())
    return root


@pytest.fixture()
def tau(tmp_path):
    return write_tau2020(tmp_path / "data")


# ------------------------------------------------------------------------------------------- features
def _independent_features(y: np.ndarray, sr: int) -> np.ndarray:
    """The issue's recipe from librosa's STFT and filterbank, with explicit loops for Δ (float64)."""
    import librosa

    spec = np.abs(librosa.stft(y, n_fft=2048, hop_length=1024, window="hann", center=True, pad_mode="reflect")) ** 2
    basis = librosa.filters.mel(sr=sr, n_fft=2048, n_mels=128, fmin=0.0, fmax=sr / 2, htk=True, norm=None)
    logmel = np.log(basis @ spec + 1e-8)
    logmel = (logmel - logmel.min()) / (logmel.max() - logmel.min())

    def delta(x):
        return np.stack([(x[:, t + 1] - x[:, t - 1]) / 10 + (x[:, t + 2] - x[:, t - 2]) / 5
                         for t in range(2, x.shape[1] - 2)], axis=1)

    d1 = delta(logmel)
    d2 = delta(d1)
    return np.stack([logmel[:, 4:-4], d1[:, 2:-2], d2])


def test_extract_features_matches_independent_librosa_on_10s_44k():
    rng = np.random.default_rng(0)
    t = np.arange(441_000) / 44_100
    y = 0.2 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 0.5 * t)) + 0.05 * rng.standard_normal(t.size)
    features = tau2020.logmel_features(y)
    assert features.shape == (3, 128, 423) and features.dtype == torch.float32
    expected = _independent_features(y, 44_100)
    assert np.allclose(features.numpy(), expected, atol=2e-6, rtol=0)
    assert float(features[0].min()) == 0.0 and float(features[0].max()) == 1.0


def test_extract_features_mono_padding_and_truncation():
    rng = np.random.default_rng(1)
    y = rng.standard_normal(SMALL.samples + 500)
    base = tau2020.logmel_features(y, 8000, SMALL)  # the first 0.5 s only
    assert base.shape == SMALL.shape == (3, 32, 55)
    assert torch.equal(base, tau2020.logmel_features(y[: SMALL.samples], 8000, SMALL))
    stereo = np.stack([y + 0.1, y - 0.1], axis=1)  # (samples, channels), mean = y
    assert torch.allclose(tau2020.logmel_features(stereo, 8000, SMALL), base, atol=1e-6)
    assert torch.allclose(tau2020.logmel_features(torch.from_numpy(stereo.T), 8000, SMALL), base, atol=1e-6)
    short = y[:1000]
    padded = np.concatenate([short, np.zeros(SMALL.samples - 1000)])
    assert torch.equal(tau2020.logmel_features(short, 8000, SMALL), tau2020.logmel_features(padded, 8000, SMALL))
    with pytest.raises(ValueError, match="sample_rate 16000 differs"):
        tau2020.logmel_features(y, 16000, SMALL)


def test_real_recording_when_dcase_util_is_installed():
    """dcase_util (PyPI) ships a real 10-s stereo 44.1 kHz street recording; found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("dcase_util")
    if spec is None or spec.origin is None:
        pytest.skip("dcase_util is not installed (pip install --no-deps dcase_util) for its example recording")
    path = Path(spec.origin).parent / "utils" / "example_data" / "acoustic_scene.wav"
    if not path.is_file():
        pytest.skip(f"dcase_util has no {path}")
    waveform, rate = soundfile.read(path)
    assert rate == 44_100 and waveform.ndim == 2
    features = tau2020.logmel_features(waveform, rate)
    assert features.shape == (3, 128, 423) and torch.isfinite(features).all()
    assert waveform.shape[0] == 441_001  # one sample over 10 s: the features keep the first 441 000, as the reference
    expected = _independent_features(waveform[:441_000].mean(axis=1), rate)
    assert np.allclose(features.numpy(), expected, atol=2e-6, rtol=0)


# --------------------------------------------------------------------------------------------- layout
def test_layout_one_level_down_and_crlf_csv(tau):
    root = tau2020.find_root(tau.parent)
    assert root == tau and b"\r\n" in (tau / "evaluation_setup" / "fold1_evaluate.csv").read_bytes()
    train = tau2020.read_split(root, "train")
    assert len(train.files) == 30 and train.files[0] == "audio/airport-lyon-0-0t-a.wav"  # no stray \r
    assert train.labels[:3] == (0, 0, 0) and train.labels[-1] == tau2020.SCENES.index("tram") == 9
    assert set(train.devices) == set(TRAIN_DEVICES) and tau2020.device_of("audio/x-y-1-2-s5.wav") == "s5"
    evaluate = tau2020.read_split(root, "evaluate")
    assert set(evaluate.devices) == set(TEST_DEVICES) and evaluate.labels[-1] == 9  # no "tram\r"
    assert all(not f.endswith("\r") for f in evaluate.files)
    assert tau2020.SCENES == tuple(sorted(tau2020.SCENES))


def test_bundle_shapes_crop_devices_and_cache(tau, tmp_path):
    cache = tmp_path / "cache"
    data = tau2020.tau2020(tau.parent, params=SMALL, cache_dir=cache, workers=0)
    assert (data.name, data.num_classes, data.in_channels, data.image_size) == ("tau2020", 10, 3, 32)
    assert (len(data.train), len(data.train_eval), len(data.test)) == (30, 30, 30)
    crop = round(400 * 55 / 423)
    x, y = data.train[4]
    assert x.shape == (3, 32, crop) and y == 1
    whole, _ = data.train_eval[4]
    assert whole.shape == (3, 32, 55)
    starts = {s for s in range(55 - crop) if torch.equal(whole[..., s : s + crop], x)}
    assert starts  # the crop is a window of the clip, never starting at the last position
    test_x, test_y = data.test[7]
    clip = tau / data.test.files[7]
    assert torch.equal(test_x, tau2020.logmel_features(soundfile.read(clip)[0], 8000, SMALL))
    assert test_y == 2 and data.test.devices[7] == "s2" and data.test.devices[8] == "s4"
    folder = cache / SMALL.key()
    assert sorted(p.name for p in folder.iterdir()) == ["evaluate", "train"]
    assert np.load(folder / "train" / "logmel.npy", mmap_mode="r").shape == (30, 32, 63)  # Δ on loading
    assert json.loads((folder / "train" / "index.json").read_text())["devices"][:3] == ["a", "b", "s1"]


def test_loader_workers_open_the_memory_map_themselves(tau, tmp_path):
    import pickle

    data = tau2020.tau2020(tau, params=SMALL, cache_dir=tmp_path / "cache", workers=0)
    data.test[0]  # opens the map in this process
    assert pickle.loads(pickle.dumps(data.test))._array is None  # workers never receive the mapped data
    loader = torch.utils.data.DataLoader(data.test, batch_size=7, num_workers=2)
    x, y = next(iter(loader))
    assert torch.equal(x, torch.stack([data.test[i][0] for i in range(7)])) and y.tolist() == data.test.targets[:7]


def test_cache_is_reused_and_parameters_change_re_extracts(tau, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = tau2020.tau2020(tau, params=SMALL, cache_dir=cache, workers=0)
    reads = []
    real = tau2020_cache._read_clip
    monkeypatch.setattr(tau2020_cache, "_read_clip", lambda path, params: reads.append(path) or real(path, params))
    again = tau2020.tau2020(tau, params=SMALL, cache_dir=cache, workers=0)
    assert reads == [] and torch.equal(again.test[3][0], first.test[3][0])
    other = tau2020.FeatureParams(sample_rate=8000, duration=0.5, n_fft=256, hop_length=64, n_mels=24)
    changed = tau2020.tau2020(tau, params=other, cache_dir=cache, workers=0)
    assert len(reads) == 60 and changed.test[3][0].shape == (3, 24, 55) and other.key() != SMALL.key()


class _Killed(BaseException):
    """Stands for an interruption (KeyboardInterrupt, SIGTERM) in the middle of an extraction."""


def test_extraction_workers_use_one_blas_thread(tau, tmp_path, monkeypatch):
    """Each worker process computes one clip at a time: numpy's BLAS must not add threads of its own (two
    2-thread workers on 2 cores ran slower than one serial process). The forked workers write what they see."""
    from threadpoolctl import threadpool_info

    split = tau2020.read_split(tau, "train")
    shape = tau2020_cache._read_clip(tau / split.files[0], SMALL).shape

    def blas_threads(path, params):
        threads = max((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=1)
        return np.full(shape, threads, dtype=np.float32)

    monkeypatch.setattr(tau2020_cache, "_read_clip", blas_threads)
    folder = tau2020.extract_split(split, SMALL, tmp_path / "cache", workers=2, chunk=3)
    assert np.all(np.load(folder / "logmel.npy") == 1)


def test_interrupted_extraction_resumes_with_the_missing_clips(tau, tmp_path, monkeypatch):
    cache, calls, killed = tmp_path / "cache", [], []
    real = tau2020_cache._read_clip

    def flaky(path, params):
        calls.append(path)
        if len(calls) == 7 and not killed:
            killed.append(True)
            raise _Killed
        return real(path, params)

    monkeypatch.setattr(tau2020_cache, "_read_clip", flaky)
    split = tau2020.read_split(tau, "train")
    with pytest.raises(_Killed):
        tau2020.extract_split(split, SMALL, cache, workers=0, chunk=3)
    folder = cache / SMALL.key() / "train"
    assert not (folder / "index.json").exists()  # not marked complete
    assert np.load(folder / "done.npy").sum() == 6  # two chunks of three were flushed and marked
    calls.clear()
    tau2020.extract_split(split, SMALL, cache, workers=0, chunk=3)
    assert len(calls) == 30 - 6
    features = np.load(folder / "logmel.npy")
    for i in (0, 5, 6, 29):
        assert np.array_equal(features[i], real(tau / split.files[i], SMALL))


def _truncate(path: Path, keep: float) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


DAMAGE = {
    "logmel truncated, index removed": lambda f: (_truncate(f / "logmel.npy", 0.5), (f / "index.json").unlink()),
    "logmel truncated, index kept": lambda f: _truncate(f / "logmel.npy", 0.5),
    "index garbled": lambda f: (f / "index.json").write_text('{"files": ["a'),
    "index not an object": lambda f: (f / "index.json").write_text("[1, 2]"),
    "manifest garbled, index removed": lambda f: ((f / "manifest.json").write_text("\x00garbage"),
                                                  (f / "index.json").unlink()),
    "done truncated, index removed": lambda f: (_truncate(f / "done.npy", 0.6), (f / "index.json").unlink()),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_is_re_extracted_never_read_as_zeros(tau, tmp_path, monkeypatch, damage):
    split = tau2020.read_split(tau, "train")
    folder = tau2020.extract_split(split, SMALL, tmp_path / "cache", workers=0)
    good = np.load(folder / "logmel.npy")
    DAMAGE[damage](folder)
    reads = []
    real = tau2020_cache._read_clip
    monkeypatch.setattr(tau2020_cache, "_read_clip", lambda path, params: reads.append(path) or real(path, params))
    assert tau2020.extract_split(split, SMALL, tmp_path / "cache", workers=0) == folder
    # damaged arrays or manifest: every clip again; a damaged index over whole arrays: the index is rewritten
    assert len(reads) == (0 if damage.startswith("index") else len(split.files))
    assert np.array_equal(np.load(folder / "logmel.npy"), good)
    data = tau2020_dataset.AudioFeatureDataset(folder)
    assert torch.equal(data[len(data) - 1][0], tau2020.stack_deltas(torch.from_numpy(good[-1])))


def test_a_clip_changed_after_caching_is_re_extracted_alone(tau, tmp_path, monkeypatch):
    split = tau2020.read_split(tau, "train")
    folder = tau2020.extract_split(split, SMALL, tmp_path / "cache", workers=0)
    before = np.load(folder / "logmel.npy")
    changed = tau / split.files[4]
    soundfile.write(changed, _clip(9, 9), 8000)  # another recording under the same name
    reads = []
    real = tau2020_cache._read_clip
    monkeypatch.setattr(tau2020_cache, "_read_clip", lambda path, params: reads.append(path) or real(path, params))
    tau2020.extract_split(split, SMALL, tmp_path / "cache", workers=0)
    after = np.load(folder / "logmel.npy")
    assert reads == [changed] and np.array_equal(after[4], real(changed, SMALL))
    assert not np.array_equal(after[4], before[4]) and np.array_equal(np.delete(after, 4, 0), np.delete(before, 4, 0))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_or_nan_wav_is_an_error_naming_the_file(tau, tmp_path, workers):
    clip = tau / "audio" / "park-lyon-4-1t-b.wav"
    _truncate(clip, 1 / 3)  # a third of the bytes: the header still claims the whole clip
    with pytest.raises(DataError, match=r"park-lyon-4-1t-b.wav holds \d+ samples, fewer than the 4000 .*truncated"):
        tau2020.tau2020(tau, params=SMALL, cache_dir=tmp_path / "c", workers=workers)
    soundfile.write(clip, np.full(4000, np.nan), 8000, subtype="FLOAT")
    with pytest.raises(DataError, match=r"park-lyon-4-1t-b.wav holds NaN or infinite samples"):
        tau2020.tau2020(tau, params=SMALL, cache_dir=tmp_path / "c", workers=workers)


def test_a_csv_starting_with_a_utf8_bom_is_read(tau):
    path = tau / "evaluation_setup" / "fold1_train.csv"
    plain = tau2020.read_split(tau, "train")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert tau2020.read_split(tau, "train") == plain


def _extract_counting(root: Path, cache: Path, log: Path) -> None:
    real = tau2020_cache._read_clip

    def counting(path, params):
        with open(log, "a") as f:
            f.write(f"{path.name}\n")
        return real(path, params)

    tau2020_cache._read_clip = counting  # in this forked child only
    tau2020.extract_split(tau2020.read_split(root, "train"), SMALL, cache, workers=0)


def test_two_processes_extract_a_split_once(tau, tmp_path):
    import multiprocessing

    ctx, log = multiprocessing.get_context("fork"), tmp_path / "reads.log"
    procs = [ctx.Process(target=_extract_counting, args=(tau, tmp_path / "cache", log)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert len(log.read_text().splitlines()) == 30  # the second waited for the lock and found the split done
    split = tau2020.read_split(tau, "train")
    folder = tau2020.extract_split(split, SMALL, tmp_path / "cache", workers=0)
    assert np.array_equal(np.load(folder / "logmel.npy")[3], tau2020_cache._read_clip(tau / split.files[3], SMALL))


def test_parallel_extraction_equals_serial(tau, tmp_path):
    split = tau2020.read_split(tau, "evaluate")
    serial = tau2020.extract_split(split, SMALL, tmp_path / "serial", workers=0)
    parallel = tau2020.extract_split(split, SMALL, tmp_path / "parallel", workers=2, chunk=4)
    assert np.array_equal(np.load(serial / "logmel.npy"), np.load(parallel / "logmel.npy"))


def test_spec_masks_and_scaling():
    torch.manual_seed(0)
    masks = tau2020.SpecAugment(freq_width=5, time_width=7)
    x = torch.ones(3, 32, 55)
    widths = set()
    for _ in range(50):
        out = masks(x)
        for c in range(3):
            zero = out[c] == 0
            rows, cols = zero.all(1), zero.all(0)
            assert int(rows.sum()) <= 4 and int(cols.sum()) <= 6
            assert torch.equal(zero, rows[:, None] | cols[None, :])  # only whole bands and whole frames
            widths.add((int(rows.sum()), int(cols.sum())))
    assert len(widths) > 10 and torch.equal(x, torch.ones(3, 32, 55))  # input untouched
    full = tau2020.SpecAugment()
    assert (full.freq_width, full.time_width) == (13, 40)  # ≤ 12 bins and ≤ 39 frames, as the reference


def test_masked_training_split(tau, tmp_path):
    data = tau2020.tau2020(tau, params=SMALL, cache_dir=tmp_path / "c", workers=0, spec_masks=True)
    assert data.train.augment.freq_width == round(13 * 32 / 128) and data.train.augment.time_width == 5
    assert data.test.augment is None and data.train_eval.crop is None


# ------------------------------------------------------------------------------------------ bad input
def test_missing_data_dir_and_setup(tmp_path):
    with pytest.raises(DataError, match="pass --data-dir"):
        tau2020.find_root(None)
    with pytest.raises(DataError, match="no evaluation_setup/"):
        build_data("tau2020", tmp_path)


def test_missing_csv(tau):
    (tau / "evaluation_setup" / "fold1_evaluate.csv").unlink()
    with pytest.raises(DataError, match="missing .*fold1_evaluate.csv"):
        tau2020.tau2020(tau, params=SMALL, workers=0)


def test_csv_without_expected_columns(tau):
    (tau / "evaluation_setup" / "fold1_train.csv").write_text("file,label\naudio/a.wav,park\n")
    with pytest.raises(DataError, match=r"fold1_train.csv has columns \['file,label'\]; expected .*scene_label"):
        tau2020.read_split(tau, "train")


def test_unknown_scene_label(tau):
    path = tau / "evaluation_setup" / "fold1_evaluate.csv"
    path.write_text(path.read_text().replace("\tpark\n", "\tbeach\n", 1))
    with pytest.raises(DataError, match=r"fold1_evaluate.csv line \d+: unknown scene label 'beach'"):
        tau2020.read_split(tau, "evaluate")


def test_missing_wav(tau):
    (tau / "audio" / "bus-lyon-1-1t-b.wav").unlink()
    with pytest.raises(DataError, match="missing under .*bus-lyon-1-1t-b.wav"):
        tau2020.read_split(tau, "train")


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_wav(tau, tmp_path, workers):
    (tau / "audio" / "tram-lyon-9-2e-s4.wav").write_bytes(b"RIFF\x00\x00not a wave file")
    with pytest.raises(DataError, match="cannot read .*tram-lyon-9-2e-s4.wav"):
        tau2020.tau2020(tau, params=SMALL, cache_dir=tmp_path / "c", workers=workers)


def test_wrong_sample_rate_names_the_file(tau, tmp_path):
    with pytest.raises(DataError, match=r"airport-lyon-0-0t-a.wav is sampled at 8000 Hz, expected 44100 Hz"):
        tau2020.tau2020(tau, cache_dir=tmp_path / "c", workers=0)


# ------------------------------------------------------------------------------------- end to end
def test_compare_one_epoch_end_to_end_with_device_table_and_confusion(tmp_path, monkeypatch, capsys):
    from l2bn.cli import main

    tiny = tau2020.FeatureParams(sample_rate=8000, duration=0.25, n_fft=256, hop_length=64, n_mels=16)
    monkeypatch.setattr(tau2020_dataset, "DEFAULT_PARAMS", tiny)  # what build_data("tau2020") extracts with
    write_tau2020(tmp_path / "data", train_devices=("a", "b"), test_devices=("a", "b", "s1", "s2", "s3", "s5"))
    out = tmp_path / "cmp"
    argv = ["compare", "--dataset", "tau2020", "--model", "fcnn", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
            "--batch-size", "10", "--seeds", "121", "--out", str(out), "--no-progress",
            "--jobs", "1"]  # in this process: spawned jobs would not see the patched parameters
    assert main(argv) == 0
    run = json.loads((out / "runs" / "l2bn-s121" / "summary.json").read_text())
    assert run["config"]["recipe"]["schedule"] == "cosine-restarts" and run["config"]["recipe"]["spec_masks"]
    record = json.loads((out / "runs" / "l2bn-s121" / "metrics.jsonl").read_text().splitlines()[0])
    confusion = record["test_confusion"]
    assert confusion["groups"] == ["a", "b", "s1", "s2", "s3", "s5"] and confusion["classes"] == list(tau2020.SCENES)
    counts = np.asarray(confusion["counts"])
    assert counts.shape == (6, 10, 10) and (counts.sum(axis=2) == 1).all()  # one clip per (device, scene)
    assert np.trace(counts.sum(0)) / 60 * 100 == pytest.approx(record["test_acc"])
    assert "intra_train" in record  # angle metrics on the pooled class maps (10-dimensional)
    markdown = (out / "results.md").read_text()
    assert "### Accuracy per device (%)" in markdown
    assert "| Norm | Seeds | a | b | s1 | s2 | s3 | s5 | s1-s3 |" in markdown
    assert "| s4-s6 |" not in markdown  # a group is reported only when all its devices are present
    rows = list(csv.DictReader(open(out / "devices.csv")))
    assert [r["norm"] for r in rows] == ["bn", "l2bn"]
    s1_s3 = np.trace(counts[2:5].sum(0)) / 30 * 100
    assert float(rows[1]["s1-s3_mean"]) == pytest.approx(s1_s3)
    image = plt.imread(out / "confusion.png")
    assert image.shape[0] > 300 and image.shape[1] > 600  # two panels
    capsys.readouterr()
    assert main(["analyze", str(out / "runs" / "l2bn-s121" / "best.pt"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "acc s5" in printed and f"test_acc     {record['test_acc']:.4f}" in printed


def test_tau2020_run_resumes_exactly_under_bf16_and_channels_last(tmp_path, monkeypatch):
    from l2bn.models import create_model
    from l2bn.train import TrainConfig, train
    from l2bn.train.recipes import get_recipe

    tiny = tau2020.FeatureParams(sample_rate=8000, duration=0.25, n_fft=256, hop_length=64, n_mels=16)
    monkeypatch.setattr(tau2020_dataset, "DEFAULT_PARAMS", tiny)
    write_tau2020(tmp_path / "data")
    recipe = get_recipe("tau2020-fcnn", epochs=2, batch_size=10, metrics_every=1)

    def small(num_classes, in_channels, norm):
        return create_model("fcnn", num_classes=num_classes, in_channels=in_channels, norm_layer=norm,
                            widths=(8, 8, 16))

    def run(name, **kw):
        config = TrainConfig(dataset="tau2020", model="fcnn", norm="l2bn", data_dir=str(tmp_path / "data"),
                             out=str(tmp_path / name), recipe=recipe, amp="bf16", channels_last=True, progress=False,
                             resume=kw.pop("resume", False))
        return train(config, model_fn=small, log=lambda m: None, **kw)

    run("full")
    assert run("part", stop_after=1)["stopped_after"] == 1
    run("part", resume=True)
    full = (tmp_path / "full" / "metrics.jsonl").read_text()
    assert full == (tmp_path / "part" / "metrics.jsonl").read_text()
    assert all(np.isfinite(json.loads(line)["train_loss"]) for line in full.splitlines())


TINY = tau2020.FeatureParams(sample_rate=8000, duration=0.25, n_fft=256, hop_length=64, n_mels=16)


def _ddp_worker(rank: int, port: int, data_dir: str, out: str) -> None:
    import os

    from l2bn.train import TrainConfig, train
    from l2bn.train.recipes import get_recipe

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tau2020_dataset.DEFAULT_PARAMS = TINY
    config = TrainConfig(dataset="tau2020", model="fcnn", norm="l2bn", data_dir=data_dir, out=out, device="cpu",
                         recipe=get_recipe("tau2020-fcnn", epochs=1, batch_size=10, metrics_every=1), sync_bn=True,
                         progress=False, model_kwargs={"widths": [8, 8, 16]})
    train(config, log=lambda m: None)


@pytest.mark.slow  # two spawned processes: ~45 s on 2 busy cores (the fast suite covers Subset shards)
def test_ddp_two_ranks_extract_once_and_reduce_the_device_confusion(tmp_path, monkeypatch):
    import socket

    import torch.multiprocessing as mp

    from l2bn.train import analyze_checkpoint

    write_tau2020(tmp_path / "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path / "data"), str(out)), nprocs=2, start_method="spawn")
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    counts = np.asarray(record["test_confusion"]["counts"])
    assert counts.sum() == 30 and (counts.sum(axis=2) == 1).all()  # both shards, every clip once
    monkeypatch.setattr(tau2020_dataset, "DEFAULT_PARAMS", TINY)
    single = analyze_checkpoint(out / "last.pt", device="cpu")  # one process, the whole test set
    assert single["test_confusion"] == record["test_confusion"]
    assert single["test_acc"] == pytest.approx(record["test_acc"])


def _ddp_bad_clip_worker(rank: int, port: int, data_dir: str, out: str) -> None:
    try:
        _ddp_worker(rank, port, data_dir, out)
    except DataError as exc:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"rank{rank}.err").write_text(str(exc))


@pytest.mark.slow  # two spawned processes
def test_ddp_bad_clip_fails_every_rank_with_the_file_name(tmp_path):
    import socket

    import torch.multiprocessing as mp

    root = write_tau2020(tmp_path / "data")
    (root / "audio" / "park-lyon-4-1t-b.wav").write_bytes(b"RIFF\x00\x00broken")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    mp.start_processes(_ddp_bad_clip_worker, args=(port, str(tmp_path / "data"), str(out)), nprocs=2,
                       start_method="spawn")
    for rank in (0, 1):  # rank 1 did not wait forever for rank 0's extraction
        assert "cannot read" in (out / f"rank{rank}.err").read_text()
        assert "park-lyon-4-1t-b.wav" in (out / f"rank{rank}.err").read_text()
