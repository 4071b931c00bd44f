"""Experiment runner: recipes (paper's supplementary Table 1), the training engine and DDP set-up."""
from .engine import NonFiniteLossError, TrainConfig, analyze_checkpoint, evaluate, is_complete, train
from .recipes import RECIPES, Recipe, default_recipe_name, get_recipe, list_recipes

__all__ = [
    "RECIPES",
    "NonFiniteLossError",
    "Recipe",
    "TrainConfig",
    "analyze_checkpoint",
    "default_recipe_name",
    "evaluate",
    "get_recipe",
    "is_complete",
    "list_recipes",
    "train",
]
