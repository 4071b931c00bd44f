"""A 2-node × 1-process torchrun (c10d rendezvous on 127.0.0.1, gloo) with SyncL2BatchNorm: the synchronized running
statistics and the first step's gradients equal one process on the whole batch (docs/distributed.md)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "multinode_sync.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _two_nodes(out: Path, model: str) -> None:
    port = _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "l2bn-test",
         "--local-addr", "127.0.0.1", str(SCRIPT), str(out), model],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [node.communicate(timeout=240)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(logs)


def _check(tmp_path: Path, model: str) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    subprocess.run([sys.executable, str(SCRIPT), str(whole), model], env=_env(), check=True)
    _two_nodes(split, model)
    ref = torch.load(whole / "rank0.pt")
    ranks = [torch.load(split / f"rank{r}.pt") for r in (0, 1)]
    assert ref["world"] == 1 and all(r["world"] == 2 for r in ranks)
    assert ref["running"]
    for key, value in ref["running"].items():  # the same global statistics on both ranks
        for r in ranks:
            torch.testing.assert_close(r["running"][key], value, rtol=1e-10, atol=1e-12)
    for key, grad in ref["grads"].items():  # each rank holds its share; their sum is the whole batch's
        torch.testing.assert_close(ranks[0]["grads"][key] + ranks[1]["grads"][key], grad, rtol=1e-9, atol=1e-12)


def test_two_node_torchrun_sync_l2bn_matches_one_process_miniature(tmp_path):
    _check(tmp_path, "mini")


@pytest.mark.slow
def test_two_node_torchrun_sync_l2bn_matches_one_process_resnet20(tmp_path):
    _check(tmp_path, "resnet20")
