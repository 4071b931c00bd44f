"""argparse value types shared by the commands: comma-separated lists that refuse empty or repeated entries."""
from __future__ import annotations

import argparse

__all__ = ["cycle_list", "int_list", "str_list"]


def _unique(values: list, text: str) -> list:
    """Reject an empty list (an empty flag must not silently fall back to defaults) and repeated entries."""
    if not values:
        raise argparse.ArgumentTypeError(f"expected a non-empty comma-separated list, got {text!r}")
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"repeated entries {', '.join(repeated)} in {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def int_list(text: str) -> list[int]:
    """Comma-separated distinct integers (seeds, milestones)."""
    return _unique(_ints(text), text)


def cycle_list(text: str) -> list[int]:
    """Comma-separated epoch counts; repeats allowed (cycles of equal length)."""
    values = _ints(text)
    if not values:
        raise argparse.ArgumentTypeError(f"expected a non-empty comma-separated list, got {text!r}")
    return values


def str_list(text: str) -> list[str]:
    """Comma-separated distinct names (norms, study parts)."""
    return _unique([v.strip() for v in text.split(",") if v.strip()], text)
