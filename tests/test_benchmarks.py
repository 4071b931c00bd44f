"""The census benchmark runs and prints its ratios (no timing thresholds: the machine may be shared)."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2bn.kernels import cpp

ROOT = Path(__file__).resolve().parents[1]


def test_census_quick_prints_a_ratio_for_every_shape_and_a_model_total():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_census.py"), "--quick", "--steps",
                             "--models", "resnet20"], env=env,
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
    medians = re.findall(r"^\| (\S+) \| (?:NCHW|channels_last) \| (train|eval) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [-\d.]+ \| "
                         r"\d+ \| ([\d.]+) \|$", result.stdout, flags=re.M)
    assert len(medians) == len(shape_rows) and all(float(r) > 0 for *_, r in medians)
    by_median = re.search(r"^within the target by the ratio of medians: train (\d+) of (\d+), eval (\d+) of (\d+)$",
                          result.stdout, flags=re.M)
    assert by_median and int(by_median[1]) == sum(1 for _, m, r in medians if m == "train" and float(r) <= 1.10)
    steps = re.findall(r"^\| resnet20 \| (NCHW|channels_last) \| 128 \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", result.stdout,
                       flags=re.M)
    assert sorted(layout for layout, _ in steps) == ["NCHW", "channels_last"] and all(float(r) > 0 for _, r in steps)
    assert "resnet56" not in result.stdout.split("| model | layout | batch |")[1]
    probes = re.findall(r"^per call, eval, 2x4x2x3 \(µs, .*; (before|after) the shapes\): BatchNorm2d [\d.]+, "
                        r"L2BatchNorm2d [\d.]+, torch.batch_norm [\d.]+, l2_batch_norm [\d.]+, "
                        r"the CPU op alone [\d.]+$", result.stdout, flags=re.M)
    assert probes == ["before", "after"]  # the host's speed at both ends of the run


def test_census_shapes_come_from_a_shape_only_forward():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_census import layer_shapes
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    # ResNet-20: the stem's norm and two per block, three stages of three blocks, at 32, 16 and 8 pixels
    assert layer_shapes("resnet20", 128, (3, 32, 32), 10) == {(128, 16, 32, 32): 7, (128, 32, 16, 16): 6,
                                                              (128, 64, 8, 8): 6}


def test_census_recheck_retimes_each_miss_and_counts_the_misses_of_every_timing(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_census import recheck_misses
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    # a first pass with one miss in each mode (ratios 2.0 and 1.5) and one shape within its target (1.0)
    results = {((16, 8, 4, 4), True, "train"): (1.0, 2.0, math.nan, 2.0),
               ((16, 8, 4, 4), True, "eval"): (1.0, 1.5, math.nan, 1.5),
               ((32, 8), False, "train"): (1.0, 1.0, math.nan, 1.0)}
    recheck_misses(results, 2, 1e5, torch.device("cpu"), torch.float32)
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\S+) \| (NCHW|channels_last) \| (train|eval) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out,
                      flags=re.M)
    assert [r[:4] for r in rows] == [("16x8x4x4", "channels_last", "train", "2.00"),
                                     ("16x8x4x4", "channels_last", "eval", "1.50")]  # not the shape within
    assert all(float(r) > 0 for row in rows for r in row[4:])  # two fresh timings each
    stable = {mode: int(all(float(r) > {"train": 1.10, "eval": 1.25}[mode] for r in ratios))
              for _, _, mode, *ratios in rows}
    assert re.search(rf"^outside the target in every timing \(the first and 2 more\): train {stable['train']} of the 1 "
                     rf"first misses, eval {stable['eval']} of the 1 first misses$", out, flags=re.M)


def test_census_in_bfloat16_prints_achieved_bandwidth():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_census.py"), "--shapes",
                             "64x32x8x8,128x64", "--dtype", "bf16", "--modes", "train,eval"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"^device: CPU.*; dtype bf16$", result.stdout, flags=re.M)
    rows = re.findall(r"^\| (\S+) \| (NCHW|channels_last) \| (train|eval) \| [\d.]+ \| ([\d.]+) \| [\d.]+ \| - \| "
                      r"(\d+) \| [\d.]+ \|$", result.stdout, flags=re.M)
    assert len(rows) == 6  # 64x32x8x8 in both layouts and 128x64, each trained and evaluated
    for shape, _, mode, ms, gbps in rows:  # the fused algorithm's passes over 2-byte values, over L2BN's time
        traffic = {"train": 8, "eval": 3}[mode] * math.prod(int(d) for d in shape.split("x")) * 2
        fastest, slowest = float(ms) - 0.0005, float(ms) + 0.0005  # the time as printed, rounded to 1 µs
        assert traffic / (slowest * 1e6) - 0.5 <= int(gbps) <= traffic / (fastest * 1e6) + 0.5


def test_epoch_benchmark_quick_prints_every_variants_ratio():
    import pytest

    from l2bn.data.vision import FASHION_MNIST_SYSTEM_DIR

    if not FASHION_MNIST_SYSTEM_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_epoch.py"), "--quick", "--amp"],
                            env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    ratios = dict(re.findall(r"^\| ([^|]+?) \| \d+ \| ([\d.]+) \|", result.stdout, flags=re.M))
    for name in ("current (per-sample, NCHW, eager)", "channels_last", "batched augment", "batched + channels_last",
                 "batched", "in-memory, inference_mode, 256", "batched + channels_last + bf16 autocast",
                 "in-memory, no_grad, 256, bf16 autocast, channels_last"):
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


def test_ab_benchmark_repeats_each_shape_in_blocks_of_fresh_tensors_and_cold_caches_in_bfloat16():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ab.py"), "4x3x4x4,6x5", "--mode",
                             "eval", "--blocks", "3", "--calls", "7", "--cold", "--dtype", "bf16"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\s*(\S+) eval bf16 calls +(\d+) .* ratio min ([\d.]+)  ratio p25 ([\d.]+)  \[block (\d)/3\]$",
                      result.stdout, flags=re.M)
    assert [(r[0], r[4]) for r in rows] == [(s, b) for s in ("4x3x4x4", "6x5") for b in "123"]
    assert all(int(r[1]) == 7 and float(r[2]) > 0 for r in rows)
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ab.py"), "6x5", "--blocks", "0"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--blocks and --calls must be at least 1" in refused.stderr


def test_ab_benchmark_times_a_revision_of_the_kernel_in_the_same_process():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ab.py"), "4x3x4x4cl,6x5", "--mode",
                             "train", "--against", head.stdout.strip()], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\s*(\S+) train calls +\d+ .* ratio min ([\d.]+) .*\| \w+: min [\d.]+ ratio min ([\d.]+) p25 "
                      r"([\d.]+)$", result.stdout, flags=re.M)
    assert [r[0] for r in rows] == ["4x3x4x4cl", "6x5"], result.stdout
    assert all(float(v) > 0 for r in rows for v in r[1:])


def _fake_run(root: Path, norm: str, seed: int, acc: float, intra: float, *, amp: str | None, lr: float = 0.1) -> None:
    import json

    run = root / f"{norm}-s{seed}"
    run.mkdir(parents=True)
    config = {"norm": norm, "seed": seed, "amp": amp, "out": str(run), "recipe": {"lr": lr, "seeds": [seed]}}
    final = {"intra_train": intra, "inter": 30.0 + seed % 3, "iir_train": intra / 30.0}
    (run / "summary.json").write_text(json.dumps({"selected_test_acc": acc, "final": final, "config": config}))
    (run / "timing.jsonl").write_text(json.dumps({"epoch": 1, "train_images_per_second": 100.0 * (2 if amp else 1)}))


def test_amp_parity_pairs_seeds_and_recomputes_the_paired_t_test(tmp_path):
    import numpy as np
    from scipy.stats import ttest_rel

    first, second = [85.0, 86.1, 85.4, 86.3], [85.3, 86.0, 85.9, 86.2]
    for i, seed in enumerate((121, 122, 123, 124)):
        _fake_run(tmp_path / "a", "bn", seed, first[i], 15.0 + i, amp=None)
        _fake_run(tmp_path / "b", "bn", seed, second[i], 15.5 + i, amp="bf16")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    script = str(ROOT / "benchmarks" / "amp_parity.py")
    result = subprocess.run([sys.executable, script, str(tmp_path / "a"), str(tmp_path / "b")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    row = re.search(r"^\| bn \| selected test acc \(%\) \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+) \| "
                    r"\[([+-][\d.]+), ([+-][\d.]+)\] \| ([\d.]+) \| ±([\d.]+) \| 4\+4 paired \|$", result.stdout, re.M)
    assert row, result.stdout
    expected = ttest_rel(second, first)
    interval = expected.confidence_interval(0.95)
    assert float(row[3]) == round(float(np.mean(second) - np.mean(first)), 3)
    assert (float(row[4]), float(row[5])) == (round(interval.low, 3), round(interval.high, 3))
    assert float(row[6]) == round(expected.pvalue, 2)
    assert re.search(r"^\| bn \| training images/s \(median\) \| 100 \| 200 \| ×2.00 \|", result.stdout, re.M)
    # a second set that also changes the learning rate is not a precision comparison
    _fake_run(tmp_path / "c", "bn", 121, 85.0, 15.0, amp="bf16", lr=0.2)
    _fake_run(tmp_path / "c", "bn", 122, 85.0, 15.0, amp="bf16", lr=0.2)
    result = subprocess.run([sys.executable, script, str(tmp_path / "a"), str(tmp_path / "c")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "recipe.lr" in result.stderr


def test_sync_benchmark_prints_each_paths_ratio_for_every_shape():
    """On the CPU: BatchNorm, L2BN and the synchronized op's torch-op and compiled-kernel paths over a gloo group of
    one rank (torch's SyncBatchNorm and the Triton kernels need CUDA), 1-d, 2-d and 4-d inputs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sync.py"), "--device", "cpu",
                             "--shapes", "4x3x4x4,6x5,4x3x7", "--repeats", "2"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    names = ["L2BN", "SyncL2BN (torch ops)"] + (["SyncL2BN (cpp)"] if cpp.available() else [])
    header = "| shape | BN ms | " + " | ".join(f"{name} ms" for name in names) + " | ratios to BN | to SyncBN |"
    assert header in result.stdout, result.stdout
    times = r" \| ".join([r"([\d.]+)"] * (len(names) + 1))
    ratios = ", ".join(re.escape(name) + r" ([\d.]+)" for name in names)
    rows = re.findall(rf"^\| (\S+) \| {times} \| {ratios} \| — \|$", result.stdout, flags=re.M)
    assert [r[0] for r in rows] == ["4x3x4x4", "6x5", "4x3x7"], result.stdout
    for row in rows:
        values = [float(v) for v in row[1:]]
        bn, others, printed = values[0], values[1 : len(names) + 1], values[len(names) + 1 :]
        for ms, ratio in zip(others, printed):
            assert math.isclose(ratio, ms / bn, rel_tol=0.02, abs_tol=0.01)


def test_moments_benchmark_times_both_first_passes_at_each_thread_count():
    """bench_moments.py: BatchNorm's sum pass and L2BN's moments pass alone, a row per shape and thread count."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_moments.py"), "4x24x4x5,2x1030x1x19",
                             "--threads", "1", "2", "--repeats", "1"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\| (\S+) \| (\d) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", result.stdout, flags=re.M)
    assert [r[:2] for r in rows] == [("4x24x4x5", "1"), ("4x24x4x5", "2"), ("2x1030x1x19", "1"),
                                     ("2x1030x1x19", "2")], result.stdout
    for *_, bn, l2, ratio in rows:  # µs to 0.1, the ratio from the unrounded times
        bn, l2, ratio = float(bn), float(l2), float(ratio)
        assert bn > 0 and l2 > 0 and abs(ratio - l2 / bn) <= 0.006 + ratio * (0.05 / bn + 0.05 / l2)


def test_host_benchmark_times_the_wrapper_with_launches_stubbed():
    """On the CPU (Triton's interpreter): BatchNorm and L2BN's Triton wrapper with no kernel launched, per shape
    and mode (training; eval under no_grad, the inference path); the whole launches are timed on CUDA only, and
    ``--launches`` lists each kernel's launches a call (here through the interpreter)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_host.py"), "--device", "cpu",
                             "--shapes", "4x3x4x4,8x5x2x2", "--calls", "5", "--launches"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "L2BN path: triton" in result.stdout
    rows = re.findall(r"^\| (\S+) \| (\w+) \| (\d+) / (\d+) \| — \| (\d+) / (\d+) \| — \|$", result.stdout,
                      flags=re.M)
    assert [r[:2] for r in rows] == [("4x3x4x4", "train"), ("4x3x4x4", "eval"), ("8x5x2x2", "train"),
                                     ("8x5x2x2", "eval")], result.stdout
    assert all(0 < int(r[2]) <= int(r[3]) and 0 < int(r[4]) <= int(r[5]) for r in rows)
    # --launches: per shape and mode, each kernel's launches a call, adding up to the path's 8 (training: four
    # each way, the affine kernel in both) and 2 (inference); no binder in the interpreter
    launches = re.findall(r"^\| (\S+) \| (\w+) \| (_\w+_kernel) \| ([\d.]+) \| ([\d.]+) \| (\S+) \|$", result.stdout,
                          flags=re.M)
    per_call = {}
    for spec, mode, _, count, micros, binder in launches:
        per_call[spec, mode] = per_call.get((spec, mode), 0) + float(count)
        assert float(micros) > 0 and binder == "—"
    assert per_call == {("4x3x4x4", "train"): 8, ("4x3x4x4", "eval"): 2, ("8x5x2x2", "train"): 8,
                        ("8x5x2x2", "eval"): 2}, result.stdout
    assert ("4x3x4x4", "train", "_affine_kernel", "2") in [r[:4] for r in launches]



def test_kernel_profile_on_the_cpu_lists_each_layers_ops_and_their_total():
    """bench_kernels.py with --device cpu (each op's self CPU time): a row per op and an "all" row per shape, layout,
    mode and layer, the shares of a layer summing to its total, and the compiled kernel's op among L2BN's."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--device", "cpu",
                             "--shapes", "4x3x4x4,6x5", "--calls", "2"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\| (\S+) \| (\w+) \| (\w+) \| (\w+) \| (.+?) \| \**([\d.]+)\** \| (.+?) \|$", result.stdout,
                      flags=re.M)
    totals = {r[:4]: float(r[5]) for r in rows if r[4] == "**all**"}
    assert len(totals) == 2 * 2 * 2 + 2 * 2, sorted(totals)  # 4-d: two layouts; 2-d: NCHW only; 2 modes, 2 layers
    for key, total in totals.items():
        ops = [float(r[5]) for r in rows if r[:4] == key and r[4] != "**all**"]
        assert ops and math.isclose(sum(ops), total, rel_tol=0.05, abs_tol=0.2), key
    if cpp.compiler_found():  # else L2BN runs the torch-op path
        assert any(r[3].startswith("L2BatchNorm") and r[4].startswith("l2bn_cpu::") for r in rows), result.stdout

def test_gpu_check_fits_one_ten_minute_device_call():
    """benchmarks/gpu_check.sh runs as one device command (at most 600 s): the limits of its default parts' steps
    must add up below it."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    defaults = re.search(r'parts="\$\{\*:-([\w ]+)\}"', script)[1].split()
    total, repeat, part = 0, 1, None
    for line in script.splitlines():
        loop = re.match(r"\s*for \w+ in (.+); do$", line)
        if loop:
            repeat = len(loop[1].split())
        elif line.strip() == "done":
            repeat = 1
        elif (block := re.match(r"if wants (\w+); then", line)):
            part = block[1]
        elif line == "fi":
            part = None
        elif (limit := re.match(r"\s*step (\d+) ", line)) and (part is None or part in defaults):
            total += repeat * int(limit[1])
    assert not {"lanes", "inference", "compiled"} & set(defaults) and 0 < total <= 600, total
    assert re.search(r"bench_census\.py --device cuda --dtype", script)


def test_census_cuda_graphs_needs_a_cuda_device():
    """--cuda-graphs replays CUDA graphs: on the CPU it is refused with the way out, before anything is timed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_census.py"), "--quick", "--cuda-graphs"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--cuda-graphs times CUDA graphs: give --device cuda" in result.stderr
    assert "| shape |" not in result.stdout


@pytest.mark.parametrize("cache", ["hot", "cold", "network"])
def test_moments_benchmark_cache_conditions_leave_the_inputs_unchanged(cache, monkeypatch):
    """bench_moments.py --cache: the untimed preparation before each call (the cache flush; dy rewritten in place
    for "network") changes no value the timed ops read: their sums before and after are equal bit for bit."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_moments

    monkeypatch.setattr(bench_moments, "COLD_BYTES", 1 << 20)  # the flush's size does not matter here
    cpp.operators()
    ops, prepare = bench_moments.passes((3, 20, 3, 4), with_ab=False, cache=cache)
    before = {name: op() for name, op in ops.items()}
    prepare()
    for name, op in ops.items():
        assert all(torch.equal(a, b) for a, b in zip(before[name], op()) if a is not None), name
    assert cache in bench_moments.CACHES


def test_steps_benchmark_times_eager_and_compiled_steps_with_the_compile_apart():
    """bench_steps.py --compile: per model and layout the eager BN / L2BN steps and ratio, then the compiled
    models' steps, ratio, first-step (compile) seconds and speed-ups; a bad layout is refused; ``--mode eval``
    times forwards (dynamo's ``eager`` backend here: the plumbing, not Inductor's compile time)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    script = str(ROOT / "benchmarks" / "bench_steps.py")
    result = subprocess.run([sys.executable, script, "--models", "resnet20", "--layouts", "channels_last", "--batch",
                             "2", "--repeats", "1", "--compile", "default", "--backend", "eager", "--threads", "1"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.compile mode default, backend eager" in result.stdout
    number = r"([\d.]+)"
    row = re.search(rf"^\| resnet20 \| channels_last \| 2 \| {number} \| {number} \| {number} \| {number} \| "
                    rf"{number} \| {number} \| (\d+) / (\d+) \| {number} / {number} \|", result.stdout, flags=re.M)
    assert row, result.stdout
    bn, l2, ratio, c_bn, c_l2, c_ratio, _, _, speedup_bn, speedup_l2 = map(float, row.groups())
    assert min(bn, l2, c_bn, c_l2) > 0
    assert math.isclose(ratio, l2 / bn, abs_tol=0.01 + 0.1 / bn + 0.1 / l2)  # times printed to 0.1 ms
    assert math.isclose(c_ratio, c_l2 / c_bn, abs_tol=0.01 + 0.1 / c_bn + 0.1 / c_l2)
    assert math.isclose(speedup_bn, bn / c_bn, abs_tol=0.01 + 0.1 / c_bn + 0.1 / bn)
    assert math.isclose(speedup_l2, l2 / c_l2, abs_tol=0.01 + 0.1 / c_l2 + 0.1 / l2)
    bad = subprocess.run([sys.executable, script, "--layouts", "nhwc"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "unknown ['nhwc']" in bad.stderr
    inference = subprocess.run([sys.executable, script, "--models", "resnet20", "--layouts", "NCHW", "--batch", "1",
                                "--repeats", "1", "--compile", "default", "--backend", "eager", "--threads", "1",
                                "--mode", "eval"], env=env, capture_output=True, text=True, timeout=300)
    assert inference.returncode == 0, inference.stderr[-2000:]
    assert "mode eval" in inference.stdout and "| BN forward ms | L2BN forward ms |" in inference.stdout
    row = re.search(rf"^\| resnet20 \| NCHW \| 1 \| {number} \| {number} \| {number} \| {number} \| {number} \| "
                    rf"{number} \|", inference.stdout, flags=re.M)
    assert row, inference.stdout
    bn, l2, ratio, c_bn, c_l2, c_ratio = map(float, row.groups())
    assert min(bn, l2, c_bn, c_l2) > 0 and math.isclose(ratio, l2 / bn, abs_tol=0.01 + 0.01 / bn + 0.01 / l2)


def test_steps_benchmark_turns_onednn_off_for_the_run(monkeypatch, capsys):
    """bench_steps.py --no-onednn: the steps run with ``torch.backends.mkldnn.enabled`` False (ATen's im2col
    convolutions), through torch's flags context (processes that froze the global flags allow no other way), and
    the environment line says so; without the flag, and after the steps, oneDNN stays as it was."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_steps

    before = torch.backends.mkldnn.enabled
    seen = []
    monkeypatch.setattr(bench_steps, "step_rows", lambda *args, **kwargs: seen.append(torch.backends.mkldnn.enabled))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    lines = []
    for flag in ([], ["--no-onednn"]):
        bench_steps.main(["--models", "resnet20", "--threads", "1", *flag])
        lines.append(capsys.readouterr().out.splitlines()[0])
    assert seen == [before, False] and torch.backends.mkldnn.enabled == before  # off for the steps only
    assert not lines[0].endswith("oneDNN off") and lines[1].endswith("; oneDNN off")
