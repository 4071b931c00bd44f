"""Experiment runner: recipes (paper's supplementary Table 1), one run (:func:`train`), a grid of runs
(:func:`compare`), run folders (:class:`RunDir`) and DDP set-up."""
from .compare import GridReport, compare
from .engine import IDENTITY_FIELDS, NonFiniteLossError, TrainConfig, analyze_checkpoint, evaluate, is_complete, train
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
