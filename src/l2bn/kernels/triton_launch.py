"""Launching Triton kernels with less host time a launch than ``kernel[grid](...)``.

Where a GPU finishes the kernels faster than the host launches them (small tensors), a call costs its host time,
and most of that was Triton's ``JITFunction.run``: ~50 µs a launch with ~25 arguments on the first H200 run's host
(``benchmarks/bench_host.py``), 9–11 launches a training call. :func:`launch` keeps the part of it that decides which
compiled variant runs — Triton's own binder, which types every argument and notes its 16-byte divisibility and the
integers equal to 1 — and, once a variant has been launched through Triton's path (which compiles it), calls that
variant's launcher itself: the call ``JITFunction.run`` makes in triton 3.3–3.8, without its per-launch option
handling, cache-key string, launch metadata and hooks. Launch hooks (profilers such as proton) or a kernel's
pre-run hooks send every launch through Triton's path; so does ``L2BN_TRITON_DIRECT_LAUNCH=0``, and any error of
the direct path (another Triton's internals), which then stays off in the process (``DIRECT_LAUNCH_ERROR``).
Interpreted kernels (``TRITON_INTERPRET=1``) always take Triton's path.
"""
from __future__ import annotations

import os
from typing import Any

try:
    import triton
    from triton.runtime import driver
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = driver = None

LAUNCH_ENV_VAR = "L2BN_TRITON_DIRECT_LAUNCH"
_direct = os.environ.get(LAUNCH_ENV_VAR, "1") != "0"
DIRECT_LAUNCH_ERROR: BaseException | None = None  # what turned the direct path off, if anything did
_compiled: dict[tuple, Any] = {}  # (kernel id, device, specialization) -> Triton's compiled kernel


def _hooks() -> tuple[Any, Any]:
    """Triton's launch enter and exit hooks: ``knobs.runtime`` (triton >= 3.4) or ``CompiledKernel``'s (3.3)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    from triton.compiler import CompiledKernel

    return CompiledKernel.launch_enter_hook, CompiledKernel.launch_exit_hook


def _unset(hook: Any) -> bool:
    """No hook: None, or an empty ``HookChain`` (triton >= 3.6)."""
    return hook is None or (isinstance(getattr(hook, "calls", None), list) and not hook.calls)


def _direct_path(kernel: Any) -> bool:
    return _direct and hasattr(kernel, "device_caches") and not getattr(kernel, "pre_run_hooks", ()) and all(map(_unset, _hooks()))


def _turn_off(error: BaseException) -> None:
    global _direct, DIRECT_LAUNCH_ERROR
    _direct, DIRECT_LAUNCH_ERROR = False, error


def binder(kernel: Any, device: int | None = None) -> Any:
    """Triton's binder of ``kernel`` on ``device`` (the current one by default): the function that types the
    arguments and picks the compiled variant, ``device_caches``' last entry in triton 3.3–3.8; None where the
    kernel has none (an interpreted kernel)."""
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        return None
    return caches[driver.active.get_current_device() if device is None else device][-1]


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **constexprs: Any) -> None:
    """``kernel[grid](*args, **constexprs)``, through the variant's launcher once Triton has compiled it."""
    if not _direct_path(kernel):
        kernel[grid](*args, **constexprs)
        return
    try:
        device = driver.active.get_current_device()
        bound, specialization, _ = binder(kernel, device)(*args, **constexprs)
        key = (id(kernel), device, tuple(specialization))
        compiled = _compiled.get(key)
    except Exception as error:  # noqa: BLE001 - another Triton's internals: its own path from now on
        _turn_off(error)
        kernel[grid](*args, **constexprs)
        return
    if compiled is None:  # the variant's first launch: Triton compiles it
        compiled = kernel[grid](*args, **constexprs)
        if compiled is not None:
            _compiled[key] = compiled
        return
    grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
    try:
        compiled.run(grid_x, grid_y, grid_z, driver.active.get_current_stream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *bound.values())
    except Exception as error:  # noqa: BLE001 - refused before launching (its arguments): Triton's path instead
        _turn_off(error)
        kernel[grid](*args, **constexprs)


__all__ = ["DIRECT_LAUNCH_ERROR", "LAUNCH_ENV_VAR", "binder", "launch"]
