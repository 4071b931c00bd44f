"""Fused L2BN kernels against the reference composition and an independent float64 formula."""
from __future__ import annotations

import itertools
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import l2bn
from l2bn.functional import IMPL_ENV_VAR, IMPLEMENTATIONS, l2_batch_norm, resolve_impl
from l2bn.kernels import cpp, dispatch, l2_batch_norm_reference
from l2bn.kernels.cpp_custom_op import l2_batch_norm_cpp_graph
from l2bn.kernels.fused import sample_channel_moments, spatial_stride

F64 = torch.float64
FLOAT32_EPS = torch.finfo(torch.float32).eps


def formula(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Paper eq. (3) then BN with batch statistics, written out in float64."""
    x = x.to(F64)
    n, c = x.shape[:2]
    flat = x.reshape(n, -1)
    xhat = (flat * math.sqrt(flat.shape[1]) / flat.norm(dim=1, keepdim=True)).reshape(x.shape)
    dims = [0, *range(2, x.dim())]
    mean = xhat.mean(dim=dims, keepdim=True)
    var = ((xhat - mean) ** 2).mean(dim=dims, keepdim=True)
    shape = (1, c) + (1,) * (x.dim() - 2)
    return (xhat - mean) / torch.sqrt(var + eps) * w.to(F64).view(shape) + b.to(F64).view(shape)


def run(fn, x, training, *, momentum=0.1, grad=None, memory_format=torch.contiguous_format, dtype=F64):
    """Forward + backward of ``fn`` with fixed parameters; returns outputs, gradients and running stats."""
    gen = torch.Generator().manual_seed(7)
    c = x.shape[1]
    w = (torch.rand(c, generator=gen, dtype=F64) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(c, generator=gen, dtype=F64).to(dtype).requires_grad_()
    rm = torch.randn(c, generator=gen, dtype=F64).to(dtype)
    rv = (torch.rand(c, generator=gen, dtype=F64) + 0.5).to(dtype)
    xx = x.detach().to(dtype).contiguous(memory_format=memory_format).requires_grad_()
    y = fn(xx, rm, rv, w, b, training, momentum, 1e-5)
    g = torch.randn(y.shape, generator=gen, dtype=F64).to(dtype) if grad is None else grad
    y.backward(g)
    return {"y": y, "dx": xx.grad, "dw": w.grad, "db": b.grad, "rm": rm, "rv": rv}


def assert_close(a: dict, b: dict, **tol) -> None:
    for key in a:
        torch.testing.assert_close(a[key].to(F64), b[key].to(F64), msg=lambda m: f"{key}: {m}", **tol)


SHAPES = [(5, 3), (4, 3, 7), (4, 3, 5, 6), (3, 2, 3, 4, 2)]
NO_COMPILER = pytest.mark.skipif(not cpp.compiler_found(), reason="no C++ compiler: the compiled kernel cannot be built")


@pytest.fixture(params=[pytest.param("cpp", marks=NO_COMPILER), "fused"])
def fast(request):
    """Each fast path: the compiled CPU kernel and the torch-op fused path (both against the reference)."""
    return IMPLEMENTATIONS[request.param]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_equals_reference_float64(shape, training, fast):
    x = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    assert_close(run(fast, x, training), run(l2_batch_norm_reference, x, training), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_fused_matches_independent_formula(shape, fast):
    x = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(1)) + 1.0
    w, b = torch.rand(shape[1], dtype=F64) + 0.5, torch.randn(shape[1], dtype=F64)
    y = fast(x, None, None, w, b, True)
    torch.testing.assert_close(y, formula(x, w, b), rtol=1e-12, atol=1e-12)


def test_spatial_stride_is_the_flattened_views_stride():
    """The M-axis stride of (N, C, *S) tensors in every permutation, slice and size-1 pattern of their spatial
    dims: the stride of view(N, C, -1) where that view exists (1 for a single position), else None."""
    gen = torch.Generator().manual_seed(3)
    checked = 0
    for shape in [(2, 3), (2, 3, 5), (2, 3, 4, 5), (2, 3, 1, 5), (2, 3, 4, 1), (2, 3, 2, 3, 4), (2, 3, 1, 1, 4)]:
        base = torch.empty(shape)
        spatial = list(range(2, len(shape)))
        for order in itertools.permutations(spatial):
            t = base.permute(0, 1, *order)
            views = [t, t.contiguous(), t[..., ::2]] + ([t[:, :, 1:]] if t.dim() > 2 and t.shape[2] > 1 else [])
            for v in views:
                try:
                    flat = v.view(v.shape[0], v.shape[1], -1)
                    want = flat.stride(2) if flat.shape[2] > 1 else 1
                except RuntimeError:
                    want = None
                assert spatial_stride(v) == want, (tuple(v.shape), v.stride())
                checked += 1
    assert checked > 60
    x = torch.randn(4, 6, 3, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    assert spatial_stride(x) == 6 and spatial_stride(x[..., 1:4]) is None


def test_sample_channel_moments_against_float64_loops():
    x = torch.randn(3, 2, 4, 5, dtype=torch.float32) * 3 + 100
    mean, var = sample_channel_moments(x.contiguous(memory_format=torch.channels_last))
    for n in range(3):
        for c in range(2):
            v = x[n, c].to(F64).flatten()
            assert abs(mean[n, c].item() - v.mean().item()) < 1e-4
            assert abs(var[n, c].item() - ((v - v.mean()) ** 2).mean().item()) < 1e-3


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_values_and_memory_format(training, fast):
    x = torch.randn(4, 5, 6, 3, dtype=F64) + 0.3
    cl = run(fast, x, training, memory_format=torch.channels_last)
    ref = run(l2_batch_norm_reference, x, training)
    assert_close(cl, ref, rtol=1e-12, atol=1e-12)
    assert cl["y"].is_contiguous(memory_format=torch.channels_last)
    assert cl["dx"].is_contiguous(memory_format=torch.channels_last)


def test_non_contiguous_upstream_gradient(fast):
    """y.sum() hands backward an expanded (stride-0) gradient: the generic reduction path."""
    x = torch.randn(3, 4, 5, 5, dtype=F64)
    outs = []
    for fn in (fast, l2_batch_norm_reference):
        xx = x.clone().requires_grad_()
        w = torch.linspace(0.5, 2, 4, dtype=F64, requires_grad=True)
        (fn(xx, None, None, w, None, True) ** 2).sum().backward()  # non-trivial dy
        xx2 = x.clone().requires_grad_()
        (fn(xx2, None, None, w.detach() * 1.0, None, True) * w.detach().view(1, -1, 1, 1)).sum().backward()
        outs.append((xx.grad, w.grad, xx2.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_momentum_none_through_the_layer(monkeypatch):
    x1, x2 = torch.randn(6, 3, 4, 4, dtype=F64), torch.randn(6, 3, 4, 4, dtype=F64) * 2 + 1
    layers = {}
    for impl in ("fused", "reference"):
        monkeypatch.setenv(IMPL_ENV_VAR, impl)
        layer = l2bn.L2BatchNorm2d(3, momentum=None, dtype=F64)
        layer(x1), layer(x2)
        layers[impl] = layer
    torch.testing.assert_close(layers["fused"].running_mean, layers["reference"].running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layers["fused"].running_var, layers["reference"].running_var, rtol=1e-12, atol=1e-12)
    # cumulative average: the mean of the two batches' channel means
    means = [l2bn.kernels.l2_normalize_samples(x).mean(dim=(0, 2, 3)) for x in (x1, x2)]
    torch.testing.assert_close(layers["fused"].running_mean, (means[0] + means[1]) / 2, rtol=1e-12, atol=1e-12)


def test_batch_of_two_and_all_zero_sample(fast):
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    assert_close(run(fast, x, True), run(l2_batch_norm_reference, x, True), rtol=1e-12, atol=1e-12)
    x[1] = 0.0
    out = run(fast, x, True)
    assert all(torch.isfinite(t).all() for t in out.values())
    assert_close(out, run(l2_batch_norm_reference, x, True), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["fused", pytest.param("cpp", marks=NO_COMPILER)])
def test_zero_sample_batch(impl):
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = l2_batch_norm(x, torch.zeros(3), torch.ones(3), training=False, impl=impl)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(training, fast):
    x = torch.randn(3, 2, 3, 2, dtype=F64, requires_grad=True)
    w = torch.rand(2, dtype=F64, requires_grad=True)
    b = torch.randn(2, dtype=F64, requires_grad=True)
    rm, rv = torch.randn(2, dtype=F64), torch.rand(2, dtype=F64) + 0.5
    fn = lambda x, w, b: fast(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_float32_large_mean_small_variance_has_no_cancellation(fast):
    """E[x²] − E[x]² in float32 would lose every digit here (mean 1e4, std 1)."""
    x = 1e4 + torch.randn(8, 4, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(3))
    x32 = x.float()
    fused = run(fast, x32, True, dtype=torch.float32)
    ref = run(l2_batch_norm_reference, x32.double(), True)
    torch.testing.assert_close(fused["y"].double(), ref["y"], rtol=0, atol=2e-2)
    torch.testing.assert_close(fused["rv"].double(), ref["rv"], rtol=2e-2, atol=1e-7)
    assert (fused["dx"].double() - ref["dx"]).abs().max() < 0.05 * ref["dx"].abs().max()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_low_precision_within_tolerance(dtype, tol, channels_last, fast):
    x = torch.randn(6, 4, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(4)) * 3 + 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    low = run(fast, x.to(dtype).double(), True)  # same input values in float64
    got = run(fast, x.to(dtype), True, dtype=dtype, memory_format=fmt)
    assert got["y"].dtype == dtype and got["dx"].dtype == dtype
    for key in ("y", "dx", "dw", "db"):
        scale = low[key].abs().max()
        assert (got[key].double() - low[key]).abs().max() <= tol * max(scale, 1.0), key


def test_dispatch_argument_and_environment(monkeypatch):
    x = torch.randn(2, 3)
    assert resolve_impl("reference", x) is IMPLEMENTATIONS["reference"]
    assert resolve_impl("FUSED", x) is IMPLEMENTATIONS["fused"]
    monkeypatch.setenv(IMPL_ENV_VAR, "reference")
    assert resolve_impl(None, x) is IMPLEMENTATIONS["reference"]
    assert resolve_impl("fused", x) is IMPLEMENTATIONS["fused"]  # the argument wins over the variable
    monkeypatch.setenv(IMPL_ENV_VAR, "auto")
    assert resolve_impl(None, x) is IMPLEMENTATIONS["cpp" if cpp.available() else "fused"]
    assert resolve_impl(None, torch.randn(0, 3)) is IMPLEMENTATIONS["reference"]
    monkeypatch.setenv(IMPL_ENV_VAR, "nope")
    with pytest.raises(ValueError, match="nope"):
        resolve_impl(None, x)


@pytest.mark.parametrize("store", ["os.environ's own", "os.environ.get"])
def test_environment_setting_follows_every_change(monkeypatch, store):
    if store == "os.environ.get":  # the portable fallback (Pythons without os._Environ's store)
        monkeypatch.setattr(dispatch, "_ENVIRON_STORE", None)
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    assert dispatch.impl_setting() == "auto"
    monkeypatch.setenv(IMPL_ENV_VAR, "Fused")
    assert dispatch.impl_setting() == "Fused"
    os.environ[IMPL_ENV_VAR] = "reference"  # plain os.environ assignments too (monkeypatch restores it)
    assert dispatch.impl_setting() == "reference"
    monkeypatch.setenv(IMPL_ENV_VAR, "")
    assert dispatch.impl_setting() == "auto"
    del os.environ[IMPL_ENV_VAR]
    assert dispatch.impl_setting() == "auto"


def saved_bytes(step) -> int:
    """Bytes of distinct storages autograd keeps for backward while ``step`` runs."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def test_saved_bytes_match_batchnorm_not_the_composition():
    n, c = 8, 16
    x = torch.randn(n, c, 8, 8, requires_grad=True)
    bn = saved_bytes(lambda: nn.BatchNorm2d(c)(x))
    layer = l2bn.L2BatchNorm2d(c)
    fused = saved_bytes(lambda: l2_batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, True, impl="fused"))
    ref = saved_bytes(lambda: l2_batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, True, impl="reference"))
    # x plus per-(n, c) moments and per-sample scales: BatchNorm's x plus O(N·C), never a second activation
    assert fused <= bn + (2 * n * c + 2 * n) * 4
    assert ref >= bn + x.numel() * 4


