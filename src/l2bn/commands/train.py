"""``l2bn train``, ``l2bn compare`` and ``l2bn analyze``: flags → :class:`~l2bn.train.TrainConfig`, then the
library (:func:`~l2bn.train.train`, :func:`~l2bn.train.compare`, :func:`~l2bn.train.analyze_checkpoint`)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..cli import INTERRUPTED
from ..data import list_datasets
from ..train.analyze import analyze_checkpoint
from ..train.config import AMP_DTYPES, AUGMENT_MODES, TrainConfig
from ..train.ddp import check_device
from ..train.engine import train
from ..train.grid import compare
from ..train.recipes import SCHEDULES, WEIGHT_DECAY_SCOPES, Recipe, default_recipe_name, get_recipe, list_recipes
from ..train.rundir import ANGLE_KEYS
from ._args import cycle_list, int_list, positive_int, seed, seed_list, str_list
from ._executor import add_executor_options, executor_from_args, print_submitted

__all__ = ["add_command", "default_jobs", "config_from_args", "recipe_from_args"]



def default_jobs(device: str) -> int:
    """compare's --jobs default: one run per GPU on CUDA; on the CPU two (measured fastest on 2 cores:
    the digits grid 43 s against 70 s with one job, docs/performance.md), or one on a single core."""
    if check_device(device).type == "cuda":
        return torch.cuda.device_count()
    return min(2, os.cpu_count() or 1)
# CLI flag dest → Recipe field (every recipe value can be overridden).
_RECIPE_FLAGS = (
    "epochs", "batch_size", "lr", "weight_decay", "schedule", "milestones", "gamma", "warmup_epochs", "momentum",
    "nesterov", "mixup_alpha", "label_smoothing", "metrics_every", "metrics_max_batches", "restart_cycles", "min_lr",
    "weight_decay_scope", "mixup_per_sample", "spec_masks", "norm_spread",
)


def _add_experiment_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment")
    g.add_argument("--dataset", default="digits", help=f"one of {', '.join(list_datasets())} (default: digits)")
    g.add_argument("--model", default="resnet20", help="model name from l2bn.models (default: resnet20)")
    g.add_argument("--placement", default="all",
                   help="where the norm goes, the rest keeping BN (the paper's Table 4): all, classifier, stem, "
                   "stage1, stage2-3, stem+stage1, ... (default: all)")
    g.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on a stratified N-sample subset of the training set (fixed seed, the same for "
                   "every run; part of the experiment's identity)")
    g.add_argument("--val-size", type=int, default=None, metavar="N",
                   help="hold out a stratified N-sample validation split of the training set (fixed seed) and select "
                   "the reported epoch on it, not on the test set (part of the identity)")
    g.add_argument("--imbalance", type=float, default=None, metavar="R",
                   help="long-tailed training set: class c keeps n_max·R^(-c/(C-1)) images (Cao et al. 2019; part "
                   "of the identity)")
    g.add_argument("--label-noise", type=float, default=0.0, metavar="P",
                   help="flip a share P of the training labels to a uniformly drawn other class (fixed seed; part "
                   "of the identity)")
    g.add_argument("--data-dir", default=None, help="dataset folder (without it, Fashion-MNIST also looks in "
                   "/usr/share/datasets/fashion-mnist)")
    g.add_argument("--download", action="store_true", help="download the dataset with torchvision if missing")
    g.add_argument("--out", default=None, help="output folder")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                   "(compare always resumes unfinished runs)")
    _add_recipe_options(p)
    _add_execution_options(p)


def _add_recipe_options(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("recipe (default: the paper's preset for dataset and model family; every value "
                             "overridable)")
    r.add_argument("--recipe", default=None, choices=list_recipes(), help="preset name")
    r.add_argument("--epochs", type=int)
    r.add_argument("--batch-size", type=int, help="global batch size (split across DDP ranks)")
    r.add_argument("--lr", type=float)
    r.add_argument("--weight-decay", type=float)
    r.add_argument("--schedule", choices=SCHEDULES)
    r.add_argument("--milestones", type=int_list, help="epochs of the step schedule, e.g. 150,225")
    r.add_argument("--gamma", type=float, help="step schedule factor")
    r.add_argument("--warmup-epochs", type=int)
    r.add_argument("--momentum", type=float)
    r.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    r.add_argument("--mixup-alpha", type=float)
    r.add_argument("--label-smoothing", type=float)
    r.add_argument("--metrics-every", type=int, help="epochs between angle-metric evaluations")
    r.add_argument("--metrics-max-batches", type=int, help="train batches a rank uses for the class centers")
    r.add_argument("--restart-cycles", type=cycle_list, help="epochs of each cosine-restarts cycle, e.g. 2,4,8")
    r.add_argument("--min-lr", type=float, help="floor of the cosine-restarts schedule")
    r.add_argument("--weight-decay-scope", choices=WEIGHT_DECAY_SCOPES, help="all parameters or conv weights only")
    r.add_argument("--mixup-per-sample", action=argparse.BooleanOptionalAction, default=None,
                   help="one mixup λ per sample instead of per batch")
    r.add_argument("--spec-masks", action=argparse.BooleanOptionalAction, default=None,
                   help="frequency and time masks on the training spectrograms (tau2020)")
    r.add_argument("--norm-spread", action=argparse.BooleanOptionalAction, default=None,
                   help="log norm_cv: the spread of the per-sample input norms of every norm layer (l2bn.norm_spread)")


def _add_execution_options(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("execution")
    e.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...")
    e.add_argument("--amp", choices=sorted(AMP_DTYPES), default=None, help="autocast dtype")
    e.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    e.add_argument("--compile", action="store_true", help="torch.compile the model")
    e.add_argument("--augment", choices=AUGMENT_MODES, default="per-sample",
                   help="per-sample: torchvision transforms in the DataLoader; batched: crop/flip whole batches with "
                   "tensor ops (in-memory image sets; other draws, same distribution; part of the experiment)")
    e.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (training: started each epoch, seeded from it)")
    e.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads (torch.set_num_threads); default: 1 for digits on CPU, else torch's "
                   "default (compare --jobs N splits them between the jobs)")
    e.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bars (default: when stderr is a terminal)")
    e.add_argument("--sync-bn", action="store_true", help="under DDP, synchronise batch statistics across ranks")
    e.add_argument("--stop-after", type=positive_int, default=None, metavar="EPOCH",
                   help="stop (resumably) after this epoch, e.g. for time-limited jobs")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The named (or default) preset with every given recipe flag applied."""
    name = args.recipe or default_recipe_name(args.dataset, args.model)
    return get_recipe(name, **{k: getattr(args, k) for k in _RECIPE_FLAGS})


