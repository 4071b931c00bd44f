"""Synchronized L2BN over 2 gloo CPU processes equals one process on the concatenated batch (float64).

All distributed scenarios run in ONE spawn of two workers per path (module fixture, parametrized over the
synchronized op's paths: torch ops, the compiled CPU kernel, the Triton kernels through Triton's interpreter,
and "mixed" — rank 0 on torch ops, rank 1 on the compiled kernel — since every path sends the same float64
sums); each worker writes what it saw to a file and the tests compare those with single-process references
computed here: the library's ``L2BatchNorm*d`` and an independent composition, F.normalize·sqrt(D) followed
by F.batch_norm.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import l2bn
from l2bn.distributed import SyncL2BatchNorm, convert_sync_l2bn, revert_sync_l2bn
from l2bn.layers import L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d

WORLD = 2
DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-11)

# name -> (layer class, per-sample shape (C, *S), per-rank batch sizes, steps, momentum, affine, track stats)
SCENARIOS = {
    "even_2d": (L2BatchNorm2d, (3, 4, 5), (4, 4), 3, 0.1, True, True),
    "uneven_2d": (L2BatchNorm2d, (3, 4, 5), (3, 5), 3, 0.1, True, True),
    "empty_rank_2d": (L2BatchNorm2d, (3, 2, 3), (0, 4), 2, 0.1, True, True),
    "flat_1d": (L2BatchNorm1d, (5,), (3, 4), 3, None, True, True),  # (N, C) input, cumulative average
    "one_sample_1d": (L2BatchNorm1d, (4,), (1, 2), 1, 0.3, True, True),  # 1 value per channel locally
    "seq_1d": (L2BatchNorm1d, (3, 6), (2, 3), 2, 0.1, True, True),
    "vol_3d": (L2BatchNorm3d, (2, 2, 3, 2), (2, 1), 2, 0.1, False, False),  # no affine, batch stats only
}


def _scenario_data(name: str) -> dict[str, torch.Tensor]:
    cls, shape, splits, steps, *_ = SCENARIOS[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    n = sum(splits)
    # a per-sample scale spread over two decades, and a channel offset: l2 normalisation matters
    xs = [
        (torch.randn((n, *shape), generator=g, dtype=DT) + torch.linspace(-1, 2, shape[0], dtype=DT).view(-1, *[1] * (len(shape) - 1)))
        * torch.logspace(-1, 1, n, dtype=DT).view(-1, *[1] * len(shape))
        for _ in range(steps)
    ]
    dys = [torch.randn((n, *shape), generator=g, dtype=DT) for _ in range(steps)]
    weight = 1 + 0.5 * torch.randn(shape[0], generator=g, dtype=DT)
    bias = 0.5 * torch.randn(shape[0], generator=g, dtype=DT)
    return {"x": torch.stack(xs), "dy": torch.stack(dys), "weight": weight, "bias": bias}


def _make_layer(name: str) -> nn.Module:
    cls, shape, _, _, momentum, affine, track = SCENARIOS[name]
    layer = cls(shape[0], momentum=momentum, affine=affine, track_running_stats=track, dtype=DT)
    return layer


def _load_params(layer: nn.Module, data: dict) -> None:
    if layer.affine:
        with torch.no_grad():
            layer.weight.copy_(data["weight"])
            layer.bias.copy_(data["bias"])


def _run_steps(layer: nn.Module, xs: torch.Tensor, dys: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Train-mode forward/backward per step; record outputs, gradients and running statistics."""
    rec: dict[str, list] = {k: [] for k in ("y", "dx", "dw", "db", "rm", "rv", "nbt")}
    for x, dy in zip(xs, dys):
        layer.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        y = layer(x)
        (y * dy).sum().backward()
        rec["y"].append(y.detach())
        rec["dx"].append(x.grad)
        if layer.affine:
            rec["dw"].append(layer.weight.grad.clone())
            rec["db"].append(layer.bias.grad.clone())
        if layer.track_running_stats:
            rec["rm"].append(layer.running_mean.clone())
            rec["rv"].append(layer.running_var.clone())
            rec["nbt"].append(layer.num_batches_tracked.clone())
    return rec


def _small_net() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), L2BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1), L2BatchNorm2d(3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).to(DT)


def _net_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(5, 2, 5, 5, generator=g, dtype=DT), "dy": torch.randn(5, 3, generator=g, dtype=DT)}


