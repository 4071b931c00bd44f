"""The command line entry point and the README ↔ CI contract."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from l2bn.bench import time_layers
from l2bn.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def test_module_help_runs():
    result = subprocess.run([sys.executable, "-m", "l2bn", "--help"], capture_output=True, text=True, check=True)
    assert "bench" in result.stdout


def test_every_command_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name in subparsers.choices:
        assert subparsers.choices[name].format_help()


def test_bench_prints_ratio_table(capsys):
    assert main(["bench", "--shapes", "4x3x4x4", "--repeats", "2", "--modes", "train"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 4x3x4x4")]
    assert len(rows) == 2  # NCHW and channels_last
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        bn_ms, l2_ms, ratio, gbps = float(cells[3]), float(cells[4]), float(cells[5]), float(cells[6])
        # 8 passes over a 4x3x4x4 float32 tensor in l2_ms, to the table's rounding (0.05, and l2_ms to 0.0005)
        expected = 8 * (4 * 3 * 4 * 4) * 4 / (l2_ms * 1e6)
        assert abs(gbps - expected) <= 0.05 + expected * (0.0005 / l2_ms) * 1.01
        # the table rounds ms to 3 decimals and the ratio to 2: allow exactly that rounding
        rounding = 0.005 + (l2_ms / bn_ms) * (0.0005 / bn_ms + 0.0005 / l2_ms) * 1.01
        assert abs(ratio - l2_ms / bn_ms) <= rounding


def test_bench_names_and_forces_the_l2bn_path(capsys, monkeypatch):
    from l2bn.functional import IMPL_ENV_VAR, auto_impl

    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    assert main(["bench", "--shapes", "4x3x4x4", "--repeats", "1", "--modes", "eval"]) == 0
    assert f"L2BN path: {auto_impl(torch.ones(2, 2, 2, 2))}" in capsys.readouterr().out
    monkeypatch.setenv(IMPL_ENV_VAR, "auto")  # restored after the test; --impl overrides it
    assert main(["bench", "--shapes", "4x3x4x4", "--repeats", "1", "--modes", "eval", "--impl", "reference"]) == 0
    assert "L2BN path: reference" in capsys.readouterr().out


def test_time_layers_rejects_bad_mode():
    import pytest

    with pytest.raises(ValueError, match="'train' or 'eval'"):
        time_layers((2, 3, 4, 4), mode="infer")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- test-command -->\s*```bash\n(.+)\n```", readme)
    assert match, "README must show the test command after <!-- test-command -->"
    assert "pytest" in match.group(1)
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()
    assert "<!-- main-command -->" in readme
