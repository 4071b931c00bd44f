"""l2bn.kernels.triton_launch: which launches take Triton's path and which the compiled variant's launcher.

A compiled kernel needs a GPU, so these tests stand a recording double in for Triton's JITFunction (the parts
``launch`` uses: ``device_caches``' binder, ``kernel[grid](...)``, the compiled kernel's ``run``) and for its
driver; the real kernels go through ``launch`` in tests/test_triton.py (Triton's path, interpreted, on the CPU;
the direct path on a GPU).
"""
from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

pytest.importorskip("triton")
from l2bn.kernels import triton_launch  # noqa: E402


class Compiled:
    def __init__(self, log: list) -> None:
        self.log, self.function, self.packed_metadata = log, "function", "metadata"

    def run(self, *args) -> None:
        self.log.append(("direct", args))


class Kernel:
    """A JITFunction double: its binder types each argument (the specialization) as Triton's does, in spirit."""

    def __init__(self) -> None:
        self.log: list = []
        self.pre_run_hooks: list = []
        self.device_caches = {0: (None, None, None, None, self.bind)}

    def bind(self, *args, **constexprs):
        bound = dict(enumerate(args)) | constexprs
        spec = [(type(a).__name__, a == 1 if isinstance(a, int) else None) for a in args] + sorted(constexprs.items())
        return bound, spec, {}

    def __getitem__(self, grid):
        def run(*args, **constexprs):
            self.log.append(("triton", grid, args, constexprs))
            return Compiled(self.log)
        return run


@pytest.fixture
def kernel(monkeypatch) -> Kernel:
    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 1234)
    monkeypatch.setattr(triton_launch, "driver", types.SimpleNamespace(active=active))
    monkeypatch.setattr(triton_launch, "_direct", True)
    monkeypatch.setattr(triton_launch, "_compiled", {})
    monkeypatch.setattr(triton_launch, "DIRECT_LAUNCH_ERROR", None)
    return Kernel()


def test_first_launch_of_a_variant_through_triton_then_its_launcher(kernel):
    triton_launch.launch(kernel, (3, 2), "x", 5, BLOCK=4)
    triton_launch.launch(kernel, (7,), "y", 6, BLOCK=4)  # the same variant: launched directly
    triton_launch.launch(kernel, (3, 2), "x", 1, BLOCK=4)  # an argument equal to 1: another variant
    triton_launch.launch(kernel, (3, 2), "x", 5, BLOCK=8)  # another constexpr: another variant
    triton_launch.launch(kernel, (3, 2, 4), "z", 9, BLOCK=8)
    assert [entry[0] for entry in kernel.log] == ["triton", "direct", "triton", "triton", "direct"]
    # the launcher gets the grid padded to three axes, the stream, the compiled function and metadata, no launch
    # metadata or hooks, then every bound argument in order, constexprs included (as JITFunction.run passes them)
    assert kernel.log[1][1] == (7, 1, 1, 1234, "function", "metadata", None, None, None, "y", 6, 4)
    assert kernel.log[4][1] == (3, 2, 4, 1234, "function", "metadata", None, None, None, "z", 9, 8)
    assert triton_launch.DIRECT_LAUNCH_ERROR is None


def test_hooks_and_the_switch_keep_triton_s_path(kernel, monkeypatch):
    triton_launch.launch(kernel, (1,), "x", 5)
    kernel.pre_run_hooks.append(lambda *args, **kwargs: None)
    triton_launch.launch(kernel, (1,), "x", 5)
    kernel.pre_run_hooks.clear()
    monkeypatch.setattr(triton_launch, "_hooks", lambda: (print, None))  # a profiler's launch hook
    triton_launch.launch(kernel, (1,), "x", 5)
    monkeypatch.setattr(triton_launch, "_hooks", lambda: (None, None))
    monkeypatch.setattr(triton_launch, "_direct", False)  # L2BN_TRITON_DIRECT_LAUNCH=0
    triton_launch.launch(kernel, (1,), "x", 5)
    assert len(triton_launch._compiled) == 1  # compiled by the first launch, but not launched directly since
    assert [entry[0] for entry in kernel.log] == ["triton"] * 4


def test_an_error_of_the_direct_path_turns_it_off_and_launches_once(kernel, monkeypatch):
    triton_launch.launch(kernel, (1,), "x", 5)

    def refuse(*args):
        raise TypeError("function takes exactly 12 arguments")  # another Triton's launcher signature

    monkeypatch.setattr(Compiled, "run", refuse)
    triton_launch.launch(kernel, (2,), "x", 5)
    assert isinstance(triton_launch.DIRECT_LAUNCH_ERROR, TypeError)
    triton_launch.launch(kernel, (3,), "x", 5)
    assert [(entry[0], entry[1]) for entry in kernel.log] == [("triton", (1,)), ("triton", (2,)), ("triton", (3,))]


def test_a_binder_of_another_shape_turns_it_off(kernel):
    kernel.device_caches = {0: (None, None, None, None, lambda *args, **kwargs: ("two", "values"))}
    triton_launch.launch(kernel, (1,), "x", 5)
    assert isinstance(triton_launch.DIRECT_LAUNCH_ERROR, ValueError)
    assert [entry[0] for entry in kernel.log] == ["triton"]


def test_binder_is_the_device_caches_last_entry_for_the_current_device(kernel):
    """The binder ``launch`` calls and bench_host.py times: the current device's by default, None without any."""
    kernel.device_caches[1] = (None, None, None, None, print)
    assert triton_launch.binder(kernel) == kernel.bind and triton_launch.binder(kernel, 1) is print
    del kernel.device_caches
    assert triton_launch.binder(kernel) is None


def test_hook_chains_count_as_unset_when_empty():
    chain = types.SimpleNamespace(calls=[])
    assert triton_launch._unset(None) and triton_launch._unset(chain)
    chain.calls.append(print)
    assert not triton_launch._unset(chain) and not triton_launch._unset(print)


def test_interpreted_kernels_take_triton_s_path(kernel):
    del kernel.device_caches  # an InterpretedFunction has none
    triton_launch.launch(kernel, (1,), "x", 5)
    assert [entry[0] for entry in kernel.log] == ["triton"]


def test_the_installed_triton_has_no_hook_set_and_the_switch_is_read_at_import():
    assert all(map(triton_launch._unset, triton_launch._hooks()))
    code = "from l2bn.kernels import triton_launch; print(triton_launch._direct)"
    env = {**os.environ, triton_launch.LAUNCH_ENV_VAR: "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