def config_from_args(args: argparse.Namespace, norm: str, seed: int, out: str) -> TrainConfig:
    """The :class:`TrainConfig` the flags describe (digits on a CPU defaults to one thread: 8×8 images leave
    nothing to split within an op, and extra threads stall on a busy CPU)."""
    threads = args.threads
    if threads is None and args.dataset == "digits" and args.device in ("auto", "cpu") and not torch.cuda.is_available():
        threads = 1
    return TrainConfig(
        dataset=args.dataset, model=args.model, norm=norm, seed=seed, out=out, recipe=recipe_from_args(args),
        placement=args.placement, train_subset=args.train_subset, data_dir=args.data_dir, download=args.download,
        device=args.device, amp=args.amp, channels_last=args.channels_last, compile=args.compile, augment=args.augment,
        workers=args.workers, threads=threads, progress=args.progress, sync_bn=args.sync_bn,
        resume=args.resume, val_size=args.val_size, imbalance=args.imbalance, label_noise=args.label_noise,
    )


def _out_suffix(args: argparse.Namespace) -> str:
    placement = "" if args.placement == "all" else f"-{args.placement}"
    return placement + (f"-sub{args.train_subset}" if args.train_subset is not None else "")


# ------------------------------------------------------------------------------------------------- train
def run_train(args: argparse.Namespace) -> int:
    out = args.out or f"runs/{args.dataset}-{args.model}-{args.norm}{_out_suffix(args)}-s{args.seed}"
    config = config_from_args(args, args.norm, args.seed, out)
    try:
        summary = train(config, stop_after=args.stop_after)
    except KeyboardInterrupt:
        print(f"interrupted; {out} keeps its last finished epoch: continue with the same command plus "
              f"--resume --out {out}", file=sys.stderr)
        return INTERRUPTED
    if "stopped_after" in summary:
        print(f"stopped after epoch {summary['stopped_after']}; continue with --resume --out {out}")
    else:
        print(f"best test accuracy {summary['best_test_acc']:.2f}% (epoch {summary['best_epoch']}); results in {out}")
    return 0


