"""The recipe: a tree of typed sections, loaded strictly from YAML.

Every default lives in the schema (schema.py), and nowhere else. Loading (load.py) reports every problem at once
(unknown keys with a "did you mean", wrong types, values out of range, impossible combinations: checks.py), each
naming the field and the fix, before any process group starts or any model loads.

    recipe = load_recipe("configs/demo.yaml", overrides=["training.max_steps=20"])
"""

from __future__ import annotations

from .checks import reported_metrics
from .load import (_build, describe_schema, dump_recipe, load_recipe, parse_overrides, recipe_from_dict,
                   recipe_to_dict)
from .schema import (PREFERENCE_FORMATS, PROMPT_FORMATS, AttnImpl, CheckpointConfig, CleanConfig, DataColumns, DataConfig, DataFormat,
                     DistributedConfig, EvalConfig, GenerationConfig, IA3Config, LoggingConfig, LoraConfig,
                     MethodConfig, MethodKind, ModelConfig, ObjectiveConfig, PartialConfig, Precision, PromptConfig, QuantConfig,
                     Recipe, RecipeError, Scheduler, ShareGPTConfig, SourceConfig, Strategy, Task, TrainingConfig,
                     WandbConfig, data_sources, eval_sources, source_format)

__all__ = [
    # schema.py: the sections, their choices, and reading the data section's sources
    "Recipe", "RecipeError", "ModelConfig", "DataConfig", "DataColumns", "ShareGPTConfig", "SourceConfig",
    "CleanConfig", "MethodConfig", "ObjectiveConfig", "LoraConfig", "QuantConfig", "PromptConfig", "IA3Config", "PartialConfig",
    "TrainingConfig", "DistributedConfig", "CheckpointConfig", "GenerationConfig", "EvalConfig", "WandbConfig",
    "LoggingConfig", "Task", "DataFormat", "MethodKind", "Strategy", "Precision", "Scheduler", "AttnImpl",
    "PROMPT_FORMATS", "PREFERENCE_FORMATS", "data_sources", "eval_sources", "source_format",
    # checks.py
    "reported_metrics",
    # load.py (_build: sweep.py builds a section from its own mapping with the same strictness)
    "load_recipe", "recipe_from_dict", "parse_overrides", "recipe_to_dict", "dump_recipe", "describe_schema",
    "_build",
]