def _offset_batch() -> torch.Tensor:
    """(12, 2, 3, 3) float32: channel 0 is 1000 + N(0, 1), channel 1 is N(0, 1)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(12, 2, 3, 3, generator=g)
    x[:, 0] += 1000
    return x


def _huge_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(6, 3, 4, 3) float32 with samples of scale 1e30 (rank 0), 1e20 and 3e38 (rank 1) between normal ones; dy."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(6, 3, 4, 3, generator=g, dtype=DT)
    x[1] *= 1e30
    x[3] *= 1e20
    x[5] *= 3e38 / x[5].abs().max()
    return x.float(), torch.randn(6, 3, 4, 3, generator=g)


PATHS = {"torch-ops": ("fused", "fused"), "cpp": ("cpp", "cpp"), "triton": ("triton", "triton"),
         "mixed": ("fused", "cpp")}  # path -> each rank's $L2BN_IMPL


def _worker(rank: int, root: str, path: str) -> None:
    torch.set_num_threads(1)
    # a fresh process: triton is not imported yet, so its kernels build for the interpreter
    os.environ.update(TRITON_INTERPRET="1", L2BN_IMPL=PATHS[path][rank])
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    out: dict = {}
    for name in SCENARIOS:
        data = torch.load(f"{root}/{name}.pt")
        splits = SCENARIOS[name][2]
        lo, hi = sum(splits[:rank]), sum(splits[: rank + 1])
        layer = _make_layer(name)
        _load_params(layer, data)
        layer = convert_sync_l2bn(layer)
        assert isinstance(layer, SyncL2BatchNorm)
        xs = data["x"][:, lo:hi]
        if name == "uneven_2d":  # channels_last input on one rank: layout must not matter
            xs = torch.stack([x.contiguous(memory_format=torch.channels_last) for x in xs]) if rank else xs
        out[name] = _run_steps(layer, xs, data["dy"][:, lo:hi])

    # float32 with a channel whose mean dwarfs its spread: the pooled variance must not cancel
    x32 = torch.load(f"{root}/offset.pt")[rank * 6 : (rank + 1) * 6]
    out["offset_f32"] = SyncL2BatchNorm(2, eps=1e-12)(x32).detach()

    # huge finite samples (1e30, 1e20, 3e38) on both ranks: rescaled locally, before the collectives
    xh, dyh = torch.load(f"{root}/huge.pt")
    lo, hi = (0, 2) if rank == 0 else (2, 6)
    layer = SyncL2BatchNorm(3)
    xr = xh[lo:hi].clone().requires_grad_(True)
    yh = layer(xr)
    yh.backward(dyh[lo:hi])
    out["huge"] = (yh.detach(), xr.grad, layer.running_mean.clone(), layer.running_var.clone())

    # bfloat16 input, float32 parameters (autocast-style): statistics accumulate in float32
    data = torch.load(f"{root}/uneven_2d.pt")
    lo, hi = (0, 3) if rank == 0 else (3, 8)
    layer = SyncL2BatchNorm(3)
    _load_params(layer, {k: v.float() for k, v in data.items()})
    xb = data["x"][0, lo:hi].bfloat16().requires_grad_(True)
    yb = layer(xb)
    (yb * data["dy"][0, lo:hi].bfloat16()).sum().backward()
    out["bf16"] = (yb.detach(), xb.grad, layer.weight.grad, layer.running_var.clone())

    # collectives per forward and per backward, on the plain layer
    counts = {"all_reduce": 0, "all_gather": 0, "all_gather_into_tensor": 0, "broadcast": 0}
    originals = {k: getattr(dist, k) for k in counts}

    def counting(kind):
        def wrapped(*args, **kwargs):
            counts[kind] += 1
            return originals[kind](*args, **kwargs)
        return wrapped

    layer = SyncL2BatchNorm(3, dtype=DT)
    x = torch.randn(3 + rank, 3, 4, 4, dtype=DT, requires_grad=True)
    for k in counts:
        setattr(dist, k, counting(k))
    try:
        y = layer(x)
        out["count_forward"] = dict(counts)
        y.square().sum().backward()
        out["count_total"] = dict(counts)
        layer.eval()
        layer(x)
        out["count_after_eval"] = dict(counts)
    finally:
        for k, f in originals.items():
            setattr(dist, k, f)

    # a group of one rank: no synchronisation, exactly the local L2BN
    groups = [dist.new_group([r]) for r in range(WORLD)]
    local = SyncL2BatchNorm(3, process_group=groups[rank], dtype=DT)
    xl = torch.randn(4, 3, 2, 2, dtype=DT, generator=torch.Generator().manual_seed(rank))
    plain = L2BatchNorm2d(3, dtype=DT)  # the local layer on the same path
    out["single_group"] = (local(xl).detach(), local.running_var.clone(), plain(xl).detach(), plain.running_var)

    # every rank empty: the same clear error everywhere (no hang)
    try:
        SyncL2BatchNorm(3, dtype=DT)(torch.empty(0, 3, 2, 2, dtype=DT))
        out["empty_error"] = None
    except ValueError as err:
        out["empty_error"] = str(err)

    # a converted network under DDP: parameter gradients are averaged like with nn.SyncBatchNorm
    net = nn.parallel.DistributedDataParallel(convert_sync_l2bn(_small_net()))
    batch = _net_batch()
    splits = (2, 3)
    lo, hi = sum(splits[:rank]), sum(splits[: rank + 1])
    net(batch["x"][lo:hi]).mul(batch["dy"][lo:hi]).sum().backward()
    out["ddp_grads"] = {n: p.grad.clone() for n, p in net.module.named_parameters()}
    out["ddp_buffers"] = {n: b.clone() for n, b in net.module.named_buffers()}
    out["impl"] = PATHS[path][rank]
    out["loaded"] = {m for m in ("triton_sync", "cpp_sync") if f"l2bn.kernels.{m}" in sys.modules}
    torch.save(out, f"{root}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=list(PATHS))
def results(request, tmp_path_factory) -> list[dict]:
    if request.param == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if "cpp" in PATHS[request.param] and not l2bn.kernels.cpp.available():
        pytest.skip(f"no compiled CPU kernel here: {l2bn.kernels.cpp.build_error()}")
    root = tmp_path_factory.mktemp("dist")
    for name in SCENARIOS:
        torch.save(_scenario_data(name), root / f"{name}.pt")
    torch.save(_offset_batch(), root / "offset.pt")
    torch.save(_huge_batch(), root / "huge.pt")
    mp.spawn(_worker, args=(str(root), request.param), nprocs=WORLD, join=True)
    return [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]


def _independent_reference(name: str, data: dict) -> dict[str, list[torch.Tensor]]:
    """F.normalize(x_n)·sqrt(D), then F.batch_norm, on the whole batch — no l2bn code involved."""
    _, shape, _, steps, momentum, affine, track = SCENARIOS[name]
    c = shape[0]
    rm, rv = (torch.zeros(c, dtype=DT), torch.ones(c, dtype=DT)) if track else (None, None)
    rec: dict[str, list] = {k: [] for k in ("y", "dx", "dw", "db", "rm", "rv")}
    for step in range(steps):
        x = data["x"][step].clone().requires_grad_(True)
        w = data["weight"].clone().requires_grad_(True) if affine else None
        b = data["bias"].clone().requires_grad_(True) if affine else None
        d = math.prod(shape)
        xhat = F.normalize(x.flatten(1), dim=1).view_as(x) * math.sqrt(d)
        mom = 1.0 / (step + 1) if momentum is None else momentum
        y = F.batch_norm(xhat, rm, rv, w, b, True, mom, 1e-5)
        (y * data["dy"][step]).sum().backward()
        rec["y"].append(y.detach())
        rec["dx"].append(x.grad)
        if affine:
            rec["dw"].append(w.grad)
            rec["db"].append(b.grad)
        if track:
            rec["rm"].append(rm.clone())
            rec["rv"].append(rv.clone())
    return rec


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sync_equals_single_process(results, name):
    _, _, splits, steps, _, affine, track = SCENARIOS[name]
    data = _scenario_data(name)
    layer = _make_layer(name)
    _load_params(layer, data)
    library = _run_steps(layer, data["x"], data["dy"])
    independent = _independent_reference(name, data)
    ranks = [r[name] for r in results]
    for step in range(steps):
        for key in ("y", "dx"):
            got = torch.cat([r[key][step] for r in ranks])
            torch.testing.assert_close(got, library[key][step], **TOL, msg=f"{name} step {step} {key}")
            torch.testing.assert_close(got, independent[key][step], **TOL, msg=f"{name} step {step} {key}")
        if affine:  # local gradients; their sum is the gradient of the summed loss
            for key in ("dw", "db"):
                got = sum(r[key][step] for r in ranks)
                torch.testing.assert_close(got, library[key][step], **TOL)
                torch.testing.assert_close(got, independent[key][step], **TOL)
            if 0 in splits:
                empty = splits.index(0)
                assert torch.count_nonzero(ranks[empty]["dw"][step]) == 0
        if track:
            for r in ranks:  # every rank holds the same (global) running statistics
                for key in ("rm", "rv"):
                    torch.testing.assert_close(r[key][step], library[key][step], **TOL)
                    torch.testing.assert_close(r[key][step], independent[key][step], **TOL)
                assert int(r["nbt"][step]) == step + 1
        else:
            assert not ranks[0]["rm"] and not ranks[1]["rv"]


def test_each_path_runs_its_own_code(results):
    """Each worker ran its path's synchronized op (the Triton and compiled-kernel modules load on first use)."""
    for r in results:
        assert r["loaded"] == ({f"{r['impl']}_sync"} if r["impl"] in ("triton", "cpp") else set())


