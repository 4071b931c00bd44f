"""argparse value types shared by the commands: comma-separated lists that refuse empty or repeated entries,
positive counts and seeds in torch's range."""
from __future__ import annotations

import argparse

__all__ = ["cycle_list", "int_list", "positive_int", "seed", "seed_list", "str_list"]

SEED_MAX = 2**64 - 1  # torch.manual_seed takes unsigned 64-bit seeds


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


def positive_int(text: str) -> int:
    """An integer >= 1 (epochs, an epoch to stop after)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (>= 1), got {value}")
    return value


def _check_seed(value: int) -> int:
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"seed {value} is out of range; accepted: 0 to 2**64 - 1 ({SEED_MAX})")
    return value


def seed(text: str) -> int:
    """One seed, 0 to 2**64 - 1 (what ``torch.manual_seed`` accepts)."""
    try:
        return _check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None


def seed_list(text: str) -> list[int]:
    """Comma-separated distinct seeds, each 0 to 2**64 - 1."""
    return [_check_seed(v) for v in int_list(text)]
