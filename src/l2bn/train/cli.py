"""``train``, ``compare`` and ``analyze`` commands: argument parsing and the comparison grid."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..data import DataError, list_datasets
from ..norms import get_norm_layer
from .engine import AMP_DTYPES, NonFiniteLossError, TrainConfig, analyze_checkpoint, is_complete, train
from .recipes import SCHEDULES, Recipe, default_recipe_name, get_recipe, list_recipes

__all__ = ["add_train_command", "add_compare_command", "add_analyze_command", "run_compare", "recipe_from_args"]

# CLI flag dest → Recipe field (every recipe value can be overridden).
_RECIPE_FLAGS = (
    "epochs", "batch_size", "lr", "weight_decay", "schedule", "milestones", "gamma", "warmup_epochs", "momentum",
    "nesterov", "mixup_alpha", "label_smoothing", "metrics_every", "metrics_max_batches",
)


def _unique(values: list, text: str) -> list:
    """Reject an empty list (an empty flag must not silently fall back to defaults) and repeated entries."""
    if not values:
        raise argparse.ArgumentTypeError(f"expected a non-empty comma-separated list, got {text!r}")
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"repeated entries {', '.join(repeated)} in {text!r}")
    return values


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    return _unique(values, text)


def _str_list(text: str) -> list[str]:
    return _unique([v.strip() for v in text.split(",") if v.strip()], text)


def _add_experiment_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment")
    g.add_argument("--dataset", default="digits", help=f"one of {', '.join(list_datasets())} (default: digits)")
    g.add_argument("--model", default="resnet20", help="model name from l2bn.models (default: resnet20)")
    g.add_argument("--placement", default="all",
                   help="where the norm goes, the rest keeping BN (the paper's Table 4): all, classifier, stem, "
                   "stage1, stage2-3, stem+stage1, ... (default: all)")
    g.add_argument("--data-dir", default=None, help="dataset folder (Fashion-MNIST also looks in "
                   "/usr/share/datasets/fashion-mnist)")
    g.add_argument("--download", action="store_true", help="download the dataset with torchvision if missing")
    g.add_argument("--out", default=None, help="output folder")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    r = p.add_argument_group("recipe (default: the paper's preset for dataset and model; every value overridable)")
    r.add_argument("--recipe", default=None, choices=list_recipes(), help="preset name")
    r.add_argument("--epochs", type=int)
    r.add_argument("--batch-size", type=int, help="global batch size (split across DDP ranks)")
    r.add_argument("--lr", type=float)
    r.add_argument("--weight-decay", type=float)
    r.add_argument("--schedule", choices=SCHEDULES)
    r.add_argument("--milestones", type=_int_list, help="epochs of the step schedule, e.g. 150,225")
    r.add_argument("--gamma", type=float, help="step schedule factor")
    r.add_argument("--warmup-epochs", type=int)
    r.add_argument("--momentum", type=float)
    r.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    r.add_argument("--mixup-alpha", type=float)
    r.add_argument("--label-smoothing", type=float)
    r.add_argument("--metrics-every", type=int, help="epochs between angle-metric evaluations")
    r.add_argument("--metrics-max-batches", type=int, help="train batches a rank uses for the class centers")

    e = p.add_argument_group("execution")
    e.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...")
    e.add_argument("--amp", choices=sorted(AMP_DTYPES), default=None, help="autocast dtype")
    e.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    e.add_argument("--compile", action="store_true", help="torch.compile the model")
    e.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    e.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads (torch.set_num_threads); default: 1 for digits on CPU, else torch's default")
    e.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bars (default: when stderr is a terminal)")
    e.add_argument("--sync-bn", action="store_true", help="under DDP, synchronise batch statistics across ranks")
    e.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop (resumably) after this epoch, e.g. for time-limited jobs")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The named (or default) preset with every given recipe flag applied."""
    name = args.recipe or default_recipe_name(args.dataset, args.model)
    return get_recipe(name, **{k: getattr(args, k) for k in _RECIPE_FLAGS})


def _config(args: argparse.Namespace, recipe: Recipe, norm: str, seed: int, out: str) -> TrainConfig:
    threads = args.threads
    if threads is None and args.dataset == "digits" and args.device in ("auto", "cpu") and not torch.cuda.is_available():
        threads = 1  # 8×8 images: nothing to split within an op, and extra threads stall on a busy CPU
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return TrainConfig(
        dataset=args.dataset, model=args.model, norm=norm, seed=seed, out=out, recipe=recipe,
        data_dir=args.data_dir, download=args.download, device=args.device, amp=args.amp,
        channels_last=args.channels_last, compile=args.compile, workers=args.workers, progress=args.progress,
        sync_bn=args.sync_bn, resume=args.resume,
        model_kwargs={} if args.placement == "all" else {"placement": args.placement},
    )


