"""Shared builders for tests: small recipes over a tiny model, in a workspace under tmp_path."""

from __future__ import annotations

from pathlib import Path

import yaml


def tiny_recipe(model_dir: Path, **overrides) -> dict:
    recipe = {
        "name": "tiny",
        "model": {"base": str(model_dir), "registered_name": "tiny-policy"},
        "prompts": {"per_round": 8, "eval_limit": 6},
        "generation": {"samples_per_prompt": 4, "max_new_tokens": 12, "temperature": 1.0, "batch_size": 16},
        "feedback": {"chosen_must_pass": False, "sft_min_score": 0.0},
        # The tiny random model writes byte soup cut at 12 tokens: no language to check, (almost) all truncated.
        "quality": {"max_failed_fraction": 0.5, "language": None, "max_truncated_share": 1.0},
        "training": {"method": "dpo", "max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "max_length": 256},
        "evaluation": {"max_new_tokens": 12, "batch_size": 16},
        "promotion": {"mode": "auto", "min_gain": -1.0, "max_type_regression": None, "max_perplexity_increase": None},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        recipe.setdefault(section, {})[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path
