"""The compiled CPU kernel (``csrc/l2bn_cpu.cpp``): built on first use with torch's C++ extension loader.

The package installs without a compiler; the kernel is compiled (about 30 s, once per machine, Python, torch
and source version, cached under ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, in a folder
named by the source's hash) the first time a CPU tensor asks for it, always with a line on stderr saying so.
Where it cannot be built (no C++ compiler or ninja), ``impl="auto"`` falls back to the
torch-op fused path with one warning, and ``impl="cpp"`` raises with the build error.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .overflow import rerun_rescaled_on_overflow


SOURCE = Path(__file__).with_name("csrc") / "l2bn_cpu.cpp"


def _compile_flags() -> list[str]:
    """-O3 with OpenMP (torch's thread pool), plus AVX2/FMA where torch itself runs its AVX2 kernels.

    The extension name carries the instruction set, so a cache shared by different machines never hands an
    AVX2 build to a CPU without it.
    """
    flags = ["-O3", "-fopenmp"]
    if instruction_set() != "default":
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def instruction_set() -> str:
    """The instruction set the kernel is compiled for here: ``avx2`` where torch runs AVX kernels, else ``default``."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return "avx2" if capability.startswith("avx") else "default"


def build_directory() -> Path:
    """Where the kernel is built: keyed by Python, torch, instruction set and the source's hash, so checkouts
    and environments sharing a cache never rebuild each other's kernel."""
    from torch.utils import cpp_extension

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_compile_flags()).encode()).hexdigest()[:12]
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return root / f"{python}_torch{torch.__version__}" / f"{_extension_name()}_{digest}"


def _extension_name() -> str:
    return f"l2bn_cpu_{instruction_set()}"


def _import_cpp_extension():
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found" log line (this kernel
    is CPU-only; the line would be the only warning of a clean CPU run)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


class BuildFailed(RuntimeError):
    """The kernel did not build here (this process or, remembered in the build folder, an earlier one)."""


def source_copy(build_dir: Path) -> Path:
    """The source compiled for ``build_dir``: a copy kept in that content-keyed folder, written only when its
    content differs, so every checkout sharing the cache compiles the same path and torch's loader (whose
    build file names the source by path) never rebuilds another checkout's kernel."""
    copy = build_dir / SOURCE.name
    text = SOURCE.read_bytes()
    if not copy.exists() or copy.read_bytes() != text:
        partial = copy.with_name(f"{copy.name}.{os.getpid()}.tmp")
        partial.write_bytes(text)
        os.replace(partial, copy)
    return copy


def failure_marker(build_dir: Path) -> Path:
    """Where a failed build is remembered, keyed by the compiler (``$CXX`` resolved on PATH) in a folder keyed
    by source and flags: another compiler, or a changed source, tries again."""
    cxx = os.environ.get("CXX", "c++")
    key = hashlib.sha256(f"{cxx}|{shutil.which(cxx)}".encode()).hexdigest()[:12]
    return build_dir / f"build-failed-{key}.txt"


