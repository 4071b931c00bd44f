"""Acoustic scenes: feature extraction clips/s (serial and parallel) and one training step of each Table 6
model with BatchNorm and with L2BN in the same run (ratio > 1 means L2BN is slower).

    python benchmarks/bench_audio.py [--clips 32] [--repeats 2] [--batch 8] [--models fcnn,...] [--device cpu]

Extraction runs on synthetic 10-s 44.1 kHz wavs written in the real layout to a temporary folder (the
first clip is extracted once beforehand so librosa's one-off start-up is not counted in the serial rate;
the parallel rate includes starting the worker processes). Steps: SGD on (batch, 3, 128, 400) inputs, the
minimum over interleaved repeats after one warm-up step. With ``--device cuda`` it also times an epoch of
``fcnn`` at batch 32 over the fold-1 training-list length (13 964 clips) on random inputs.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn as nn

from l2bn import L2BatchNorm2d
from l2bn.bench import environment_line, training_step_ms
from l2bn.data import tau2020
from l2bn.data.tau2020 import cache as tau2020_cache
from l2bn.models import create_model

FOLD1_TRAIN_CLIPS = 13_964


def write_clips(root: Path, count: int) -> tau2020.Split:
    """``count`` 10-s noise-plus-tone wavs under ``root/audio`` and the matching split."""
    (root / "audio").mkdir(parents=True)
    rng = np.random.default_rng(0)
    t = np.arange(441_000) / 44_100
    files, labels = [], []
    for i in range(count):
        scene = tau2020.SCENES[i % len(tau2020.SCENES)]
        name = f"audio/{scene}-bench-{i}-0-a.wav"
        y = 0.2 * np.sin(2 * np.pi * 100 * (i % 10 + 1) * t) + 0.05 * rng.standard_normal(t.size)
        soundfile.write(root / name, y, 44_100)
        files.append(name)
        labels.append(i % len(tau2020.SCENES))
    return tau2020.Split(root, "train", tuple(files), tuple(labels), ("a",) * count)


def extraction_rates(count: int, workers: int) -> tuple[float, float]:
    """Clips per second of :func:`l2bn.data.tau2020.extract_split`, serial and with ``workers`` processes."""
    params = tau2020.FeatureParams()
    with tempfile.TemporaryDirectory() as tmp:
        split = write_clips(Path(tmp) / "data", count)
        tau2020_cache._read_clip(split.root / split.files[0], params)  # librosa's lazy imports and caches
        rates = []
        for name, n in (("serial", 0), ("parallel", workers)):
            start = time.perf_counter()
            tau2020.extract_split(split, params, Path(tmp) / name, workers=n, progress=False)
            rates.append(count / (time.perf_counter() - start))
    return rates[0], rates[1]


def step_seconds(name: str, batch: int, repeats: int, device: torch.device) -> tuple[float, float]:
    """Minimum time of one SGD step of ``name`` with BN and with L2BN (interleaved repeats)."""
    x = torch.rand(batch, 3, 128, 400, device=device)
    target = torch.randint(0, 10, (batch,), device=device)
    models = []
    for norm in (nn.BatchNorm2d, L2BatchNorm2d):
        torch.manual_seed(0)
        models.append(create_model(name, num_classes=10, norm_layer=norm).to(device))
    bn_ms, l2_ms = training_step_ms(models, x, target, repeats=repeats)
    return bn_ms / 1e3, l2_ms / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=32, help="synthetic clips to extract")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel extraction processes")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", default="asc_resnet17,fcnn,fsfcnn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(environment_line(device))
    if args.clips:
        serial, parallel = extraction_rates(args.clips, args.workers)
        print(f"\nfeature extraction, {args.clips} clips of 10 s: serial {serial:.1f} clips/s, "
              f"{args.workers} processes {parallel:.1f} clips/s")
    print(f"\n| model | batch | BN step s | L2BN step s | ratio |\n|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        bn, l2 = step_seconds(name, args.batch, args.repeats, device)
        print(f"| {name} | {args.batch}×3×128×400 | {bn:.3f} | {l2:.3f} | {l2 / bn:.2f} |", flush=True)
    if device.type == "cuda":
        steps = FOLD1_TRAIN_CLIPS // 32
        bn, l2 = step_seconds("fcnn", 32, args.repeats, device)
        print(f"\nfcnn epoch at batch 32 ({steps} steps): BN {bn * steps:.1f} s, L2BN {l2 * steps:.1f} s, "
              f"ratio {l2 / bn:.2f}")


if __name__ == "__main__":
    main()
