"""The census benchmark runs and prints its ratios (no timing thresholds: the machine may be shared)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_census_quick_prints_a_ratio_for_every_shape_and_a_model_total():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_census.py"), "--quick"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\| (\S+) \| (NCHW|channels_last) \| (train|eval) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|",
                      result.stdout, flags=re.M)
    shapes = {r[0] for r in rows}
    assert {"128x512", "64x512x2x2", "128x64x8x8", "4x8x4x8x8"} <= shapes
    assert all(float(r[3]) > 0 for r in rows)
    assert ("128x512", "NCHW", "train") in {r[:3] for r in rows}
    assert re.search(r"^worst ratio: train [\d.]+ \(target 1.10\), eval [\d.]+", result.stdout, flags=re.M)
    assert re.search(r"^\| quick \| channels_last \| eval \| 4 \|", result.stdout, flags=re.M)
    counts = re.search(r"^within the target: train (\d+) of (\d+), eval (\d+) of (\d+)$", result.stdout, flags=re.M)
    shape_rows = [r for r in rows if r[0] != "quick"]  # not the per-model totals
    timed = {m: sum(1 for r in shape_rows if r[2] == m) for m in ("train", "eval")}
    assert counts and (int(counts[2]), int(counts[4])) == (timed["train"], timed["eval"])
    assert int(counts[1]) == sum(1 for r in shape_rows if r[2] == "train" and float(r[3]) <= 1.10)
    assert re.search(r"^per call, eval, 2x4x2x3 \(µs.*BatchNorm2d [\d.]+, L2BatchNorm2d [\d.]+, torch.batch_norm "
                     r"[\d.]+, l2_batch_norm [\d.]+, the CPU op alone [\d.]+$", result.stdout, flags=re.M)


def test_epoch_benchmark_quick_prints_every_variants_ratio():
    import pytest

    from l2bn.data.vision import FASHION_MNIST_SYSTEM_DIR

    if not FASHION_MNIST_SYSTEM_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_epoch.py"), "--quick"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    ratios = dict(re.findall(r"^\| ([^|]+?) \| \d+ \| ([\d.]+) \|", result.stdout, flags=re.M))
    for name in ("current (per-sample, NCHW, eager)", "channels_last", "batched augment", "batched + channels_last",
                 "batched", "in-memory, inference_mode, 256"):
        assert float(ratios[name]) > 0, name
    assert float(ratios["current (per-sample, NCHW, eager)"]) == 1.0


def test_ab_benchmark_prints_both_ratios_for_each_shape():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ab.py"), "4x3x4x4,4x3x4x4cl,6x5",
                             "--mode", "train"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\s*(\S+) train calls +(\d+) .* ratio min ([\d.]+)  ratio p25 ([\d.]+)$", result.stdout,
                      flags=re.M)
    assert [r[0] for r in rows] == ["4x3x4x4", "4x3x4x4cl", "6x5"]
    assert all(int(r[1]) == 400 and float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