def _fail(exc: BaseException) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------------------- train
def run_train(args: argparse.Namespace) -> int:
    try:
        recipe = recipe_from_args(args)
        suffix = "" if args.placement == "all" else f"-{args.placement}"
        out = args.out or f"runs/{args.dataset}-{args.model}-{args.norm}{suffix}-s{args.seed}"
        summary = train(_config(args, recipe, args.norm, args.seed, out), stop_after=args.stop_after)
    except (DataError, NonFiniteLossError, FileExistsError, ValueError) as exc:
        return _fail(exc)
    if "stopped_after" in summary:
        print(f"stopped after epoch {summary['stopped_after']}; continue with --resume --out {out}")
    else:
        print(f"best test accuracy {summary['best_test_acc']:.2f}% (epoch {summary['best_epoch']}); results in {out}")
    return 0


def add_train_command(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train one model (one norm, one seed)",
                              description="Train one (dataset, model, norm, seed) run with the paper's recipe.")
    _add_experiment_options(p)
    p.add_argument("--norm", default="bn", help="norm layer name from l2bn.norms (default: bn)")
    p.add_argument("--seed", type=int, default=121)
    p.set_defaults(func=run_train)
    return p


# ----------------------------------------------------------------------------------------------- compare
def run_compare(args: argparse.Namespace) -> int:
    """Train every (norm, seed) not finished yet under ``--out/runs/``, then write the report into ``--out``."""
    from .. import report
    from .ddp import cleanup_distributed, setup_distributed

    try:
        recipe = recipe_from_args(args)
        _config(args, recipe, args.norms[0], 0, "")
        for norm in args.norms:  # fail before training anything
            get_norm_layer(norm)
    except ValueError as exc:
        return _fail(exc)
    seeds = args.seeds or list(recipe.seeds)
    suffix = "" if args.placement == "all" else f"-{args.placement}"
    out = Path(args.out or f"runs/compare-{args.dataset}-{args.model}{suffix}")
    env = setup_distributed(args.device)
    start = time.perf_counter()
    try:
        run_dirs = []
        for norm in args.norms:
            for seed in seeds:
                run_dir = out / "runs" / f"{norm}-s{seed}"
                run_dirs.append(run_dir)
                config = _config(args, recipe, norm, seed, str(run_dir))
                if is_complete(run_dir, config):
                    if env.is_main:
                        print(f"skip {run_dir} (complete)", file=sys.stderr)
                    continue
                config.resume = (run_dir / "last.pt").is_file() or (run_dir / "metrics.jsonl").is_file()
                result = train(config, stop_after=args.stop_after)
                if "stopped_after" in result:
                    print(f"stopped after epoch {result['stopped_after']}; run compare again to continue")
                    return 0
        if env.is_main:
            runs = [report.load_run(d) for d in run_dirs]
            title = f"{args.dataset} / {args.model} ({recipe.epochs} epochs, seeds {','.join(map(str, seeds))})"
            paths = report.write_report(runs, out, args.norms, title=title)
            print(paths["markdown"].read_text())
            print(f"report: {', '.join(str(p) for p in paths.values())} "
                  f"({time.perf_counter() - start:.0f}s)")
    except (DataError, NonFiniteLossError, FileExistsError, ValueError) as exc:
        return _fail(exc)
    finally:
        cleanup_distributed(env)
    return 0


def add_compare_command(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare", help="train a grid of norms × seeds and write the paper's table and figures",
        description="Run every (norm, seed), skipping finished runs, then write results.md/.csv and PNG figures. "
                    "With no arguments: BN vs L2BN on digits with ResNet-20, 3 seeds (a few CPU minutes).",
    )
    _add_experiment_options(p)
    p.add_argument("--norms", type=_str_list, default=["bn", "l2bn"], help="comma-separated (default: bn,l2bn)")
    p.add_argument("--seeds", type=_int_list, default=None, help="comma-separated (default: the recipe's seeds)")
    p.set_defaults(func=run_compare)
    return p


# ----------------------------------------------------------------------------------------------- analyze
def run_analyze(args: argparse.Namespace) -> int:
    try:
        result = analyze_checkpoint(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
                                    device=args.device, max_batches=args.metrics_max_batches)
    except (DataError, FileNotFoundError, ValueError) as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['checkpoint']} (epoch {result['epoch']}, {result['model']}, {result['norm']}) "
              f"on {result['dataset']}:")
        for key in ("test_acc", "test_loss", "intra_train", "intra_test", "inter", "iir_train", "iir_test"):
            print(f"  {key:12s} {result[key]:.4f}")
    return 0


def add_analyze_command(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("analyze", help="accuracy and angle metrics of a saved checkpoint",
                              description="Test accuracy, intra/inter-class angles and IIR of a checkpoint.")
    p.add_argument("checkpoint", help="last.pt or best.pt of a run")
    p.add_argument("--dataset", default=None, help="default: the dataset it was trained on")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--metrics-max-batches", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_analyze)
    return p