# ------------------------------------------------------------------------------ the compiled CPU kernel
@NO_COMPILER
def test_cpp_saves_no_more_than_batchnorm():
    """Only x and the weight are kept: the per-(n, c) moments are recomputed in backward's read of x."""
    for shape in [(8, 16, 8, 8), (4, 3, 5), (16, 32)]:
        x = torch.randn(shape, requires_grad=True)
        c = shape[1]
        bn_layer = nn.BatchNorm1d(c) if len(shape) < 4 else nn.BatchNorm2d(c)
        layer = l2bn.L2BatchNorm1d(c) if len(shape) < 4 else l2bn.L2BatchNorm2d(c)
        bn = saved_bytes(lambda: bn_layer(x))
        stats = (layer.running_mean, layer.running_var, layer.weight, layer.bias)
        ours = saved_bytes(lambda: l2_batch_norm(x, *stats, True, impl="cpp"))
        assert ours <= bn, (shape, ours, bn)
        assert ours == (x.numel() + c) * 4  # exactly x and the weight


@NO_COMPILER
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channels_last_3d", "sliced"])
@pytest.mark.parametrize("channels", [5, 16, 37])  # partial, exact and mixed 16-wide column tiles
def test_cpp_layouts_and_channel_tiles(layout, channels):
    shape = (3, channels, 4, 6, 2) if layout == "channels_last_3d" else (3, channels, 9, 7)
    x = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(5)) * 1.5 - 0.4
    fmt = {"channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d}.get(layout, torch.contiguous_format)
    got = run(IMPLEMENTATIONS["cpp"], x, True, memory_format=fmt)
    if layout == "sliced":  # a strided view: the kernel works on a dense copy and returns a dense result
        wide = torch.randn(shape[0], channels, 9, 14, dtype=F64)
        wide[..., ::2] = x
        xs = wide[..., ::2].requires_grad_()
        assert not xs.is_contiguous()
        y = l2_batch_norm(xs, None, None, None, None, True, impl="cpp")
        torch.testing.assert_close(y, l2_batch_norm_reference(x, None, None, None, None, True), rtol=1e-12, atol=1e-12)
    assert_close(got, run(l2_batch_norm_reference, x, True), rtol=1e-12, atol=1e-12)
    if layout != "nchw" and layout != "sliced":
        assert got["y"].is_contiguous(memory_format=fmt) and got["dx"].is_contiguous(memory_format=fmt)


@NO_COMPILER
def test_cpp_long_runs_and_few_samples():
    """Runs longer than one accumulation chunk, and fewer samples than threads (eval splits each sample, in pieces
    of at least 32 768 values: one piece for a small sample, two for one of 76 800 values at two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for shape in [(2, 3, 40, 50), (1, 3, 40, 50), (1, 3, 160, 160)]:
            x = torch.randn(shape, dtype=torch.float32) * 2 + 3
            for training in (True, False):
                got = run(IMPLEMENTATIONS["cpp"], x, training, dtype=torch.float32)
                ref = run(l2_batch_norm_reference, x.double(), training)
                assert_close(got, ref, rtol=2e-4, atol=2e-4)
    finally:
        torch.set_num_threads(threads)
    # channels_last: a small sample (two rows per update, 900 rows = 2 chunks, odd tail) and one over
    # 256 KiB (one row per update)
    for shape in [(2, 4, 30, 30), (2, 40, 60, 41)]:
        x = torch.randn(shape, dtype=torch.float32) * 2 + 3
        got = run(IMPLEMENTATIONS["cpp"], x, True, dtype=torch.float32, memory_format=torch.channels_last)
        assert_close(got, run(l2_batch_norm_reference, x.double(), True), rtol=2e-4, atol=2e-4)


@NO_COMPILER
@pytest.mark.parametrize("channels,dtype,size", [(1023, torch.float32, (5, 7)), (1030, torch.float32, (5, 7)),
                                                (511, F64, (5, 7)), (515, F64, (5, 7)), (1030, torch.float32, (7, 10))],
                         ids=["lanes-fp32", "columns-fp32", "lanes-fp64", "columns-fp64", "columns-288KiB"])
def test_cpp_channels_last_rows_either_side_of_a_page(channels, dtype, size):
    """Channels-last training moments with rows just under 4 KiB (register lane groups and the last C mod 8
    channels in the column loop) and just over (the column loop alone, two rows per update up to 512 KiB
    samples): eq. 3 either way."""
    x = torch.randn(3, channels, *size, dtype=dtype, generator=torch.Generator().manual_seed(7)) * 2 + 1
    got = run(IMPLEMENTATIONS["cpp"], x, True, dtype=dtype, memory_format=torch.channels_last)
    tol = 1e-12 if dtype == F64 else 2e-4
    assert_close(got, run(l2_batch_norm_reference, x.double(), True), rtol=tol, atol=tol)


@NO_COMPILER
@pytest.mark.parametrize("channels,positions", [(24, 17), (24, 18), (24, 19), (24, 20), (24, 515), (1030, 19)])
def test_cpp_channels_last_rows_in_fours_pairs_and_one(channels, positions):
    """Channels-last training moments in the column loop (rows under 512 bytes, or of 4 KiB and more) take four
    rows an update, then a pair, then one: position counts of every remainder mod 4, and 515 (a chunk of 512 and
    a tail of 3). A large value in the last row of a sample would change every output of that sample if the
    tail row were dropped or counted twice; eq. 3 against the float64 reference, float32."""
    x = torch.randn(3, channels, 1, positions, generator=torch.Generator().manual_seed(positions)) * 2 + 1
    x[1, :, 0, -1] += 30.0
    got = run(IMPLEMENTATIONS["cpp"], x, True, dtype=torch.float32, memory_format=torch.channels_last)
    assert_close(got, run(l2_batch_norm_reference, x.double(), True), rtol=2e-4, atol=2e-4)


@NO_COMPILER
@pytest.mark.parametrize("length", [31, 32, 33, 511, 512, 513, 1055])
def test_cpp_sample_norms_over_vector_steps_chunks_and_tails(length):
    """‖x_n‖ of samples of (N, D) input summed 32 values a step in registers, chunk by chunk, with a tail of
    fewer than 32: one large value at the last position (in the tail or the last step) would change every output
    if the tail were dropped or counted twice; float32 and float64 against the float64 reference, eval and
    training."""
    x = torch.randn(8, length, dtype=F64, generator=torch.Generator().manual_seed(length))
    x[:, -1] = 40.0
    for training in (False, True):
        ref = run(l2_batch_norm_reference, x, training)
        assert_close(run(IMPLEMENTATIONS["cpp"], x, training), ref, rtol=1e-11, atol=1e-11)
        assert_close(run(IMPLEMENTATIONS["cpp"], x, training, dtype=torch.float32), ref, rtol=5e-5, atol=5e-5)


@NO_COMPILER
@pytest.mark.parametrize("shape,fmt", [((4, 130, 8, 8), torch.contiguous_format), ((5, 50, 12, 14), torch.contiguous_format),
                                       ((130, 130, 8, 8), torch.contiguous_format),
                                       ((3, 4, 40, 60), torch.contiguous_format), ((3, 130, 8, 8), torch.channels_last),
                                       ((3, 67, 11, 13), torch.channels_last),
                                       ((61, 130, 19, 21), torch.contiguous_format), ((122, 130, 19, 21), torch.channels_last)],
                         ids=["8x8", "12x14-row-tails", "8x8-over-8MiB-in-float64", "runs-over-a-chunk", "cl",
                              "cl-chunk-tails", "streamed-in-float64-unaligned-rows", "streamed-cl"])
def test_cpp_eval_of_samples_beyond_l1(shape, fmt):
    """Eval of samples of 32 KiB and more (x·gain_c written, then scaled in place while in cache; rows with
    tails at 12×14, inputs both sides of 8 MiB; channels-last chunks starting mid-row, and ending in a tail shorter
    than two vectors at 67×11×13), and of outputs of 24 MiB and more (stored past the caches: rows of 399 values,
    so every row starts off a 64-byte boundary; float64 only at 61 samples, both dtypes at 122), float64 and
    float32, on one thread (every sample on one) and two, against the reference, with an all-zero sample. The
    outputs do not depend on the thread count (bit for bit), wherever a thread's samples start."""
    x = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(3)) * 2 + 1
    x[1] = 0.0
    old = torch.get_num_threads()
    outputs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = run(IMPLEMENTATIONS["cpp"], x, False, memory_format=fmt)
            assert_close(got, run(l2_batch_norm_reference, x, False), rtol=1e-12, atol=1e-12)
            assert got["y"].is_contiguous(memory_format=fmt)
            got32 = run(IMPLEMENTATIONS["cpp"], x, False, dtype=torch.float32, memory_format=fmt)
            ref = run(l2_batch_norm_reference, x, False)
            assert_close({k: got32[k] for k in ("y", "dx")}, ref, rtol=2e-5, atol=2e-5)
            assert_close({k: got32[k] for k in ("dw", "db")}, ref, rtol=2e-4, atol=2e-4)  # float sums of N·M terms
            outputs[threads] = (got["y"], got32["y"])
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(outputs[1], outputs[2]))


