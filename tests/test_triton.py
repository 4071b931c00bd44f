"""Triton L2BN kernels against the reference composition and float64 formulas written here.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter. Triton fixes
"compiled or interpreted" when it first imports ``triton.language`` and decorates kernels, so this module
sets ``TRITON_INTERPRET=1`` before that import (restoring the environment afterwards). If another module
imported triton first without it, the in-process tests skip and ``test_interpreter_suite_in_fresh_process``
runs this file in a fresh interpreter instead (``tests/conftest.py`` sets it for the whole suite on machines
without a GPU, so that is the exception). With CUDA the
same tests run the compiled kernels on the GPU.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import l2bn
from l2bn.kernels import dispatch
from l2bn.functional import IMPL_ENV_VAR, IMPLEMENTATIONS, l2_batch_norm, resolve_impl
from l2bn.kernels import l2_batch_norm_fused, l2_batch_norm_reference

F64 = torch.float64
MODULE = "l2bn.kernels.triton_l2bn"
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if HAS_TRITON and DEVICE == "cpu" and "triton" not in sys.modules:
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    importlib.import_module(MODULE)  # imports triton and decorates every kernel for the interpreter
    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous
RUNNABLE = HAS_TRITON and (DEVICE == "cuda" or importlib.import_module(MODULE).INTERPRETED)


@pytest.fixture(scope="module")
def tk():
    """The Triton kernel module, runnable on ``DEVICE`` (skips where triton is not importable).

    On the CPU, TRITON_INTERPRET=1 stays set while the tests run: parts of triton imported lazily at the
    first launch check it too.
    """
    pytest.importorskip("triton")
    if not RUNNABLE:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; "
                    "test_interpreter_suite_in_fresh_process runs these")
    with pytest.MonkeyPatch.context() as patch:
        if DEVICE == "cpu":
            patch.setenv("TRITON_INTERPRET", "1")
        yield importlib.import_module(MODULE)


@pytest.fixture
def tiny_tiles(tk, monkeypatch):
    """Tiles of a few elements, so rows span several chunks (exercising the pairwise merge) and masks, and the
    O(N·C) kernels loop over several partial blocks of samples and channels."""
    monkeypatch.setattr(tk, "_REDUCE_TILE", 4)
    monkeypatch.setattr(tk, "_ELEMENTWISE_TILE", 8)
    monkeypatch.setattr(tk, "_MAX_BLOCK_M", 4)
    monkeypatch.setattr(tk, "_MAX_BLOCK_C_CHANNELS_LAST", 2)
    monkeypatch.setattr(tk, "_ALGEBRA_ROW_BLOCK", 2)
    monkeypatch.setattr(tk, "_ALGEBRA_TILE", (2, 2))
    monkeypatch.setattr(tk, "_ALGEBRA_SPLIT_ROWS", 2)  # batches of 3 or more split across programs
    monkeypatch.setattr(tk, "_MERGE_TILE", (2, 2))
    monkeypatch.setattr(tk, "_MIN_PART_CHUNKS", 1)  # rows of two chunks or more reduced in parts
    monkeypatch.setattr(tk, "_LANES_MIN_POSITIONS", 2)  # channels-last rows summed per tile position


def dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


def run(fn, x, training, *, dtype=torch.float32, memory_format=torch.contiguous_format, affine=True, momentum=0.1):
    """Forward + backward of ``fn`` with fixed parameters; returns output, gradients and running stats.

    The reference runs on the CPU, everything else on ``DEVICE``; results come back to the CPU.
    """
    device = "cpu" if fn is l2_batch_norm_reference else DEVICE
    gen = torch.Generator().manual_seed(7)
    c = x.shape[1]
    w = (torch.rand(c, generator=gen, dtype=F64) + 0.5).to(device, dtype).requires_grad_()
    b = torch.randn(c, generator=gen, dtype=F64).to(device, dtype).requires_grad_()
    rm = torch.randn(c, generator=gen, dtype=F64).to(device, dtype)
    rv = (torch.rand(c, generator=gen, dtype=F64) + 0.5).to(device, dtype)
    xx = x.detach().to(device, dtype).contiguous(memory_format=memory_format).requires_grad_()
    weight, bias = (w, b) if affine else (None, None)
    y = fn(xx, rm, rv, weight, bias, training, momentum, 1e-5)
    y.backward(torch.randn(y.shape, generator=gen, dtype=F64).to(device, dtype))
    out = {"y": y, "dx": xx.grad, "rm": rm, "rv": rv}
    if affine:
        out.update(dw=w.grad, db=b.grad)
    return {key: value.detach().cpu() for key, value in out.items()}


def assert_close(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys()
    for key in got:
        a, b = got[key].to("cpu", F64), want[key].to("cpu", F64)
        torch.testing.assert_close(a, b, msg=lambda m: f"{key}: {m}", **tol)


def moments_f64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, c) mean and Σ (x − mean)² by explicit float64 loops."""
    n, c = x.shape[:2]
    mean, sumsq = torch.empty(n, c, dtype=F64), torch.empty(n, c, dtype=F64)
    for i in range(n):
        for j in range(c):
            v = x[i, j].to(F64).flatten()
            mean[i, j] = v.sum() / v.numel()
            sumsq[i, j] = ((v - mean[i, j]) ** 2).sum()
    return mean, sumsq