def _one_line(error: BaseException) -> str:
    """The cause of a failed build in one line (torch's message carries the compiler banner and build log)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() or "not found" in line.lower() or "no such file" in line.lower():
            return line[:300]
    return (lines[0] if lines else type(error).__name__)[:300]


_ON_LOAD: list[Callable[[], None]] = []
_REGISTERED: list[bool] = []  # non-empty once the registrations of on_load ran (the kernel loaded)


def on_load(register: Callable[[], None]) -> None:
    """Have ``register`` run once the kernel is loaded into this process (at once if it already is): Python
    registrations for its operators (fake implementations, autograd formulas) need the operators defined."""
    _ON_LOAD.append(register)
    if _REGISTERED:
        register()


@functools.cache
def _build() -> Exception | None:
    """Compile (when the build folder has no up-to-date library: always said on stderr) and load the
    extension, once per process; the exception if that failed (now or, remembered, in an earlier process
    with the same compiler), else None."""
    try:
        _import_cpp_extension()  # quietly, and inside the try: a failed import is a failed build
        name = _extension_name()
        build_dir = build_directory()
        build_dir.mkdir(parents=True, exist_ok=True)
        marker = failure_marker(build_dir)
        if marker.exists():
            return BuildFailed(f"{marker.read_text().strip()} (remembered in {marker}; delete it to retry)")
        source = source_copy(build_dir)
        library = build_dir / f"{name}.so"
        if not library.exists() or library.stat().st_mtime < source.stat().st_mtime:
            print(f"l2bn: compiling the CPU kernel into {build_dir} (once; about 30 s)", file=sys.stderr)
        _put_ninja_on_path()
        try:
            load_library(name, source, build_dir)
        except Exception as error:  # no compiler, no ninja, a failed build: remembered for later processes
            cause = _one_line(error)
            marker.write_text(cause + "\n")
            return BuildFailed(cause)
    except Exception as error:  # e.g. an unwritable cache folder: the caller decides what to do
        return BuildFailed(_one_line(error))
    return None


def load_library(name: str, source: Path, build_dir: Path) -> None:
    """Compile ``source`` (if its build folder has no up-to-date library) with this machine's flags and load it
    into the process as the operator library ``name``."""
    _import_cpp_extension().load(name=name, sources=[str(source)], build_directory=str(build_dir),
                                 extra_cflags=_compile_flags(), extra_ldflags=["-fopenmp"],
                                 is_python_module=False, verbose=False)


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the pip package's binary is not there when a virtual environment's
    Python is run without activating it, so add its folder (only when no ninja is found)."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def compiler_found() -> bool:
    """Whether a C++ compiler (``$CXX``, else ``c++``) is on the PATH: without one the kernel cannot be built."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def available() -> bool:
    """Whether the compiled CPU kernel is (or can be) loaded in this process."""
    return build_error() is None


# torch.compile asks available() while tracing: called as a constant, not traced (the build's logging would break
# the graph). This is what torch.compiler.assume_constant_result(available) sets (torch/_dynamo/decorators.py,
# checked by tests/test_cpp_custom_op.py), without importing torch._dynamo at l2bn's import as the decorator does.
available._dynamo_marked_constant = True  # type: ignore[attr-defined]


def build_error() -> Exception | None:
    """Why the compiled kernel is unavailable (None when it is available: loaded, and the registrations
    :func:`on_load` holds run once)."""
    error = _build()
    if error is None and not _REGISTERED:
        _REGISTERED.append(True)
        for register in _ON_LOAD:
            register()
    return error


@functools.cache
def warn_unavailable() -> None:
    warnings.warn(
        f"l2bn: no compiled CPU kernel ({build_error()}); using the slower torch-op path — install a C++ "
        "compiler and ninja (pip install ninja), or set L2BN_IMPL=fused to silence this",
        RuntimeWarning,
        stacklevel=3,
    )


@rerun_rescaled_on_overflow
def l2_batch_norm_cpp(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    rescale: bool = True,
    l2_eps: float = 1e-12,
) -> Tensor:
    """Same contract as :func:`l2bn.kernels.reference.l2_batch_norm_reference`, on the compiled CPU kernel."""
    check_on_cpu(input)
    return _operator()(input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps, rescale)


def check_on_cpu(input: Tensor) -> None:
    """The compiled kernel's operators take CPU tensors only: say so, with the way out."""
    if not input.is_cpu:
        raise RuntimeError(f"impl='cpp' runs on the CPU, got input on {input.device}; use impl='auto'")


@functools.cache
def operators():
    """The kernel's operator namespace ``torch.ops.l2bn_cpu`` (built or loaded on first use; raises with the
    build error where it is unavailable)."""
    error = build_error()
    if error is not None:
        raise RuntimeError(f"l2bn's compiled CPU kernel is unavailable: {error}") from error
    return torch.ops.l2bn_cpu


@functools.cache
def _operator() -> torch._ops.OpOverload:
    """The registered ``l2bn_cpu::l2_batch_norm`` (looked up once: attribute lookups cost per call)."""
    return operators().l2_batch_norm.default