@NO_COMPILER
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["rows", "cl"])
def test_cpp_training_outputs_stored_past_the_caches(fmt):
    """Training forward + backward where y and dx are 24 MiB or more (both stored past the caches: rows of 399
    values, each starting off a 64-byte boundary; channels-last rows of 130): float64 at 61 samples (24.1 MiB),
    float32 at 122 (24.1 MiB), against the float64 reference, on two threads and one, bit for bit alike."""
    old = torch.get_num_threads()
    outputs = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            for n, dtype, tol in ((61, F64, 1e-10), (122, torch.float32, 2e-4)):
                x = torch.randn((n, 130, 19, 21), dtype=F64, generator=torch.Generator().manual_seed(n)) * 2 + 1
                got = run(IMPLEMENTATIONS["cpp"], x, True, dtype=dtype, memory_format=fmt)
                assert got["y"].is_contiguous(memory_format=fmt) and got["dx"].is_contiguous(memory_format=fmt)
                assert_close(got, run(l2_batch_norm_reference, x, True), rtol=tol, atol=tol)
                outputs.append((got["y"], got["dx"]))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for two, one in zip(outputs[:2], outputs[2:]) for a, b in zip(two, one))


@NO_COMPILER
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch's forward_ad import
def test_cpp_builds_no_autograd_node_when_nothing_needs_a_gradient():
    """No graph to record (no_grad, or no input requiring a gradient): the kernel alone, the same values; a
    gradient needed: the autograd node; a forward-mode tangent: refused, as the node refuses it."""
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(4, 3, 5, 5)
    w, b = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    for training in (False, True):
        args = (torch.zeros(3), torch.ones(3), w, b, training)
        with torch.no_grad():
            plain = l2_batch_norm(x, *args, impl="cpp")
        assert plain.grad_fn is None and not plain.requires_grad
        tracked = l2_batch_norm(x, *args, impl="cpp")
        assert tracked.grad_fn is not None
        assert torch.equal(plain, tracked.detach())
        frozen = l2_batch_norm(x, torch.zeros(3), torch.ones(3), w.detach(), b.detach(), training, impl="cpp")
        assert frozen.grad_fn is None and torch.equal(frozen, plain)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="jvp"):  # the op itself; l2_batch_norm reroutes
        IMPLEMENTATIONS["cpp"](fwAD.make_dual(x, torch.randn_like(x)), torch.zeros(3), torch.ones(3))


