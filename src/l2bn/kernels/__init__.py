"""Implementations of L2BN — the reference composition, the compiled CPU kernel, the torch-op fused path,
the Triton kernels — and the switch (:mod:`l2bn.kernels.dispatch`) that picks one."""
from .dispatch import IMPLEMENTATIONS, impl_name, resolve_impl
from .fused import l2_batch_norm_fused
from .reference import l2_batch_norm_reference, l2_normalize_samples

__all__ = [
    "IMPLEMENTATIONS",
    "impl_name",
    "l2_batch_norm_fused",
    "l2_batch_norm_reference",
    "l2_normalize_samples",
    "resolve_impl",
]
