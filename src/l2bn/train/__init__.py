"""Experiment runner: recipes (paper's supplementary Table 1), one run's config (:class:`TrainConfig`), one run
(:func:`train`), its evaluation, a grid of runs (:func:`compare`), run folders (:class:`RunDir`) and DDP set-up."""
from .analyze import analyze_checkpoint
from .config import IDENTITY_FIELDS, TrainConfig, is_complete
from .engine import NonFiniteLossError, train
from .evaluate import evaluate
from .grid import GridReport, compare
from .recipes import RECIPES, Recipe, default_recipe_name, get_recipe, list_recipes
from .rundir import ANGLE_KEYS, EPOCH_KEYS, CheckpointError, DiskFullError, RunBusyError, RunDir, RunFileError

__all__ = [
    "ANGLE_KEYS",
    "EPOCH_KEYS",
    "IDENTITY_FIELDS",
    "RECIPES",
    "CheckpointError",
    "DiskFullError",
    "GridReport",
    "NonFiniteLossError",
    "Recipe",
    "RunBusyError",
    "RunDir",
    "RunFileError",
    "TrainConfig",
    "analyze_checkpoint",
    "compare",
    "default_recipe_name",
    "evaluate",
    "get_recipe",
    "is_complete",
    "list_recipes",
    "train",
]