# ----------------------------------------------------------------------------------------------- compare
def run_compare(args: argparse.Namespace) -> int:
    """Adapter over :func:`l2bn.train.compare`: the grid of ``--norms`` × ``--seeds``, then the report."""
    out = args.out or f"runs/compare-{args.dataset}-{args.model}{_out_suffix(args)}"
    config = config_from_args(args, args.norms[0], 0, out)
    try:
        jobs = args.jobs if args.jobs is not None else default_jobs(args.device)
        result = compare(config, args.norms, args.seeds, out, jobs=jobs, retry_failed=args.retry_failed,
                         stop_after=args.stop_after, executor=executor_from_args(args))
    except KeyboardInterrupt:
        print("interrupted; run the same compare command again to continue (finished epochs and runs are kept)",
              file=sys.stderr)
        return INTERRUPTED
    if result.submitted:
        print_submitted(result.submitted, "run the same compare command again to write the report")
    elif result.stopped:
        print("stopped after epoch {}; run compare again to continue".format(args.stop_after))
    elif result.busy:
        print(f"{len(result.busy)} run(s) are being trained by another process; the report is written once they "
              "finish (run compare again then)")
    else:
        print(result.paths["markdown"].read_text())
        print(f"report: {', '.join(str(p) for p in result.paths.values())} ({result.seconds:.0f}s)")
    if result.failed:
        print(f"{len(result.failed)} run(s) failed: " + "; ".join(
            f"{f['norm']} seed {f['seed']} " + (f"at epoch {f['epoch']}, step {f['step']}" if f["epoch"] is not None
                                                else f"({f['reason']})") for f in result.failed)
              + " (diverged runs are not retried unless --retry-failed)", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------- analyze
def run_analyze(args: argparse.Namespace) -> int:
    result = analyze_checkpoint(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, device=args.device,
                                max_batches=args.metrics_max_batches)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['checkpoint']} (epoch {result['epoch']}, {result['model']}, {result['norm']}) "
              f"on {result['dataset']}:")
        for key in ("test_acc", "test_loss", *ANGLE_KEYS):
            print(f"  {key:12s} {result[key]:.4f}")
        if "test_confusion" in result:
            from ..train.confusion import group_accuracy

            for device in result["test_confusion"]["groups"]:
                print(f"  acc {device:8s} {group_accuracy(result['test_confusion'], [device]):.4f}")
    return 0


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train``, ``compare`` and ``analyze``."""
    p = subparsers.add_parser("train", help="train one model (one norm, one seed)",
                              description="Train one (dataset, model, norm, seed) run with the paper's recipe.")
    _add_experiment_options(p)
    p.add_argument("--norm", default="bn", help="norm layer name from l2bn.norms (default: bn)")
    p.add_argument("--seed", type=seed, default=121, help="0 to 2**64 - 1 (default: 121)")
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "compare", help="train a grid of norms × seeds and write the paper's table and figures",
        description="Run every (norm, seed), skipping finished runs and resuming interrupted ones, then write "
                    "results.md/.csv and PNG figures. With no arguments: BN vs L2BN on digits with ResNet-20, "
                    "3 seeds (a few CPU minutes).",
    )
    _add_experiment_options(p)
    p.add_argument("--norms", type=str_list, default=["bn", "l2bn"], help="comma-separated (default: bn,l2bn)")
    p.add_argument("--seeds", type=seed_list, default=None, help="comma-separated (default: the recipe's seeds)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at once, as separate processes sharing the CPU threads (default: one per GPU on "
                   "CUDA, else 2 — or 1 on a single-core machine)")
    p.add_argument("--retry-failed", action="store_true",
                   help="retry runs recorded as failed (from their last good checkpoint)")
    add_executor_options(p)
    p.set_defaults(func=run_compare)

    p = subparsers.add_parser("analyze", help="accuracy and angle metrics of a saved checkpoint",
                              description="Test accuracy, intra/inter-class angles and IIR of a checkpoint.")
    p.add_argument("checkpoint", help="last.pt or best.pt of a run")
    p.add_argument("--dataset", default=None, help="default: the dataset it was trained on")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--metrics-max-batches", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_analyze)
