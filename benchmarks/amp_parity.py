"""What a precision change costs in results: two sets of finished runs that differ only in it, compared per norm.

    python benchmarks/amp_parity.py docs/results/smallbatch/b128/runs docs/results/amp/b128/runs

Each folder holds ``<norm>-s<seed>/`` run folders (a study grid's or ``python -m l2bn compare``'s). For every norm
present in both, prints the test accuracy at the validation-selected epoch and the final model's angles (intra,
inter, IIR on the training subset), the difference second − first with its 95 % t-interval (paired by seed when
both sets ran the same seeds: the same initialisation and batch order), the p-value and the smallest difference
detectable at 80 % power (``l2bn.studies.stats``), and the training images/s from the runs' timing. The runs'
configurations must agree on everything but ``amp``; a mismatch is an error, so the comparison isolates it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from l2bn.studies.stats import compare_groups, paired_seeds  # noqa: E402

METRICS = {"selected test acc (%)": ("selected_test_acc",), "intra train (°)": ("final", "intra_train"),
           "inter (°)": ("final", "inter"), "IIR train": ("final", "iir_train")}
IGNORED = ("amp", "out", "seed", "threads", "progress", "resume", "recipe.seeds")  # may differ between the sets


def load_runs(folder: Path) -> dict[str, dict[int, dict]]:
    """{norm: {seed: summary}} of the finished runs under ``folder``."""
    runs: dict[str, dict[int, dict]] = {}
    for summary_file in sorted(folder.glob("*/summary.json")):
        summary = json.loads(summary_file.read_text())
        timing = summary_file.with_name("timing.jsonl")
        rates = [json.loads(line)["train_images_per_second"] for line in timing.read_text().splitlines()] \
            if timing.is_file() else []
        summary["images_per_second"] = statistics.median(rates) if rates else float("nan")
        config = summary["config"]
        runs.setdefault(config["norm"], {})[config["seed"]] = summary
    return runs


def _value(summary: dict, path: tuple[str, ...]) -> float:
    for key in path:
        summary = summary[key]
    return float(summary)


def _flat(config: dict, prefix: str = "") -> dict:
    """``{"recipe": {"lr": 0.1}}`` as ``{"recipe.lr": 0.1}``."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_same_experiment(a: dict, b: dict, ignored: tuple[str, ...] = IGNORED) -> None:
    """ValueError unless two runs' configurations agree outside ``ignored`` (dotted keys for nested ones)."""
    a, b = _flat(a), _flat(b)
    differing = sorted(k for k in set(a) | set(b) if k not in ignored and a.get(k) != b.get(k))
    if differing:
        raise ValueError(f"the two run sets differ in more than the precision: {differing}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", type=Path, help="run folders of the reference set (e.g. float32)")
    p.add_argument("second", type=Path, help="run folders of the changed set (e.g. --amp bf16)")
    p.add_argument("--ignore", nargs="*", default=[], help="further config keys that may differ (dotted: "
                   "recipe.metrics_max_batches), each a choice that does not change the records")
    args = p.parse_args(argv)
    first, second = load_runs(args.first), load_runs(args.second)
    norms = [n for n in first if n in second]
    if not norms:
        raise SystemExit(f"no norm has finished runs in both {args.first} and {args.second}")
    print("| norm | metric | first | second | second − first | 95 % interval | p | detectable (80 %) | n |")
    print("|---|---|---:|---:|---:|---|---:|---:|---|")
    for norm in norms:
        a_runs, b_runs = first[norm], second[norm]
        check_same_experiment(next(iter(a_runs.values()))["config"], next(iter(b_runs.values()))["config"],
                              IGNORED + tuple(args.ignore))
        for label, path in METRICS.items():
            a, b, paired = paired_seeds({s: _value(r, path) for s, r in a_runs.items()},
                                        {s: _value(r, path) for s, r in b_runs.items()})
            d = compare_groups(b, a, paired=paired)
            print(f"| {norm} | {label} | {d.mean_b:.3f} | {d.mean_a:.3f} | {d.diff:+.3f} | "
                  f"[{d.low:+.3f}, {d.high:+.3f}] | {d.p:.2f} | ±{d.detectable:.3f} | "
                  f"{len(a)}+{len(b)}{' paired' if paired else ''} |")
        rate_a = statistics.median(r["images_per_second"] for r in a_runs.values())
        rate_b = statistics.median(r["images_per_second"] for r in b_runs.values())
        print(f"| {norm} | training images/s (median) | {rate_a:.0f} | {rate_b:.0f} | ×{rate_b / rate_a:.2f} | | | | |")
    print("\nimages/s: the median epoch of each run's timing.jsonl — a speed comparison only where both sets ran "
          "under the same load (time it side by side otherwise: docs/performance.md).")


if __name__ == "__main__":
    main()
