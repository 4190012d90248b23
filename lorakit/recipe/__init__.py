"""Recipes: the settings (settings.py: dataclasses, every default) and reading them from YAML with the
command line's overrides (loading.py)."""

from .loading import ALIASES, SECTIONS, RecipeKeyError, load_recipe
from .lora import OUTSIDE_THE_BLOCKS, LoraSettings
from .settings import (
    PREFERENCE_LOSSES,
    REPORTS,
    STAGES,
    DataSettings,
    DataSource,
    PrefSettings,
    QuantSettings,
    Recipe,
    TrainSettings,
    output_path,
)

__all__ = [
    "ALIASES",
    "OUTSIDE_THE_BLOCKS",
    "PREFERENCE_LOSSES",
    "REPORTS",
    "SECTIONS",
    "STAGES",
    "DataSettings",
    "DataSource",
    "LoraSettings",
    "PrefSettings",
    "QuantSettings",
    "Recipe",
    "RecipeKeyError",
    "TrainSettings",
    "load_recipe",
    "output_path",
]