def test_one_collective_forward_one_backward_none_in_eval(results):
    for r in results:
        assert r["count_forward"] == {"all_reduce": 1, "all_gather": 0, "all_gather_into_tensor": 0, "broadcast": 0}
        assert r["count_total"] == {"all_reduce": 2, "all_gather": 0, "all_gather_into_tensor": 0, "broadcast": 0}
        assert r["count_after_eval"] == r["count_total"]


def test_group_of_one_rank_is_local_l2bn(results):
    for r in results:
        y, running_var, y_local, running_var_local = r["single_group"]
        torch.testing.assert_close(y, y_local, rtol=0, atol=0)
        torch.testing.assert_close(running_var, running_var_local, rtol=0, atol=0)


def test_all_ranks_empty_raises_everywhere(results):
    for r in results:
        assert r["empty_error"] is not None and "more than 1 value per channel" in r["empty_error"]


def test_converted_net_under_ddp_matches_single_process(results):
    net = _small_net()
    batch = _net_batch()
    net(batch["x"]).mul(batch["dy"]).sum().backward()
    for n, p in net.named_parameters():
        for r in results:  # DDP averages the per-rank gradients of the summed loss
            torch.testing.assert_close(r["ddp_grads"][n] * WORLD, p.grad, **TOL, msg=n)
    for n, b in net.named_buffers():
        for r in results:
            torch.testing.assert_close(r["ddp_buffers"][n], b, **TOL, msg=n)