SHAPES = [(3, 4, 5, 6), (2, 3), (2, 3, 7), (2, 2, 3, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float32_equals_reference(tk, shape, training):
    x = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    """Within 1e-5 of float64, or (batch of 2, one position: ill-conditioned dx) no further from float64
    than twice the reference composition's own float32 error."""
    got = run(tk.l2_batch_norm_triton, x, training)
    assert got["y"].dtype == torch.float32 and got["dx"].dtype == torch.float32
    want = run(l2_batch_norm_reference, x, training, dtype=F64)
    ref32 = run(l2_batch_norm_reference, x, training)
    for key in want:
        err = (got[key].double() - want[key]).abs().max().item()
        ref_err = (ref32[key].double() - want[key]).abs().max().item()
        assert err <= max(1e-5 * max(want[key].abs().max().item(), 1.0), 2 * ref_err), key
    assert_close(got, ref32, rtol=1e-5, atol=1e-5 if x[0].numel() > 3 else 1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_several_chunks_per_row(tk, tiny_tiles, training):
    """Rows longer than a tile: chunk means merged pairwise, partial chunks masked, partial channel blocks."""
    assert tk._reduction_tile(tk._as_rows(torch.empty(3, 5, 30))) == (1, 4)
    x = torch.randn(3, 5, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(1)) + 2  # 15 = 4 + 4 + 4 + 3
    mean, sumsq = tk.sample_channel_moments_triton(dev(x.float()))
    want_mean, want_sumsq = moments_f64(x.float())
    mean, sumsq = mean.cpu(), sumsq.cpu()
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sumsq.double(), want_sumsq, rtol=1e-5, atol=1e-5)
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = run(tk.l2_batch_norm_triton, x, training, memory_format=fmt)
        assert_close(got, run(l2_batch_norm_reference, x, training, dtype=F64), rtol=1e-5, atol=1e-5)


def test_float64_accumulates_in_float64(tk):
    x = torch.randn(3, 4, 5, 6, dtype=F64, generator=torch.Generator().manual_seed(2)) * 2 + 0.5
    for training in (True, False):
        got = run(tk.l2_batch_norm_triton, x, training, dtype=F64)
        assert_close(got, run(l2_batch_norm_reference, x, training, dtype=F64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("parts", [False, True], ids=["rows", "parts"])
def test_float64_split_batches_accumulate_in_float64(tk, monkeypatch, parts):
    """A batch of 11 reduced over splits of 4, 4 and 3 samples (Chan pooling of the splits): float64 throughout;
    ``parts``: rows of 7 reduced in parts of 2 positions too."""
    monkeypatch.setattr(tk, "_ALGEBRA_SPLIT_ROWS", 4)
    x = torch.randn(11, 6, 7, dtype=F64, generator=torch.Generator().manual_seed(2)) * 2 + 0.5
    if parts:
        monkeypatch.setattr(tk, "_REDUCE_TILE", 2)
        monkeypatch.setattr(tk, "_MAX_BLOCK_M", 2)
        monkeypatch.setattr(tk, "_MIN_PART_CHUNKS", 1)
        assert tk._row_parts(tk._as_rows(x), 1, 2) == (4, 1)  # 4 parts of 1 chunk of 2 positions
    for training in (True, False):
        got = run(tk.l2_batch_norm_triton, x, training, dtype=F64)
        assert_close(got, run(l2_batch_norm_reference, x, training, dtype=F64), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(600, 70), (1000, 3, 2), (257, 5, 3), (37, 1100, 2)], ids=str)
def test_large_batches_and_wide_rows_at_the_default_tiles(tk, shape):
    """Batches split at the default 256 samples (3, 4 and 2 splits, the last of one sample) and rows of more channels
    than one block: float32 against float64."""
    x = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(3)) * 3 + 1
    for training in (True, False):
        got = run(tk.l2_batch_norm_triton, x, training)
        assert_close(got, run(l2_batch_norm_reference, x, training, dtype=F64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parts", [False, True], ids=["rows", "parts"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_moments_and_gradient_sums_against_float64_loops(tk, monkeypatch, channels_last, parts):
    """Large mean, unit spread: a one-pass E[x²] − E[x]² in float32 would have no correct digit left. ``parts``:
    each row reduced in parts of one chunk (8 positions, channels-last 4), pooled by ``_merge_parts_kernel``."""
    gen = torch.Generator().manual_seed(3)
    x = (1e4 + torch.randn(3, 4, 5, 6, dtype=F64, generator=gen)).float()
    dy = torch.randn(3, 4, 5, 6, dtype=F64, generator=gen).float()
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    if parts:
        monkeypatch.setattr(tk, "_REDUCE_TILE", 8)
        monkeypatch.setattr(tk, "_MAX_BLOCK_M", 8)
        monkeypatch.setattr(tk, "_MAX_BLOCK_C_CHANNELS_LAST", 1)
        monkeypatch.setattr(tk, "_MIN_PART_CHUNKS", 1)
    rows = tk._as_rows(x)
    assert (tk._row_parts(rows, *tk._reduction_tile(rows))[0] > 1) == parts
    mean, sumsq = (t.cpu() for t in tk.sample_channel_moments_triton(dev(x)))
    want_mean, want_sumsq = moments_f64(x)
    assert mean.dtype == sumsq.dtype == torch.float64  # float32 chunks, merged in float64
    torch.testing.assert_close(mean.double(), want_mean, rtol=5e-7, atol=0)  # a few float32 ulps
    torch.testing.assert_close(sumsq.double(), want_sumsq, rtol=1e-3, atol=0)
    centre = torch.randn(3, 4, generator=gen)
    dy_sum, dy_xc = (t.cpu() for t in tk.gradient_sums_triton(dev(dy), dev(x), dev(centre)))
    want_sum = dy.double().sum(dim=(2, 3))
    want_xc = (dy.double() * (x.double() - centre.double()[:, :, None, None])).sum(dim=(2, 3))
    torch.testing.assert_close(dy_sum.double(), want_sum, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dy_xc.double(), want_xc, rtol=1e-5, atol=5e-1)  # |x − centre| ≈ 1e4


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_backward_recomputes_the_forward_moments_bit_for_bit(tk, tiny_tiles, channels_last):
    """Backward's one read of (dy, x) yields the forward's m and q exactly, and Σ dy·(x − m) about them."""
    gen = torch.Generator().manual_seed(8)
    x = (50 + 3 * torch.randn(3, 5, 3, 5, dtype=F64, generator=gen)).float()  # rows of 15 = 4 + 4 + 4 + 3
    dy = torch.randn(3, 5, 3, 5, dtype=F64, generator=gen).float()
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    rows = tk._as_rows(x)
    assert tk._row_parts(rows, *tk._reduction_tile(rows))[0] > 1  # rows of 15 reduced in parts, pooled
    mean, sumsq = tk.sample_channel_moments_triton(dev(x))
    mean2, sumsq2, dy_sum, dy_xc = tk.moments_and_gradient_sums_triton(dev(dy), dev(x))
    assert torch.equal(mean.cpu(), mean2.cpu()) and torch.equal(sumsq.cpu(), sumsq2.cpu())
    want_mean, _ = moments_f64(x)
    want_xc = (dy.double() * (x.double() - want_mean[:, :, None, None])).sum(dim=(2, 3))
    torch.testing.assert_close(dy_sum.cpu().double(), dy.double().sum(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dy_xc.cpu().double(), want_xc, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_per_position_sums_in_every_layout(tk, tiny_tiles, monkeypatch, dtype):
    """``_LANES_EVERY_LAYOUT``: NCHW rows summed per tile position too (rows of 15 in chunks of 2, in parts), the
    layer against float64 and the backward's moments bit for bit the forward's."""
    monkeypatch.setattr(tk, "_LANES_EVERY_LAYOUT", True)
    x = torch.randn(3, 5, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(4)) * 3 + 20
    rows = tk._as_rows(x)
    assert tk._lanes(rows) and tk._row_parts(rows, *tk._reduction_tile(rows))[0] > 1
    tol = 1e-12 if dtype == F64 else 1e-5
    for training in (True, False):
        got = run(tk.l2_batch_norm_triton, x, training, dtype=dtype)
        assert_close(got, run(l2_batch_norm_reference, x, training, dtype=F64), rtol=tol, atol=tol)
    xd, dy = dev(x.to(dtype)), dev(torch.randn(x.shape, dtype=F64).to(dtype))
    mean, sumsq = tk.sample_channel_moments_triton(xd)
    mean2, sumsq2, _, _ = tk.moments_and_gradient_sums_triton(dy, xd)
    assert torch.equal(mean, mean2) and torch.equal(sumsq, sumsq2)
    want_mean, want_sumsq = moments_f64(x.to(dtype))
    torch.testing.assert_close(mean.cpu(), want_mean, rtol=1e-13, atol=0)  # float64 sums about a row value
    torch.testing.assert_close(sumsq.cpu(), want_sumsq, rtol=1e-11, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_per_position_sums_of_huge_values(tk, tiny_tiles, dtype):
    """Channels-last rows summed per tile position (float64, unscaled): values whose squares overflow float32
    (1e20, 1e30, 3e38) give the float64 moments and gradient sums."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 4, 3, 5, dtype=F64, generator=gen)
    x[0, 1] *= 1e20
    x[1, 2, 1, 1] = 3e38
    x[2, 0] = 1e30 + x[2, 0]
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(3, 4, 3, 5, dtype=F64, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    rows = tk._as_rows(x)
    assert tk._lanes(rows) and tk._row_parts(rows, *tk._reduction_tile(rows))[0] > 1
    mean, sumsq = (t.cpu() for t in tk.sample_channel_moments_triton(dev(x)))
    want_mean, want_sumsq = moments_f64(x)
    torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(sumsq, want_sumsq, rtol=1e-12, atol=0)
    _, _, dy_sum, dy_xc = (t.cpu() for t in tk.moments_and_gradient_sums_triton(dev(dy), dev(x)))
    want_xc = (dy.double() * (x.double() - want_mean[:, :, None, None])).sum(dim=(2, 3))
    torch.testing.assert_close(dy_sum, dy.double().sum(dim=(2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dy_xc, want_xc, rtol=1e-9, atol=0)


ALLOCATIONS_AND_VIEWS = {"empty", "empty_like", "view", "select", "detach", "promote_types", "alias", "as_strided"}


@pytest.fixture
def calls(tk, monkeypatch):
    """A context manager (``with calls():``) recording each Triton launch by kernel name (``calls.launches``) and
    the name of every torch op dispatched outside the kernels (``calls.ops``; the interpreter runs kernels through
    torch ops of its own)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    in_kernel = [False]

    class Recorder(TorchDispatchMode):
        launches: list[str] = []
        ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not in_kernel[0]:
                Recorder.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def counted(kernel, *args, _launch=tk.launch, **kwargs):
        Recorder.launches.append(kernel.fn.__name__)
        in_kernel[0] = True
        try:
            return _launch(kernel, *args, **kwargs)
        finally:
            in_kernel[0] = False

    monkeypatch.setattr(tk, "launch", counted)
    return Recorder


def layer_call_tensors() -> tuple[torch.Tensor, ...]:
    """(x, weight, bias, running mean, running var, dy) of a 6×8×5×5 float32 call on ``DEVICE``."""
    x = dev(torch.randn(6, 8, 5, 5)).requires_grad_()
    w, b = dev(torch.rand(8)).requires_grad_(), dev(torch.randn(8)).requires_grad_()
    return x, w, b, dev(torch.zeros(8)), dev(torch.ones(8)), dev(torch.randn(6, 8, 5, 5))


@pytest.mark.parametrize("split", ["whole", "split", "parts"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_torch_kernel_between_the_triton_launches(tk, monkeypatch, calls, training, split):
    """A call is the Triton launches alone (4 forward, 4 backward; where the batch is split across programs, one
    more backward, and one more forward in training; where rows are reduced in parts, one more each way): every
    other torch op it dispatches only allocates or views, so no small (N, C) kernel adds its launch latency on a
    GPU (the first H200 run measured ~2.5 ms a training call when the O(N·C) algebra was ~110 torch ops)."""
    if split == "split":
        monkeypatch.setattr(tk, "_ALGEBRA_SPLIT_ROWS", 4)
    if split == "parts":  # rows of 25 in chunks of 8: two parts a row
        monkeypatch.setattr(tk, "_MAX_BLOCK_M", 8)
        monkeypatch.setattr(tk, "_MIN_PART_CHUNKS", 2)
    x, w, b, rm, rv, dy = layer_call_tensors()
    with calls():
        y = tk.l2_batch_norm_triton(x, rm, rv, w, b, training, 0.1, 1e-5)
        forward, forward_ops = len(calls.launches), list(calls.ops)
        y.backward(dy)
    extra = int(split == "split" and training) + int(split == "parts")
    backward = 4 + int(split != "whole")
    assert (forward, len(calls.launches)) == (4 + extra, 4 + extra + backward), calls.launches
    assert set(calls.ops) <= ALLOCATIONS_AND_VIEWS, sorted(set(calls.ops) - ALLOCATIONS_AND_VIEWS)
    # host time: the forward allocates its 9 outputs and statistics (10 with split partials, 11 with the parts'
    # moments) and views nothing
    allocations = 9 + int(split == "split" and training) + 2 * int(split == "parts")
    assert set(forward_ops) <= {"empty", "empty_like"} and len(forward_ops) == allocations, forward_ops


@pytest.fixture
def one_rank_group():
    """The default process group, of this process alone (gloo; nccl on CUDA), torn down afterwards."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group is already initialised")
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def synced_triton(group):
    """``sync_l2_batch_norm`` through the Triton kernels over ``group``, called like ``l2_batch_norm`` (for ``run``)."""
    from l2bn.kernels.sync import sync_l2_batch_norm

    def fn(x, running_mean, running_var, weight, bias, training, momentum, eps):
        assert training
        return sync_l2_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, group, impl="triton")

    return fn


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_synced_path_over_one_rank_equals_the_reference(tk, tiny_tiles, one_rank_group, dtype, tol):
    """The synchronized op's Triton kernels (local sums, all-reduce, coefficients from the global sums, and the
    backward's), over a group of one: the batch of 5 split across programs of 2 samples by the tiny tiles, and an
    (N, C) input; the two-process runs are in tests/test_distributed.py."""
    for shape in [(5, 3, 3, 2), (4, 6)]:
        x = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(5)) * 2 + 0.5
        got = run(synced_triton(one_rank_group), x, True, dtype=dtype)
        assert_close(got, run(l2_batch_norm_reference, x, True, dtype=F64), rtol=tol, atol=tol)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_synced_call_is_launches_and_one_all_reduce_each_way(tk, monkeypatch, calls, one_rank_group, split):
    """The synchronized training call: 5 launches and one all-reduce forward, 5 and one backward (one more launch
    each way where the batch is split across programs); besides, allocations and views only — and, on CPU
    tensors, the read of the global count that raises BatchNorm's error for a single value per channel."""
    if split:
        monkeypatch.setattr(tk, "_ALGEBRA_SPLIT_ROWS", 4)
    x, w, b, rm, rv, dy = layer_call_tensors()
    with calls():
        y = synced_triton(one_rank_group)(x, rm, rv, w, b, True, 0.1, 1e-5)
        forward, forward_ops = len(calls.launches), list(calls.ops)
        y.backward(dy)
    assert (forward, len(calls.launches)) == (5 + split, 10 + 2 * split), calls.launches
    assert forward_ops.count("allreduce_") == 1 and calls.ops.count("allreduce_") == 2, calls.ops
    allowed = ALLOCATIONS_AND_VIEWS | {"slice", "allreduce_"} | ({"_local_scalar_dense"} if DEVICE == "cpu" else set())
    assert set(calls.ops) <= allowed, sorted(set(calls.ops) - allowed)



def inference(fn, x, *, affine=True, rescale=True, l2_eps=1e-12):
    """An eval call under no_grad with fixed running statistics (and weight, bias); the output on the CPU."""
    device = "cpu" if fn is l2_batch_norm_reference else DEVICE
    gen = torch.Generator().manual_seed(5)
    c, dtype = x.shape[1], x.dtype if fn is not l2_batch_norm_reference else F64
    w, b = (torch.rand(c, generator=gen, dtype=F64) + 0.5), torch.randn(c, generator=gen, dtype=F64)
    rm, rv = torch.randn(c, generator=gen, dtype=F64), torch.rand(c, generator=gen, dtype=F64) + 0.5
    weight, bias = (w.to(device, dtype), b.to(device, dtype)) if affine else (None, None)
    with torch.no_grad():
        y = fn(x.to(device, dtype), rm.to(device, dtype), rv.to(device, dtype), weight, bias, False, 0.1, 1e-5,
               rescale=rescale, l2_eps=l2_eps)
    return y.cpu()


INFERENCE_CASES = [((5, 6, 4, 3), torch.contiguous_format), ((5, 6, 4, 3), torch.channels_last),
                   ((4, 3, 7, 7), torch.contiguous_format), ((7, 5), torch.contiguous_format),
                   ((3, 4, 2, 3, 2), torch.channels_last_3d), ((2, 3, 1, 1), torch.channels_last)]


@pytest.mark.parametrize("shape, fmt", INFERENCE_CASES, ids=["nchw", "cl", "7x7", "1d", "3d-cl", "1x1-cl"])
@pytest.mark.parametrize("tiles", ["default", "tiny"])
def test_inference_equals_the_reference_and_the_autograd_path(tk, monkeypatch, shape, fmt, tiles):
    """Eval under no_grad (two launches: ‖x_n‖² in parts, then the output): within float32 rounding of float64 and
    of the autograd path's output, in the input's memory format; tiny tiles give each sample several parts,
    summed over several blocks of parts, and the output several channel and position blocks."""
    if tiles == "tiny":
        for name, value in (("_REDUCE_TILE", 4), ("_ELEMENTWISE_TILE", 8), ("_MAX_BLOCK_M", 4),
                            ("_MAX_BLOCK_C_CHANNELS_LAST", 2), ("_MERGE_TILE", (2, 2)), ("_MIN_PART_CHUNKS", 1)):
            monkeypatch.setattr(tk, name, value)
        rows = tk._as_rows(torch.empty(shape).contiguous(memory_format=fmt))
        assert tk._parts(rows.n, tk._cdiv(rows.c * rows.m, 4))[0] > 2 or rows.c * rows.m < 12
    x = (torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(6)) * 2 + 0.5).float()
    x = x.contiguous(memory_format=fmt)
    got = inference(tk.l2_batch_norm_triton, dev(x))
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got.double(), inference(l2_batch_norm_reference, x.double()), rtol=1e-5, atol=1e-5)
    inferred = []

    def inference_then_autograd(*args):  # run()'s call, once under no_grad, then with x requiring a gradient
        with torch.no_grad():
            inferred.append(tk.l2_batch_norm_triton(*args).cpu())
        return tk.l2_batch_norm_triton(*args)

    autograd = run(inference_then_autograd, x.double(), False, memory_format=fmt)
    torch.testing.assert_close(inferred[0], autograd["y"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)], ids=["bf16", "fp16"])
def test_inference_in_half_precision(tk, dtype, tol):
    """16-bit input: computed in float32 (float64 norms), stored in the input's dtype, within its rounding."""
    x = (torch.randn(4, 3, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(12)) * 3 + 1).to(dtype)
    want = inference(l2_batch_norm_reference, x.double())
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = inference(tk.l2_batch_norm_triton, dev(x.contiguous(memory_format=fmt)))
        assert got.dtype == dtype and got.is_contiguous(memory_format=fmt)
        assert (got.double() - want).abs().max() <= tol * want.abs().max()


def test_inference_of_zero_huge_and_non_finite_samples(tk, tiny_tiles):
    """An all-zero sample gives the shift (norm clamped at l2_eps), huge finite ones (1e30, 3e38: squares beyond
    float32) their float64 result, and a sample holding NaN or inf NaN where the autograd path gives NaN and
    its values elsewhere; affine off and rescale off are honoured."""
    x = torch.randn(5, 3, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(13))
    x[1] = 0.0
    x[2] *= 1e30
    x[3, 1, 0, 0] = 3e38
    x = x.float()
    for affine, rescale in ((True, True), (False, False)):
        got = inference(tk.l2_batch_norm_triton, dev(x), affine=affine, rescale=rescale)
        want = inference(l2_batch_norm_reference, x.double(), affine=affine, rescale=rescale)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    bad = x.clone()
    bad[0, 2, 1, 1], bad[4, 0, 0, 2] = float("nan"), float("inf")
    got = inference(tk.l2_batch_norm_triton, dev(bad))
    with torch.no_grad():
        weight, bias, mean, var = (dev(torch.full((3,), v)) for v in (0.7, 1.5, -0.2, 0.9))
        autograd = tk.TritonL2BatchNorm.apply(dev(bad), weight, bias, mean, var, False, 0.1, 1e-5, True, 1e-12).cpu()
        direct = tk.l2_batch_norm_triton(dev(bad), mean, var, weight, bias, False, 0.1, 1e-5).cpu()
    assert torch.equal(torch.isnan(direct), torch.isnan(autograd))
    assert torch.isnan(direct[0, 2, 1, 1]) and torch.isnan(direct[4, 0, 0, 2]) and torch.isfinite(direct[1:4]).all()
    torch.testing.assert_close(direct, autograd, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.isfinite(got[[1, 2, 3]]).all()


def test_inference_is_two_launches_and_two_allocations(tk, monkeypatch, calls):
    """Eval under no_grad: ‖x_n‖² and the output, two launches, two allocations, no other torch op, the running
    statistics untouched; with a gradient to take, float64 input or ``_INFERENCE_PATH`` off the autograd path's
    four launches."""
    x, w, b, rm, rv, _ = layer_call_tensors()
    with calls():
        with torch.no_grad():
            tk.l2_batch_norm_triton(x, rm, rv, w, b, False, 0.1, 1e-5)
    assert calls.launches == ["_sample_squares_kernel", "_inference_output_kernel"]
    assert sorted(calls.ops) == ["empty", "empty_like"]
    assert torch.equal(rm.cpu(), torch.zeros(8)) and torch.equal(rv.cpu(), torch.ones(8))
    for args in ((x, w, b), (x.detach().double(), None, None)):
        calls.launches.clear()
        with calls():
            tk.l2_batch_norm_triton(args[0], rm.to(args[0].dtype), rv.to(args[0].dtype), args[1], args[2], False, 0.1,
                                    1e-5)
        assert len(calls.launches) == 4 and "_sample_squares_kernel" not in calls.launches, calls.launches
    monkeypatch.setattr(tk, "_INFERENCE_PATH", False)
    calls.launches.clear()
    with calls():
        with torch.no_grad():
            tk.l2_batch_norm_triton(x, rm, rv, w, b, False, 0.1, 1e-5)
    assert len(calls.launches) == 4 and "_sample_squares_kernel" not in calls.launches, calls.launches

def test_saves_x_the_weight_and_vectors_of_n_and_c(tk):
    """About what BatchNorm keeps (x plus five C-vectors): x, the C weights, μ and invstd (C float64 each) and
    r_n, ‖x_n‖ (N float64 each), in training."""
    x = dev(torch.randn(6, 8, 5, 5)).requires_grad_()
    w, b = dev(torch.rand(8)).requires_grad_(), dev(torch.randn(8)).requires_grad_()
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tk.l2_batch_norm_triton(x, None, None, w, b, True)
    assert sum(storages.values()) == (x.numel() + 8) * 4 + (2 * 8 + 2 * 6) * 8


def test_affine_pass_against_formula(tk):
    gen = torch.Generator().manual_seed(4)
    u, v = torch.randn(2, 3, 4, 5, generator=gen), torch.randn(2, 3, 4, 5, generator=gen)
    p, q, r = (torch.randn(2, 3, generator=gen) for _ in range(3))
    v_cl = v.contiguous(memory_format=torch.channels_last)
    out = tk.affine_triton(dev(torch.empty_like(u)), dev(u), dev(p), dev(r), v=dev(v_cl), q=dev(q)).cpu()
    p64, q64, r64 = (t.double()[..., None, None] for t in (p, q, r))
    want = u.double() * p64 + v.double() * q64 + r64
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    bias = torch.randn(3, generator=gen)
    out = tk.affine_triton(dev(torch.empty(2, 3, 4, 5, dtype=torch.bfloat16)), dev(u), dev(p), dev(bias)).cpu()
    assert out.dtype == torch.bfloat16
    want = u.double() * p.double()[..., None, None] + bias.double()[:, None, None]
    torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_values_and_memory_format(tk, training):
    x = torch.randn(3, 5, 4, 3, dtype=F64, generator=torch.Generator().manual_seed(5)) + 0.3
    got = run(tk.l2_batch_norm_triton, x, training, memory_format=torch.channels_last)
    assert got["y"].is_contiguous(memory_format=torch.channels_last)
    assert got["dx"].is_contiguous(memory_format=torch.channels_last)
    assert_close(got, run(l2_batch_norm_reference, x, training, dtype=F64), rtol=1e-5, atol=1e-5)
    x5 = torch.randn(2, 2, 3, 3, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    got = run(tk.l2_batch_norm_triton, x5, training, memory_format=torch.channels_last_3d)
    assert got["y"].is_contiguous(memory_format=torch.channels_last_3d)
    assert_close(got, run(l2_batch_norm_reference, x5, training, dtype=F64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_weight_and_bias_none(tk, training):
    x = torch.randn(4, 3, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(7)) - 1
    got = run(tk.l2_batch_norm_triton, x, training, affine=False)
    assert_close(got, run(l2_batch_norm_reference, x, training, dtype=F64, affine=False), rtol=1e-5, atol=1e-5)


def test_all_zero_sample_and_batch_of_two(tk):
    x = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(8))
    want = run(l2_batch_norm_reference, x, True, dtype=F64)
    assert_close(run(tk.l2_batch_norm_triton, x, True), want, rtol=1e-5, atol=1e-5)
    x = torch.cat([x, torch.zeros(1, 3, 4, 4, dtype=F64)])
    for training in (True, False):
        got = run(tk.l2_batch_norm_triton, x, training)
        assert all(torch.isfinite(t).all() for t in got.values())
        assert_close(got, run(l2_batch_norm_reference, x, training, dtype=F64), rtol=1e-5, atol=1e-5)


def test_large_mean_channel_float32_against_float64(tk):
    """Channel 1 is 1e4 + noise: float32 statistics must come from centred sums to survive."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(6, 3, 5, 5, dtype=F64, generator=gen)
    x[:, 1] += 1e4
    x32 = x.float()
    got = run(tk.l2_batch_norm_triton, x32, True)
    ref = run(l2_batch_norm_reference, x32.double(), True, dtype=F64)
    torch.testing.assert_close(got["y"].double(), ref["y"], rtol=0, atol=2e-2)
    torch.testing.assert_close(got["rv"].double(), ref["rv"], rtol=2e-2, atol=1e-7)
    torch.testing.assert_close(got["rm"].double(), ref["rm"], rtol=1e-5, atol=1e-5)
    assert (got["dx"].double() - ref["dx"]).abs().max() < 0.05 * ref["dx"].abs().max()
    # the small channels' outputs do not suffer from the large one
    torch.testing.assert_close(got["y"][:, [0, 2]].double(), ref["y"][:, [0, 2]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 6e-2), (torch.float16, 1e-2)], ids=["bf16", "fp16"])
def test_half_precision_within_tolerance(tk, dtype, tol):
    x = torch.randn(4, 3, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(10)) * 3 + 1
    want = run(l2_batch_norm_reference, x.to(dtype).double(), True, dtype=F64)  # same input values, float64
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = run(tk.l2_batch_norm_triton, x.to(dtype), True, dtype=dtype, memory_format=fmt)
        assert got["y"].dtype == dtype and got["dx"].dtype == dtype and got["dw"].dtype == dtype
        for key in ("y", "dx", "dw", "db", "rm", "rv"):
            scale = want[key].abs().max()
            assert (got[key].double() - want[key]).abs().max() <= tol * max(scale, 1.0), key


def test_expanded_gradient_and_non_viewable_input(tk):
    """y.sum() gives a stride-0 gradient; a transposed input has no (N, C, M) view and is copied."""
    x = torch.randn(3, 4, 5, 6, dtype=F64, generator=torch.Generator().manual_seed(11)).transpose(2, 3)
    outs = []
    for fn, device, dtype in ((tk.l2_batch_norm_triton, DEVICE, torch.float32), (l2_batch_norm_reference, "cpu", F64)):
        xx = x.to(device, dtype).requires_grad_()
        assert not xx.is_contiguous() and not xx.is_contiguous(memory_format=torch.channels_last)
        w = torch.linspace(0.5, 2, 4, dtype=dtype, device=device, requires_grad=True)
        y = fn(xx, None, None, w, None, True)
        (y * torch.linspace(-1, 1, 5, dtype=dtype, device=device)).sum().backward()  # not orthogonal to y
        xx2 = xx.detach().clone().requires_grad_()
        fn(xx2, None, None, w.detach(), None, True).sum().backward()  # expanded dy
        outs.append((y, xx.grad, w.grad, xx2.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a.to("cpu", F64), b, rtol=1e-5, atol=1e-5)


def test_strided_view_input_is_read_in_place_and_gives_dense_outputs(tk):
    """Every other position of a wider tensor (spatial dims that flatten, stride 2): the kernels read it through its
    strides (no copy), and the output and input gradient, made with ``empty_like`` of a non-dense tensor, are
    contiguous tensors whose rows are found again; training and eval against the float64 reference."""
    wide = torch.randn(3, 4, 5, 12, dtype=F64, generator=torch.Generator().manual_seed(14)) * 2 + 0.5
    dy = torch.randn(3, 4, 5, 6, dtype=F64, generator=torch.Generator().manual_seed(15))
    for training in (True, False):
        outs = []
        paths = ((tk.l2_batch_norm_triton, DEVICE, torch.float32), (l2_batch_norm_reference, "cpu", F64))
        for fn, device, dtype in paths:
            xx = wide.to(device, dtype)[..., ::2].detach().requires_grad_()
            assert not xx.is_contiguous() and tk._as_rows(xx).t is xx  # read in place
            w = torch.linspace(0.5, 2, 4, dtype=dtype, device=device, requires_grad=True)
            rm, rv = torch.zeros(4, dtype=dtype, device=device), torch.ones(4, dtype=dtype, device=device)
            y = fn(xx, rm, rv, w, None, training)
            y.backward(dy.to(device, dtype))
            outs.append((y, xx.grad, w.grad, rm))
        assert outs[0][0].is_contiguous() and outs[0][1].is_contiguous()
        for a, b in zip(*outs):
            torch.testing.assert_close(a.to("cpu", F64), b, rtol=1e-5, atol=1e-5)


def test_gradients_orthogonal_to_samples(tk):
    """y depends on x_n only through x_n/‖x_n‖, so Σ dx_n·x_n = 0 for every sample."""
    x = torch.randn(4, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(12)) + 1
    for training in (True, False):
        dx = run(tk.l2_batch_norm_triton, x, training, dtype=F64)["dx"].cpu()
        dots = (dx * x).flatten(1).sum(dim=1)
        assert dots.abs().max() < 1e-10 * dx.abs().max() * x.abs().max() * x[0].numel()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(tk, training):
    gen = torch.Generator().manual_seed(13)
    x = dev(torch.randn(3, 2, 3, 2, dtype=F64, generator=gen)).requires_grad_()
    w = dev(torch.rand(2, dtype=F64, generator=gen)).requires_grad_()
    b = dev(torch.randn(2, dtype=F64, generator=gen)).requires_grad_()
    rm, rv = dev(torch.randn(2, dtype=F64, generator=gen)), dev(torch.rand(2, dtype=F64, generator=gen) + 0.5)
    fn = lambda x, w, b: tk.l2_batch_norm_triton(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)


def test_layer_through_the_environment_switch(tk, monkeypatch):
    """L2BN_IMPL=triton routes the layer here; momentum None (cumulative average) matches the reference."""
    gen = torch.Generator().manual_seed(14)
    batches = [torch.randn(5, 3, 4, 4, generator=gen), torch.randn(5, 3, 4, 4, generator=gen) * 2 + 1]
    layers = {}
    for impl, device in (("triton", DEVICE), ("reference", "cpu")):
        monkeypatch.setenv(IMPL_ENV_VAR, impl)
        layer = l2bn.L2BatchNorm2d(3, momentum=None, device=device)
        outs = [layer(x.to(device)).cpu() for x in batches]
        layer.eval()
        outs.append(layer(batches[0].to(device)).cpu())
        layers[impl] = (layer.cpu(), outs)
    (tri, tri_outs), (ref, ref_outs) = layers["triton"], layers["reference"]
    for a, b in zip(tri_outs, ref_outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tri.running_mean, ref.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tri.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
    assert tri.num_batches_tracked.item() == 2


def test_zero_sample_batch_uses_reference(tk):
    x = dev(torch.randn(0, 3, 4, 4)).requires_grad_()
    y = l2_batch_norm(x, dev(torch.zeros(3)), dev(torch.ones(3)), None, None, False, impl="triton")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_errors_name_the_device_and_dtype(tk, monkeypatch):
    x = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="torch.int64"):
        tk.l2_batch_norm_triton(dev(torch.ones(2, 3, 4, dtype=torch.int64)), None, None, None, None, True)
    monkeypatch.setattr(tk, "INTERPRETED", False)  # compiled kernels need GPU tensors
    with pytest.raises(RuntimeError, match="on cpu; use impl='fused'"):
        tk.l2_batch_norm_triton(x, None, None, None, None, True)


# --- dispatch: no triton needed, the device predicate is monkeypatched -------------------------------

def test_auto_picks_triton_only_for_triton_devices(monkeypatch):
    x = torch.randn(2, 3, 4)
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "triton_importable", lambda: True)
    assert dispatch.TRITON_DEVICE_TYPES == ("cuda",)
    cpu_choice = IMPLEMENTATIONS[dispatch.auto_impl(x)]
    assert cpu_choice in (IMPLEMENTATIONS["cpp"], IMPLEMENTATIONS["fused"])  # a CPU tensor never goes to Triton
    monkeypatch.setattr(dispatch, "TRITON_DEVICE_TYPES", ("cpu",))  # pretend CPU were a GPU
    assert resolve_impl(None, x) is IMPLEMENTATIONS["triton"]
    assert resolve_impl("auto", x) is IMPLEMENTATIONS["triton"]
    assert resolve_impl(None, torch.randn(0, 3, 4)) is IMPLEMENTATIONS["reference"]
    assert resolve_impl("fused", x) is IMPLEMENTATIONS["fused"]  # forcing still wins
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    assert resolve_impl(None, x) is cpu_choice  # no triton installed: the CPU paths
    monkeypatch.setenv(IMPL_ENV_VAR, "Triton")
    assert resolve_impl(None, x) is IMPLEMENTATIONS["triton"]


@pytest.fixture
def triton_calls(tk, monkeypatch) -> list:
    """``auto`` sending ``DEVICE`` tensors to Triton; the list grows by one at each entry into its Function."""
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "TRITON_DEVICE_TYPES", (DEVICE,))
    monkeypatch.setattr(dispatch, "triton_importable", lambda: True)
    calls = []
    original = tk.TritonL2BatchNorm.apply
    monkeypatch.setattr(tk.TritonL2BatchNorm, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


def test_auto_runs_the_triton_kernels_when_selected(triton_calls):
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(15))
    y = l2_batch_norm(dev(x), None, None, None, None, True).cpu()
    assert triton_calls == [1]
    torch.testing.assert_close(y, l2_batch_norm_fused(x, None, None, None, None, True), rtol=1e-5, atol=1e-5)


def test_torch_compile_traces_the_fused_path_on_triton_devices(triton_calls):
    """Under torch.compile ``auto`` takes the torch-op path on a Triton device too (the compiler fuses it into
    kernels of its own): the Triton autograd.Function is never entered while tracing."""
    x = dev(torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(15)))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: l2_batch_norm(t, None, None, None, None, True), backend="aot_eager",
                             fullgraph=True)
    y = compiled(x)
    assert triton_calls == []
    torch.testing.assert_close(y.cpu(), l2_batch_norm_fused(x.cpu(), None, None, None, None, True), rtol=1e-5,
                               atol=1e-5)
    assert dispatch.auto_impl(x) == "triton"  # outside the compiler, Triton again


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layers_never_synchronise_the_device(tk, dtype):
    """A training step (forward, backward, running statistics) and an eval call of each layer queue their
    kernels without waiting for the GPU (torch's sync debug mode raises on any synchronising call)."""
    layers = [l2bn.L2BatchNorm1d(8, device="cuda", dtype=dtype), l2bn.L2BatchNorm2d(8, device="cuda", dtype=dtype),
              l2bn.L2BatchNorm2d(8, device="cuda", dtype=dtype)]
    inputs = [torch.randn(16, 8, device="cuda", dtype=dtype), torch.randn(16, 8, 6, 6, device="cuda", dtype=dtype),
              torch.randn(16, 8, 6, 6, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)]
    for layer, x in zip(layers, inputs):
        x.requires_grad_()
        layer(x).sum().backward()  # first call: kernel compilation, outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(x).sum().backward()
            layer.eval()
            with torch.no_grad():
                layer(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_module_imports_without_triton():
    """With triton unimportable the module still imports, reports it, and says what to do instead."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None
        import torch
        import l2bn.kernels.triton_l2bn as m
        assert not m.TRITON_AVAILABLE
        try:
            m.l2_batch_norm_triton(torch.randn(2, 3, 4), None, None, None, None, True)
        except RuntimeError as e:
            assert "triton" in str(e) and "impl='fused'" in str(e), e
        else:
            raise AssertionError("no error without triton")
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_sqrt_d_rescaling_off(tk):
    """rescale=False normalises to unit norm; l2_eps clamps tiny samples the same as the reference."""
    x = torch.randn(3, 2, 4, dtype=F64, generator=torch.Generator().manual_seed(16))
    x[1] *= 1e-9
    for rescale in (True, False):
        kw = dict(rescale=rescale, l2_eps=1e-6)
        y = tk.l2_batch_norm_triton(dev(x.float()), None, None, None, None, True, **kw).cpu()
        want = l2_batch_norm_reference(x, None, None, None, None, True, **kw)
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_interpreter_flag_read_without_triton_knobs(monkeypatch):
    """Triton before 3.4 has no ``triton.knobs`` (torch 2.7 ships 3.3): the module must still import and read
    TRITON_INTERPRET, as those releases' ``triton.jit`` does."""
    module = importlib.import_module(MODULE)
    monkeypatch.delattr(module.triton, "knobs", raising=False)
    for value, expected in (("1", True), ("0", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert module._interpret_requested() is expected
    monkeypatch.delenv("TRITON_INTERPRET")
    assert module._interpret_requested() is False


def _compile_for_cuda(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """tests/triton_cuda_compile.py in a fresh process (compiled kernels), with an empty Triton cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = Path(__file__).with_name("triton_cuda_compile.py")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=900)


NEEDS_CUDA_BACKEND = pytest.mark.skipif(
    not HAS_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None, reason="no triton with a CUDA backend"
)


@NEEDS_CUDA_BACKEND
def test_every_kernel_compiles_for_cuda_without_a_gpu(tmp_path):
    """The compiled path, which the interpreter (no type checks) does not exercise: each kernel, in the variants
    the wrappers launch (flags, float32 and bfloat16 input, integer arguments of 1), builds down to sm_90 cubin,
    bfloat16 to sm_80 too."""
    out = _compile_for_cuda(tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.count("ok ") >= 30


@pytest.mark.slow
@NEEDS_CUDA_BACKEND
def test_every_kernel_variant_compiles_for_cuda_without_a_gpu(tmp_path):
    """As above for every combination of flags and all four input dtypes."""
    out = _compile_for_cuda(tmp_path, "--all")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


@pytest.mark.skipif(not HAS_TRITON or RUNNABLE, reason="the kernels run in this process")
def test_interpreter_suite_in_fresh_process():
    """triton was imported before this module could ask for the interpreter: run the file anew."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider",
           "-k", "not fresh_process and not compile and not without_triton"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]