@NO_COMPILER
def test_cpp_same_result_for_any_thread_count():
    x = torch.randn(6, 8, 12, 12)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append([run(IMPLEMENTATIONS["cpp"], x, t, dtype=torch.float32) for t in (True, False)])
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_close(a, b, rtol=1e-6, atol=1e-6)


@NO_COMPILER
def test_cpp_running_stats_in_another_dtype_and_momentum_none(monkeypatch):
    """bf16 activations with float32 buffers (a layer converted by hand), and the cumulative average."""
    x = torch.randn(6, 4, 5, 5)
    rm, rv = torch.zeros(4), torch.ones(4)
    ref_rm, ref_rv = rm.clone().double(), rv.clone().double()
    l2_batch_norm(x.bfloat16(), rm, rv, None, None, True, 0.3, impl="cpp")
    l2_batch_norm(x.bfloat16().double(), ref_rm, ref_rv, None, None, True, 0.3, impl="reference")
    assert rm.dtype == torch.float32
    torch.testing.assert_close(rm.double(), ref_rm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv.double(), ref_rv, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(IMPL_ENV_VAR, "cpp")
    layer = l2bn.L2BatchNorm2d(4, momentum=None, dtype=F64)
    batches = [torch.randn(6, 4, 5, 5, dtype=F64) * (i + 1) for i in range(3)]
    for b in batches:
        layer(b)
    means = [l2bn.kernels.l2_normalize_samples(b).mean(dim=(0, 2, 3)) for b in batches]
    torch.testing.assert_close(layer.running_mean, sum(means) / 3, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", [pytest.param("cpp", marks=NO_COMPILER), "fused"])
def test_fast_paths_refuse_double_backward_with_a_pointer(impl):
    x = torch.randn(4, 3, 5, 5, dtype=F64, requires_grad=True)
    y = l2_batch_norm(x, None, None, None, None, True, impl=impl)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=False)
    assert g.shape == x.shape
    y = l2_batch_norm(x, None, None, None, None, True, impl=impl)
    with pytest.raises(RuntimeError, match="double backward.*impl='reference'"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


@NO_COMPILER
def test_cpp_no_grad_needed_and_only_weight_grad():
    x = torch.randn(4, 3, 5, 5)
    w = torch.rand(3, requires_grad=True)
    y = l2_batch_norm(x, None, None, w, None, True, impl="cpp")  # no bias, x needs no gradient
    (y * torch.arange(3.0).view(1, 3, 1, 1)).sum().backward()
    w_ref = w.detach().clone().requires_grad_()
    (l2_batch_norm(x, None, None, w_ref, None, True, impl="reference") * torch.arange(3.0).view(1, 3, 1, 1)).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert l2_batch_norm(x, None, None, w, None, True, impl="cpp").grad_fn is None


def test_auto_falls_back_to_fused_with_one_warning_when_the_kernel_cannot_build(monkeypatch):
    monkeypatch.setattr(cpp, "_build", lambda: OSError("no compiler in this test"))
    cpp.warn_unavailable.cache_clear()
    cpp._operator.cache_clear()
    cpp.operators.cache_clear()
    try:
        x = torch.randn(3, 4, 2, 2)
        with pytest.warns(RuntimeWarning, match="no compiler in this test"):
            assert resolve_impl("auto", x) is IMPLEMENTATIONS["fused"]
        with pytest.raises(RuntimeError, match="compiled CPU kernel is unavailable: no compiler in this test"):
            l2_batch_norm(x, None, None, training=True, impl="cpp")
    finally:
        cpp.warn_unavailable.cache_clear()
        cpp._operator.cache_clear()
        cpp.operators.cache_clear()


def test_compiled_graphs_call_the_kernel_through_its_custom_operators(monkeypatch):
    """Under torch.compile the dispatcher hands CPU tensors the compiled kernel's custom operators (which a graph
    can hold), or the fused torch-op path where the kernel does not build; other devices' tensors trace the fused
    path (no warning while tracing)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    if cpp.available():
        assert resolve_impl("auto", torch.randn(2, 3)) is l2_batch_norm_cpp_graph
    assert resolve_impl("auto", torch.randn(2, 3, device="meta")) is IMPLEMENTATIONS["fused"]
    monkeypatch.setattr(cpp, "available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_impl("auto", torch.randn(2, 3)) is IMPLEMENTATIONS["fused"]


def test_synchronized_layers_take_torch_ops_while_torch_compile_traces(monkeypatch):
    """SyncL2BatchNorm's path: the compiled kernel's synchronized operators (not custom operators) only in eager;
    while torch.compile traces, "auto" and "cpp" take the torch ops, as before the kernel entered compiled graphs."""
    from l2bn.kernels.sync import _sync_path

    x = torch.randn(2, 3)
    monkeypatch.setattr(cpp, "available", lambda: True)
    assert _sync_path("auto", x) == "cpp" and _sync_path("cpp", x) == "cpp"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _sync_path("auto", x) == "torch" and _sync_path("cpp", x) == "torch" and _sync_path("fused", x) == "torch"


@NO_COMPILER
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(6, 5, 7, 3), (4, 37, 11, 11), (4, 37, 2, 2), (3, 1024, 4, 4)],
                         ids=["c5", "c37", "c37-2x2", "c1024-4x4"])
def test_cpp_16_bit_is_the_float32_result_rounded(dtype, layout, shape):
    """16-bit inputs go through the float32 computation and are rounded once: the outputs are the float32
    kernel's on the same values, rounded by torch, to one unit in the last place, and NaN stays NaN. The 16-bit
    and float32 loops may sum in different orders (built without AVX2 they do), and outputs that cancel to near
    zero then differ by the float32 computation's own error, a few float32 units of the largest output: more
    than one float16 unit there (values in float16's subnormal range). Every channel has its own coefficients,
    so that values stored in the wrong channel fail (16-bit runs and rows go sixteen values a step, then a tail;
    11×11 channels-last float16 sums its 121 rows in two staged groups; 2×2 and 4×4: the small-map paths, 4×4 at
    C = 1024 one sample a block, three blocks)."""
    gen = torch.Generator().manual_seed(5)
    C = shape[1]
    x16 = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype).contiguous(memory_format=layout)
    mean, var = torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5
    weight, bias = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    for training in (True, False):
        xs = [x16.clone().requires_grad_(), x16.float().requires_grad_()]
        ys = [l2_batch_norm(x, mean.clone(), var.clone(), weight, bias, training, impl="cpp") for x in xs]
        gy = torch.randn(ys[0].shape).to(dtype)
        ys[0].backward(gy)
        ys[1].backward(gy.float())
        for got, want in ((ys[0], ys[1]), (xs[0].grad, xs[1].grad)):
            assert got.dtype == dtype
            ulps = (got.detach().view(ints).int() - want.detach().to(dtype).view(ints).int()).abs()
            near_zero = (got.detach().float() - want.detach()).abs() <= 8 * FLOAT32_EPS * want.detach().abs().max()
            assert (ulps <= 1).logical_or(near_zero).all(), (ulps.max(), (ulps > 1).sum())
    bad = x16.clone()
    bad[2, 1, 0, 0] = float("nan")
    y = l2_batch_norm(bad, torch.zeros(C), torch.ones(C), None, None, False, impl="cpp")
    # the NaN survives the 16-bit store; its sample is scaled to zero elsewhere (confined, as in BatchNorm)
    assert torch.isnan(y).sum() == 1 and torch.isnan(y[2, 1, 0, 0]) and not torch.isinf(y).any()


def _float32_probes() -> torch.Tensor:
    """float32 values that exercise every rounding branch of a 16-bit store: every float16 and bfloat16
    value, the exact midpoints between neighbours (ties) and one float32 ulp either side, the overflow and
    subnormal boundaries, signed zeros, infinities, NaN, float32 subnormals and random bit patterns."""
    bits = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16)
    values = []
    for dtype in (torch.float16, torch.bfloat16):
        exact = bits.view(dtype).double()
        exact = exact[torch.isfinite(exact)].sort().values.unique()
        mids = ((exact[1:] + exact[:-1]) / 2).float()  # exactly representable in float32
        values += [exact.float(), mids, torch.nextafter(mids, torch.full_like(mids, math.inf)),
                   torch.nextafter(mids, torch.full_like(mids, -math.inf))]
    special = [0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 65519.996, 65520.0, 65536.0, 2.0**-14, 2.0**-24,
               2.0**-25, 3 * 2.0**-26, 1e-45, -1e-40, 3.4e38]
    randoms = torch.randint(-(2**31), 2**31 - 1, (200000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    values += [torch.tensor(special, dtype=torch.float32), randoms.to(torch.int32).view(torch.float32)]
    return torch.cat(values)


@NO_COMPILER
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cpp_16_bit_conversions_equal_torchs_on_every_pattern(dtype):
    assert cpp.available()
    convert = torch.ops.l2bn_cpu.convert
    patterns = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(dtype)
    probes = _float32_probes()
    for path in ("vector", "scalar"):  # blocks of sixteen through the vector forms; shorter pieces one at a time
        pieces = 1 if path == "vector" else -(-len(patterns) // 15)
        loaded = torch.cat([convert(p, torch.float32) for p in patterns.chunk(pieces)])
        want = patterns.float()
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(loaded), nan)
        assert torch.equal(loaded[~nan].view(torch.int32), want[~nan].view(torch.int32))  # bitwise, signed zeros too
        pieces = 1 if path == "vector" else -(-len(probes) // 15)
        stored, want = torch.cat([convert(p, dtype) for p in probes.chunk(pieces)]), probes.to(dtype)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(stored), nan)
        assert torch.equal(stored[~nan].view(torch.int16), want[~nan].view(torch.int16))


@NO_COMPILER
@pytest.mark.parametrize("shape,fmt", [((3, 5, 7, 11), torch.contiguous_format), ((2, 64, 16, 16), torch.contiguous_format),
                                       ((2, 64, 16, 16), torch.channels_last), ((4, 131), torch.contiguous_format)],
                         ids=["tails", "chunks", "cl", "2d"])
def test_cpp_bfloat16_sample_norms_are_the_float32_ones(shape, fmt):
    """bfloat16 samples' norms are summed as float32 ones are (values widened eight at a time, four vector
    accumulators a chunk): the eval coefficients of a bfloat16 input equal, bit for bit, those of the same values
    in float32 — a widening that dropped, moved or misconverted a lane would change the sums."""
    assert cpp.available()
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(9)) * 3).to(torch.bfloat16)
    x = x.contiguous(memory_format=fmt) if x.dim() == 4 else x
    channels = shape[1]
    stats = (torch.rand(channels, generator=torch.Generator().manual_seed(1)) - 0.5, torch.rand(channels) + 0.5)
    coefficients = torch.ops.l2bn_cpu.l2_batch_norm_coefficients
    half = coefficients(x, None, None, *stats, False, 0.0, 1e-5, 1e-12, True)
    full = coefficients(x.float(), None, None, *stats, False, 0.0, 1e-5, 1e-12, True)
    assert half[0].dtype == torch.float32
    assert torch.equal(half[0], full[0]) and torch.equal(half[1], full[1])


def test_cpp_refuses_other_devices_with_a_pointer():
    x = torch.empty(2, 3, 4, device="meta")
    with pytest.raises(RuntimeError, match="impl='cpp' runs on the CPU, got input on meta"):
        l2_batch_norm(x, None, None, None, None, True, impl="cpp")


def test_build_folder_is_keyed_by_the_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    source = tmp_path / "l2bn_cpu.cpp"
    source.write_text("// one version\n")
    monkeypatch.setattr(cpp, "SOURCE", source)
    first = cpp.build_directory()
    source.write_text("// another version\n")
    second = cpp.build_directory()
    assert first != second and first.parent == second.parent and first.parent.parent == tmp_path
    assert second.name.startswith(f"l2bn_cpu_{cpp.instruction_set()}_")


def test_compiling_is_always_announced(tmp_path, monkeypatch, capsys):
    """Whenever the build folder has no library newer than the source, the loader says it compiles."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    loads = []

    class FakeLoader:
        @staticmethod
        def load(**kwargs):
            loads.append(kwargs["build_directory"])

    monkeypatch.setattr(cpp, "_import_cpp_extension", lambda: FakeLoader)
    assert cpp._build.__wrapped__() is None
    assert f"compiling the CPU kernel into {cpp.build_directory()}" in capsys.readouterr().err
    library = cpp.build_directory() / f"{cpp._extension_name()}.so"
    library.write_bytes(b"")  # a library newer than the source: no message
    assert cpp._build.__wrapped__() is None
    assert capsys.readouterr().err == ""
    assert loads == [str(cpp.build_directory())] * 2


# the numerics tests of the compiled kernel, run again on its build without AVX2 (kept short: the build is ~40 s)
WITHOUT_AVX2 = ("cpp_16_bit or cpp_small_spatial or cpp_layouts or cpp_sample_norms or cpp_channels_last_rows or "
                "bfloat16_sample_norms or conversions_equal or thread_count or long_runs or "
                "(cpp_eval_of_samples and not streamed) or stored_past_the_caches")


@NO_COMPILER
def test_the_kernel_built_without_avx2_passes_the_numerics_tests():
    """Machines without AVX2 (ARM, older x86) build the kernel without it, and that build runs other code: the
    portable loops GCC vectorises for SSE or NEON, 16-bit conversions without F16C, the scalar float16 load. With
    torch's ATEN_CPU_CAPABILITY=default a child process builds and loads that variant (`cpp.instruction_set()`)
    and runs the kernel's numerics tests on it (the 16-bit rounding, small maps, layouts and channel tiles,
    norms, conversions of every 16-bit pattern, channels-last rows, thread counts, eval from cache, outputs
    stored past the caches: four 16-byte vectors a line there)."""
    import subprocess
    import sys

    if cpp.instruction_set() == "default":
        pytest.skip("this machine builds the kernel without AVX2: the whole suite runs that build")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop(IMPL_ENV_VAR, None)
    probe = subprocess.run([sys.executable, "-c", "from l2bn.kernels import cpp; print(cpp.instruction_set())"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert probe.stdout.strip() == "default", probe.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             __file__, "-k", WITHOUT_AVX2], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


@NO_COMPILER
def test_a_clean_cpu_run_prints_nothing():
    import subprocess
    import sys
    from pathlib import Path

    cpp.available()  # built (once) in this process's extension folder
    code = "import torch, l2bn; l2bn.L2BatchNorm2d(3)(torch.randn(2, 3, 4, 4)).sum().backward()"
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == "" and result.stdout == ""


@NO_COMPILER
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "shape, fmt",
    [((6, 37), None), ((700, 3), None), ((5, 4, 3), None), ((5, 37, 1, 1), torch.channels_last),
     ((5, 19, 2, 2), None), ((5, 19, 2, 2), torch.channels_last), ((3, 6, 1, 2, 2), torch.channels_last_3d),
     ((5, 19, 4, 4), None), ((5, 19, 4, 4), torch.channels_last), ((70, 300, 4, 4), None),
     ((70, 300, 4, 4), torch.channels_last), ((70, 200, 4, 4), torch.channels_last),
     ((33, 70, 3, 3), torch.channels_last), ((4, 1100, 2, 2), torch.channels_last), ((6, 5, 16), None)],
    ids=["1d", "1d-many-blocks", "1d-L3", "1x1-cl", "2x2", "2x2-cl", "3d-cl", "4x4", "4x4-cl", "4x4-tiles-groups",
         "4x4-cl-groups-blocks", "4x4-cl-sample-sums-groups-blocks", "3x3-cl-rows-across-samples",
         "2x2-cl-rows-over-a-tile-and-a-chunk", "1d-L16"],
)
def test_cpp_small_spatial_sizes(shape, fmt, training):
    """Spatial sizes ≤ 4 (and training at ≤ 4×4: several groups, cache blocks and position tiles with tails in
    the 70×300×4×4 cases; channels-last rows paired across samples at 3×3 and rows longer than a tile and a
    chunk at C = 1100; channels-last 4×4 backward with per-sample sums in float64 at C = 19 and 200, in float32
    at C = 300) take the channel-vectorised path: every layout against the float64 reference, and
    a float32 channel with a large mean and small spread loses no precision (shifted batch sums)."""
    x = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(3)) * 1.5 - 0.4
    fmt = fmt or torch.contiguous_format
    got = run(IMPLEMENTATIONS["cpp"], x, training, memory_format=fmt)
    assert_close(got, run(l2_batch_norm_reference, x, training), rtol=1e-12, atol=1e-12)
    assert got["dx"].is_contiguous(memory_format=fmt)
    shifted = x.clone()
    shifted[:, 0] = 1e4 + torch.randn(shifted[:, 0].shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    got = run(IMPLEMENTATIONS["cpp"], shifted, training, dtype=torch.float32, memory_format=fmt)
    assert_close(got, run(l2_batch_norm_reference, shifted.float().double(), training), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("shape, fmt", [((4, 3, 4, 4), None), ((4, 3, 4, 4), torch.channels_last),
                                        ((4, 3, 2, 2), None), ((6, 5), None)], ids=["4x4", "4x4-cl", "2x2", "1d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_input_element_gives_the_references_gradients(shape, fmt, training):
    """One NaN input element: every path's outputs and input gradients are NaN exactly where the reference's are
    (the compiled kernel once returned finite gradients for the NaN sample's other channels)."""
    x = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    x[1, 1].view(-1)[0] = float("nan")
    want = run(l2_batch_norm_reference, x, training)
    impls = ["fused", "cpp"] if cpp.compiler_found() else ["fused"]
    for impl in impls:
        got = run(IMPLEMENTATIONS[impl], x, training, memory_format=fmt or torch.contiguous_format)
        for key in ("y", "dx", "dw", "db"):
            assert torch.equal(torch.isnan(got[key]), torch.isnan(want[key])), (impl, key)
            finite = ~torch.isnan(want[key])
            torch.testing.assert_close(got[key][finite], want[key][finite], rtol=1e-9, atol=1e-9)


def test_two_checkouts_sharing_a_cache_compile_the_same_path(tmp_path, monkeypatch):
    """Two copies of the source (two checkouts) and one extensions folder: both builds name the same source
    path in the same folder, so torch's loader (whose build file names the source by path) reuses the first
    checkout's library instead of rebuilding it; the kept copy is not rewritten (its mtime stays)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    loads = []

    class FakeLoader:
        @staticmethod
        def load(**kwargs):
            loads.append((kwargs["build_directory"], kwargs["sources"]))

    monkeypatch.setattr(cpp, "_import_cpp_extension", lambda: FakeLoader)
    mtimes = []
    for checkout in ("a", "b", "a"):
        source = tmp_path / checkout / "csrc" / cpp.SOURCE.name
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(cpp.SOURCE.read_bytes())
        monkeypatch.setattr(cpp, "SOURCE", source)
        assert cpp._build.__wrapped__() is None
        mtimes.append(cpp.source_copy(cpp.build_directory()).stat().st_mtime_ns)
    assert len(set(map(str, loads))) == 1, loads
    folder, sources = loads[0]
    assert Path(sources[0]).parent == Path(folder) and Path(sources[0]).read_bytes() == cpp.SOURCE.read_bytes()
    assert len(set(mtimes)) == 1


def test_without_a_compiler_one_line_and_no_retry(tmp_path):
    """CXX naming no compiler: the fallback warning is one line naming the cause and the fix, and the failure
    is remembered in the cache folder, so a second process does not try to build again."""
    import subprocess
    import sys

    code = ("import warnings, torch, l2bn; warnings.simplefilter('always'); "
            "l2bn.L2BatchNorm2d(3)(torch.randn(2, 3, 4, 4)).sum().backward()")
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
           "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env.pop(IMPL_ENV_VAR, None)
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for result in runs:
        assert result.returncode == 0, result.stderr[-2000:]
        warning = [line for line in result.stderr.splitlines() if "l2bn: no compiled CPU kernel" in line]
        assert len(warning) == 1 and "install a C++ compiler" in warning[0], result.stderr
    assert "compiling the CPU kernel" in runs[0].stderr
    assert "compiling the CPU kernel" not in runs[1].stderr and "remembered in" in runs[1].stderr
    assert len(runs[1].stderr.strip().splitlines()) <= 2, runs[1].stderr  # the warning and its source line
    assert list((tmp_path / "ext").rglob("build-failed-*.txt"))
