"""Compile every Triton kernel of l2bn for Hopper (sm_90) and Ampere (sm_80, bfloat16) GPUs without one:
Triton's ahead-of-time path (``triton.compile`` of an ``ASTSource``) runs its whole pipeline down to ptxas'
cubin on the CPU. Run by tests/test_triton.py in a fresh process (the test process decorates the kernels
for the interpreter).

    python tests/triton_cuda_compile.py [--all]   # one line per compiled variant; exit status 1 on any failure

The variants are the launches' own: each pointer typed by what the wrappers pass (the input's dtype for the
big tensors and parameters, the compute dtype for coefficients, float64 for statistics), integer arguments
as i32 — and as the constant 1 that Triton substitutes for an integer argument equal to 1 — and each flag.
"""
from __future__ import annotations

import itertools
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import l2bn.kernels.triton_l2bn as tk

HOPPER, AMPERE = GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)
INPUT_POINTERS = {"x_ptr", "dy_ptr", "out_ptr", "u_ptr", "v_ptr", "weight_ptr", "bias_ptr", "rmean_ptr", "rvar_ptr",
                  "grad_weight_ptr", "grad_bias_ptr"}
COMPUTE_POINTERS = {"a_ptr", "shift_ptr", "dy_coef_ptr", "x_coef_ptr", "factor_ptr", "p_ptr", "q_ptr", "r_ptr",
                    "vf_ptr"}
BLOCKS = {"BLOCK_C": 32, "BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_P": 16}


def signature(kernel, dtype: str, flags: dict, ones: set[str]) -> tuple[dict, dict]:
    """(signature, constexprs) of one launch of ``kernel`` with input ``dtype``."""
    compute = "fp64" if dtype == "fp64" else "fp32"
    sig, constants = {}, {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
            constants[name] = BLOCKS[name] if name in BLOCKS else flags[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + (dtype if name in INPUT_POINTERS else compute if name in COMPUTE_POINTERS else "fp64")
        elif param.annotation_type:
            sig[name] = param.annotation_type
        elif name in ones:
            sig[name] = "constexpr"
            constants[name] = 1
        else:
            sig[name] = "i32"
    return sig, constants


def variants(run_all: bool):
    """(kernel, target, input dtype, flags, integer arguments set to 1). By default float32 on sm_90 with all
    flags on, all off and each off alone, then bfloat16 on sm_90 and sm_80 with all on; ``run_all``: every
    combination of flags for each dtype on sm_90, and bfloat16 on sm_80."""
    kernels = [getattr(tk, name) for name in sorted(vars(tk)) if name.endswith("_kernel")]
    for kernel in kernels:
        flags = [p.name for p in kernel.params if p.is_constexpr and p.name not in BLOCKS]
        ints = {p.name for p in kernel.params if not p.is_constexpr and not p.name.endswith("_ptr")
                and not p.annotation_type}
        every = list(itertools.product([True, False], repeat=len(flags)))
        some = sorted({(True,) * len(flags), (False,) * len(flags),
                       *(tuple(i != j for j in range(len(flags))) for i in range(len(flags)))})
        if run_all:
            runs = [(HOPPER, d, every) for d in ("fp32", "bf16", "fp16", "fp64")] + [(AMPERE, "bf16", every)]
        else:
            runs = [(HOPPER, "fp32", some), (HOPPER, "bf16", [(True,) * len(flags)]),
                    (AMPERE, "bf16", [(True,) * len(flags)])]
        for target, dtype, combos in runs:
            for combo in combos:
                yield kernel, target, dtype, dict(zip(flags, combo)), set()
        if ints:
            yield kernel, HOPPER, "fp32", dict.fromkeys(flags, True), ints


def main() -> int:
    run_all = "--all" in sys.argv[1:]
    failures = 0
    for kernel, target, dtype, flags, ones in variants(run_all):
        sig, constants = signature(kernel, dtype, flags, ones)
        label = f"{kernel.fn.__name__} sm_{target.arch} {dtype} {flags} ones={sorted(ones)}"
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constants), target=target)
            assert "cubin" in compiled.asm, "no cubin"
        except Exception as error:  # report every variant, then fail
            failures += 1
            print(f"FAILED {label}: {type(error).__name__}: {str(error).strip()[:2000]}", flush=True)
        else:
            print(f"ok {label} ({time.perf_counter() - start:.1f} s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