def test_bfloat16_input_close_to_float64(results):
    data = _scenario_data("uneven_2d")
    rounded = {**data, "x": data["x"].bfloat16().to(DT), "dy": data["dy"].bfloat16().to(DT)}
    ref = _independent_reference("uneven_2d", rounded)  # step 0 is what the workers ran
    ys, dxs, dws, rvs = zip(*(r["bf16"] for r in results))
    assert ys[0].dtype == dxs[0].dtype == torch.bfloat16 and dws[0].dtype == torch.float32
    torch.testing.assert_close(torch.cat(ys).to(DT), ref["y"][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(torch.cat(dxs).to(DT), ref["dx"][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(sum(dws).to(DT), ref["dw"][0], rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(rvs[0].to(DT), ref["rv"][0], rtol=1e-2, atol=1e-3)


def test_huge_samples_are_rescaled_on_each_rank(results):
    """Finite samples whose squares overflow float32, split over the ranks: output, input gradient (relative
    to each sample's r_n) and running statistics of one float64 process on the whole batch."""
    x, dy = _huge_batch()
    xx = x.to(DT).requires_grad_(True)
    rm, rv = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
    y = l2bn.l2_batch_norm(xx, rm, rv, torch.ones(3, dtype=DT), torch.zeros(3, dtype=DT), True, 0.1, 1e-5, impl="reference")
    y.backward(dy.to(DT))
    r = math.sqrt(36) / x.to(DT).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    got_y, got_dx = (torch.cat([res["huge"][i] for res in results]).to(DT) for i in (0, 1))
    assert torch.isfinite(got_y).all() and torch.isfinite(got_dx).all()
    torch.testing.assert_close(got_y, y.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_dx / r, xx.grad / r, rtol=1e-4, atol=1e-4)
    for res in results:
        torch.testing.assert_close(res["huge"][2].to(DT), rm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["huge"][3].to(DT), rv, rtol=1e-5, atol=1e-6)


def test_float32_offset_channel_no_cancellation(results):
    x = _offset_batch().to(DT)
    ref = F.batch_norm(F.normalize(x.flatten(1), dim=1).view_as(x) * math.sqrt(18), None, None, training=True, eps=1e-12)
    got = torch.cat([r["offset_f32"] for r in results]).to(DT)
    # channel 0 of x̂ is ≈ sqrt(2) ± 1e-3: E[x̂²] − E[x̂]² in float32 would be off by several percent
    assert ref[:, 0].std() > 0.9
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-3)


@pytest.mark.parametrize(
    "cls, shape", [(L2BatchNorm1d, (6, 3)), (L2BatchNorm1d, (6, 3, 5)), (L2BatchNorm2d, (6, 3, 4, 4)), (L2BatchNorm3d, (6, 3, 2, 3, 2))]
)
def test_without_process_group_equals_l2bn(cls, shape):
    assert not dist.is_initialized()
    torch.manual_seed(0)
    ref = cls(3, momentum=None, dtype=DT)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    sync = convert_sync_l2bn(cls(3, momentum=None, dtype=DT))
    sync.load_state_dict(ref.state_dict())
    assert isinstance(sync, SyncL2BatchNorm)
    for step in range(2):
        x = torch.randn(shape, dtype=DT) * 3 + 1
        dy = torch.randn(shape, dtype=DT)
        outs = []
        for layer in (ref, sync):
            xi = x.clone().requires_grad_(True)
            layer.zero_grad()
            y = layer(xi)
            (y * dy).sum().backward()
            outs.append((y, xi.grad, layer.weight.grad, layer.bias.grad))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(sync.state_dict(), ref.state_dict(), rtol=0, atol=0)
    ref.eval(), sync.eval()
    x = torch.randn(shape, dtype=DT)
    torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=0)


@pytest.fixture
def one_rank_group():
    """The default process group, of this process alone (gloo), torn down afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("impl", ["cpp", "fused"])
@pytest.mark.parametrize(
    "shape, dtype, channels_last",
    [((6, 8, 2, 2), DT, True), ((6, 8, 5, 5), DT, True), ((5, 3, 4, 4), DT, False), ((4, 3, 2, 3, 2), DT, False),
     ((8, 5), torch.float32, False), ((6, 4, 2, 2), torch.bfloat16, True), ((4, 3, 5, 5), torch.bfloat16, False)],
    ids=str,
)
def test_synced_paths_over_one_rank_equal_the_float64_composition(one_rank_group, impl, shape, dtype, channels_last):
    """The compiled kernel's synchronized operators (small-spatial and general passes, NCHW and channels-last,
    16-bit input with float32 parameters) and the torch ops, against F.normalize·sqrt(D) then F.batch_norm in
    float64: output, input and parameter gradients, running statistics; the output keeps x's memory format."""
    if impl == "cpp" and not l2bn.kernels.cpp.available():
        pytest.skip(f"no compiled CPU kernel here: {l2bn.kernels.cpp.build_error()}")
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[1])
    c = shape[1]
    x64 = torch.randn(shape, generator=g, dtype=DT) * torch.logspace(-1, 1, shape[0], dtype=DT).view(-1, *[1] * (len(shape) - 1))
    dy64 = torch.randn(shape, generator=g, dtype=DT)
    w64, b64 = 1 + 0.5 * torch.randn(c, generator=g, dtype=DT), 0.5 * torch.randn(c, generator=g, dtype=DT)
    param = DT if dtype == DT else torch.float32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x64.to(dtype).contiguous(memory_format=fmt).requires_grad_()
    w, b = w64.to(param).requires_grad_(), b64.to(param).requires_grad_()
    rm, rv = torch.zeros(c, dtype=param), torch.ones(c, dtype=param)
    y = l2bn.distributed.sync_l2_batch_norm(x, rm, rv, w, b, 0.1, 1e-5, one_rank_group, impl=impl)
    y.backward(dy64.to(dtype))
    assert y.dtype == dtype and (not channels_last or y.is_contiguous(memory_format=fmt))

    xr, wr, br = (t.detach().to(DT).requires_grad_() for t in (x, w, b))  # the rounded inputs, in float64
    rm_ref, rv_ref = torch.zeros(c, dtype=DT), torch.ones(c, dtype=DT)
    d = math.prod(shape[1:])
    ref = F.batch_norm(F.normalize(xr.flatten(1), dim=1).view_as(xr) * math.sqrt(d), rm_ref, rv_ref, wr, br, True,
                       0.1, 1e-5)
    ref.backward(dy64.to(dtype).to(DT))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == DT else dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 \
        else dict(rtol=1e-4, atol=1e-4)
    for got, want in [(y, ref), (x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad), (rm, rm_ref), (rv, rv_ref)]:
        torch.testing.assert_close(got.detach().to(DT), want.detach(), **tol)


def test_sync_layer_accepts_any_rank_and_rejects_1d():
    layer = SyncL2BatchNorm(2)
    for shape in [(4, 2), (4, 2, 3), (4, 2, 3, 3), (4, 2, 1, 2, 3), (4, 2, 1, 2, 1, 2)]:
        assert layer(torch.randn(shape)).shape == shape
    with pytest.raises(ValueError, match="at least 2D"):
        layer(torch.randn(4))


def test_convert_round_trip_keeps_state_mode_dtype_and_grad_flags():
    net = nn.Sequential(
        nn.Conv1d(2, 3, 1), L2BatchNorm1d(3, momentum=0.2, eps=1e-3, rescale=False, l2_eps=1e-6),
        nn.Sequential(nn.Conv2d(3, 4, 1), L2BatchNorm2d(4, affine=False)),
        L2BatchNorm3d(5, track_running_stats=False), nn.BatchNorm2d(4),
    ).to(DT)
    with torch.no_grad():
        for buf_owner in (net[1], net[2][1]):
            buf_owner.running_mean.uniform_()
            buf_owner.running_var.uniform_(1, 2)
            buf_owner.num_batches_tracked.fill_(7)
    net[1].weight.requires_grad_(False)
    net[2].eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    weight = net[1].weight

    convert_sync_l2bn(net, process_group=None)
    syncs = [net[1], net[2][1], net[3]]
    assert all(type(m) is SyncL2BatchNorm for m in syncs)
    assert type(net[4]) is nn.BatchNorm2d  # plain BN is not L2BN: left alone
    assert net[1].weight is weight and not net[1].weight.requires_grad  # shared, flag kept
    assert (net[1].momentum, net[1].eps, net[1].rescale, net[1].l2_eps) == (0.2, 1e-3, False, 1e-6)
    assert not net[2][1].training and net[1].training and not net[2][1].affine
    assert net[3].running_mean is None
    assert all(p.dtype == DT for p in net.parameters()) and net[1].running_mean.dtype == DT
    torch.testing.assert_close(net.state_dict(), before, rtol=0, atol=0)

    revert_sync_l2bn(net)
    assert [type(m) for m in (net[1], net[2][1], net[3])] == [L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d]
    assert net[1].weight is weight and net[1].rescale is False and not net[2][1].training
    torch.testing.assert_close(net.state_dict(), before, rtol=0, atol=0)

    root = convert_sync_l2bn(L2BatchNorm2d(3))
    assert type(root) is SyncL2BatchNorm and type(revert_sync_l2bn(root)) is L2BatchNorm2d
    assert type(revert_sync_l2bn(SyncL2BatchNorm(3), default=L2BatchNorm1d)) is L2BatchNorm1d
    with pytest.raises(ValueError, match="default must be one of"):
        revert_sync_l2bn(SyncL2BatchNorm(3), default=nn.BatchNorm2d)


def test_torch_convert_sync_batchnorm_would_drop_l2bn():
    """Why convert_sync_l2bn exists: torch's converter turns L2BN into plain (non-l2) SyncBatchNorm."""
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(L2BatchNorm2d(3)))
    assert type(converted[0]) is nn.SyncBatchNorm
    assert type(convert_sync_l2bn(nn.Sequential(L2BatchNorm2d(3)))[0]) is SyncL2BatchNorm


@pytest.mark.needs_batchnorm_bias
def test_convert_sync_round_trip_keeps_bias_false():
    model = l2bn.convert_sync_l2bn(nn.Sequential(l2bn.L2BatchNorm2d(4, bias=False)))
    assert type(model[0]) is l2bn.SyncL2BatchNorm and model[0].bias is None
    model = l2bn.revert_sync_l2bn(model)
    assert type(model[0]) is l2bn.L2BatchNorm2d and model[0].bias is None


def test_convert_sync_names_l2bn_layers_it_cannot_synchronize():
    class CustomL2BN(l2bn.L2BatchNorm2d):
        pass

    with pytest.warns(UserWarning, match=r"left 1 L2BN layer\(s\) unsynchronized: '1' \(CustomL2BN\)"):
        l2bn.convert_sync_l2bn(nn.Sequential(l2bn.L2BatchNorm2d(4), CustomL2BN(4)))
