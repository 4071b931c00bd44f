"""Implementations of L2BN: the reference composition and the fused paths the functional API dispatches to."""
from .fused import l2_batch_norm_fused
from .reference import l2_batch_norm_reference, l2_normalize_samples

__all__ = ["l2_batch_norm_fused", "l2_batch_norm_reference", "l2_normalize_samples"]
