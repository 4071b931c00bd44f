"""The compiled CPU kernel (``csrc/l2bn_cpu.cpp``): built on first use with torch's C++ extension loader.

The package installs without a compiler; the kernel is compiled (about a minute, once per machine and source
version, cached under ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) the first time a CPU
tensor asks for it. Where it cannot be built (no C++ compiler or ninja), ``impl="auto"`` falls back to the
torch-op fused path with one warning, and ``impl="cpp"`` raises with the build error.
"""
from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .reference import l2_batch_norm_reference

SOURCE = Path(__file__).with_name("csrc") / "l2bn_cpu.cpp"


def _compile_flags() -> list[str]:
    """-O3 with OpenMP (torch's thread pool), plus AVX2/FMA where torch itself runs its AVX2 kernels.

    The extension name carries the instruction set, so a cache shared by different machines never hands an
    AVX2 build to a CPU without it.
    """
    flags = ["-O3", "-fopenmp"]
    if _instruction_set() != "default":
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def _instruction_set() -> str:
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return "avx2" if capability.startswith("avx") else "default"


@functools.cache
def _build() -> Exception | None:
    """Compile and load the extension once per process; the exception if that failed, else None."""
    try:
        from torch.utils import cpp_extension

        name = f"l2bn_cpu_{_instruction_set()}"
        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
        build_dir = root / f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}" / name
        build_dir.mkdir(parents=True, exist_ok=True)
        if not (build_dir / f"{name}.so").exists():
            print(f"l2bn: compiling the CPU kernel into {build_dir} (once; about 30 s)", file=sys.stderr)
        _put_ninja_on_path()
        cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            build_directory=str(build_dir),
            extra_cflags=_compile_flags(),
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a failed build: the caller decides what to do
        return error
    return None


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
    return _build() is None


def build_error() -> Exception | None:
    """Why the compiled kernel is unavailable (None when it is available)."""
    return _build()


@functools.cache
def warn_unavailable() -> None:
    warnings.warn(
        f"l2bn: the compiled CPU kernel could not be built ({build_error()}); using the slower torch-op fused "
        "path. Install a C++ compiler and ninja (pip install ninja) to get it, or set L2BN_IMPL=fused to "
        "silence this.",
        RuntimeWarning,
        stacklevel=3,
    )


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
    if input.device.type != "cpu":
        raise RuntimeError(f"impl='cpp' runs on the CPU, got input on {input.device}; use impl='auto'")
    if input.numel() == 0:
        return l2_batch_norm_reference(
            input, running_mean, running_var, weight, bias, training, momentum, eps, rescale=rescale, l2_eps=l2_eps
        )
    return _operator()(input, weight, bias, running_mean, running_var, training, momentum, eps, l2_eps, rescale)


@functools.cache
def _operator() -> torch._ops.OpOverload:
    """The registered ``l2bn_cpu::l2_batch_norm`` (looked up once: attribute lookups cost per call)."""
    error = build_error()
    if error is not None:
        raise RuntimeError(f"l2bn's compiled CPU kernel is unavailable: {error}") from error
    return torch.ops.l2bn_cpu.l2_batch_norm.default
