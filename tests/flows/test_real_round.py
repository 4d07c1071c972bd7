"""One end-to-end round with the real default base model, SmolLM2-135M-Instruct, on a small prompt subset.

Slow (a few minutes on 2 CPU cores): run it alone with `scripts/test -m slow`.
"""

from __future__ import annotations

import json

import pytest
from cli import run_cli
from helpers import write_recipe

from flywheel import registry
from flywheel.versioning import dvc_md5, tag_commit

pytestmark = pytest.mark.slow


def test_real_model_round(tmp_path):
    from safetensors import safe_open

    workspace = tmp_path / "ws"
    workspace.mkdir()
    recipe = write_recipe(workspace / "recipe.yaml", {
        "name": "real-smoke",
        "model": {"base": "builtin:smollm2-135m-instruct", "registered_name": "smollm2-instruct"},
        "prompts": {"per_round": 6, "eval_limit": 6},
        "generation": {"samples_per_prompt": 4, "max_new_tokens": 48, "batch_size": 24},
        "feedback": {"chosen_must_pass": False},
        "quality": {"max_failed_fraction": 0.5, "max_truncated_share": 1.0},  # 48 tokens cut most answers
        "training": {"method": "dpo", "max_steps": 2, "batch_size": 2, "learning_rate": 1e-5, "max_length": 256},
        "evaluation": {"max_new_tokens": 48, "batch_size": 6},
        "promotion": {"mode": "manual"},
    })
    result = run_cli(workspace, "run", "--config", str(recipe), timeout=1800)
    assert "round-0001" in result.stdout

    uri = f"sqlite:///{workspace / '.flywheel' / 'mlflow.db'}"
    base = registry.get_version(uri, "smollm2-instruct", "champion")
    assert base.version == "1" and base.tags["flywheel.source"] == "builtin:smollm2-135m-instruct"
    candidate = registry.get_version(uri, "smollm2-instruct", "candidate")
    assert candidate.version == "2"
    assert candidate.tags["flywheel.dataset_md5"] == dvc_md5(workspace, "round-0001")
    assert candidate.tags["flywheel.git_commit"] == tag_commit(workspace, "round-0001")
    assert candidate.tags["flywheel.parent_version"] == "1"

    store = workspace / ".flywheel" / "models"
    meta = json.loads((store / "base" / "smollm2-135m-instruct" / "flywheel-model.json").read_text())
    assert len(meta["sha256"]) == 64 and len(meta["gguf_sha256"]) == 64
    data = workspace / "data" / "rounds" / "round-0001"
    assert json.loads((data / "review.json").read_text())["approved"] is True
    assert list((workspace / "great_expectations" / "uncommitted" / "validations").rglob("*.json"))

    parent = safe_open(str(store / "base" / "smollm2-135m-instruct" / "model.safetensors"), "pt")
    child = safe_open(str(store / "smollm2-instruct" / "rounds" / "round-0001" / "model.safetensors"), "pt")
    changed = [k for k in parent.keys() if not parent.get_tensor(k).equal(child.get_tensor(k))]
    assert changed, "training did not change any weight"
