"""Round variants a recipe selects: SFT on a user's own prompt file, and a quality gate that stops the round."""

from __future__ import annotations

import json

from cli import run_cli
from helpers import tiny_recipe, write_recipe

from flywheel import registry
from flywheel.dataset import read_table
from flywheel.prompts import load_prompts, save_prompts, synthesize_prompts


def test_sft_round_on_user_prompt_file(tiny_model_dir, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    prompts = synthesize_prompts(40, seed=7)
    save_prompts(prompts, workspace / "my-prompts.jsonl")
    recipe = write_recipe(workspace / "recipe.yaml", tiny_recipe(
        tiny_model_dir, prompts__source="my-prompts.jsonl", prompts__eval_fraction=0.25,
        training__method="sft", generation__samples_per_prompt=2))
    run_cli(workspace, "run", "--config", str(recipe))
    data = workspace / "data" / "rounds" / "round-0001"
    used = {p.id for p in load_prompts(data / "prompts.jsonl")}
    assert used <= {p.id for p in prompts}  # the round answered the user's prompts, not the builtin set
    sft = read_table(data / "sft.parquet")
    assert len(sft) > 0 and set(sft["prompt_id"]) <= used
    record = json.loads((workspace / ".flywheel" / "rounds" / "round-0001.json").read_text())
    assert record["trained"]["method"] == "sft" and record["trained"]["rows"] == len(sft)
    uri = f"sqlite:///{workspace / '.flywheel' / 'mlflow.db'}"
    assert registry.get_version(uri, "tiny-policy", "candidate").version == "2"


def test_ctranslate2_round_generates_and_evaluates_through_converted_models(tiny_model_dir, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    recipe = write_recipe(workspace / "recipe.yaml", tiny_recipe(
        tiny_model_dir, generation__engine="ctranslate2", generation__threads=1, generation__samples_per_prompt=2))
    run_cli(workspace, "run", "--config", str(recipe))
    record = json.loads((workspace / ".flywheel" / "rounds" / "round-0001.json").read_text())
    assert record["status"] == "completed" and record["generations"]["samples"] > 0
    # Converted once per model and cached by sha256: the champion (generation, evaluation) and the candidate.
    converted = [p for p in (workspace / ".flywheel" / "ctranslate2").iterdir() if p.is_dir()]
    assert len(converted) == 2, converted


def test_quality_gate_stops_round_and_keeps_quarantine(tiny_model_dir, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    # Every response is shorter than 10,000 characters, so every row fails the length bound.
    recipe = write_recipe(workspace / "recipe.yaml", tiny_recipe(
        tiny_model_dir, quality__min_chars=10_000, quality__max_chars=20_000, quality__max_failed_fraction=0.1))
    result = run_cli(workspace, "run", "--config", str(recipe), check=False)
    assert result.returncode == 2
    assert "QualityGateError: quality gate failed" in result.stderr
    data = workspace / "data" / "rounds" / "round-0001"
    quarantine = read_table(data / "quarantine.parquet")
    assert len(quarantine) > 0
    assert quarantine["reasons"].str.contains("expect_column_value_lengths_to_be_between").all()
    assert json.loads((data / "quality.json").read_text())["passed"] is False
    uri = f"sqlite:///{workspace / '.flywheel' / 'mlflow.db'}"
    assert [v.version for v in registry.list_versions(uri, "tiny-policy")] == ["1"]  # nothing was trained
    assert not (workspace / ".flywheel" / "rounds" / "round-0001.json").exists()  # the round did not finish
    from mlflow import MlflowClient

    runs = MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name("flywheel/tiny-policy").experiment_id],
        filter_string="tags.`flywheel.round` = '1'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["flywheel.failure"].startswith("QualityGateError")


def test_a_round_trains_in_two_launched_processes(tiny_model_dir, tmp_path):
    """training.processes: 2 runs `accelerate launch` (gloo processes on CPU, one per GPU on a GPU machine)."""
    import pytest

    pytest.importorskip("accelerate")
    workspace = tmp_path / "ws"
    workspace.mkdir()
    recipe = write_recipe(workspace / "recipe.yaml", tiny_recipe(
        tiny_model_dir, training__method="sft", training__processes=2, training__max_steps=1,
        training__batch_size=1))
    run_cli(workspace, "run", "--config", str(recipe))
    record = json.loads((workspace / ".flywheel" / "rounds" / "round-0001.json").read_text())
    trained = record["trained"]
    assert trained["method"] == "sft" and trained["steps"] == 1 and trained["changed_parameters"] > 0
    launch = workspace / ".flywheel" / "work" / "round-0001" / "launch"
    log = (launch / "train.log").read_text()
    assert "flywheel.launch" in log and json.loads((launch / "result.json").read_text())["sha256"] == trained["sha256"]
    uri = f"sqlite:///{workspace / '.flywheel' / 'mlflow.db'}"
    assert registry.get_version(uri, "tiny-policy", "candidate").version == "2"


def test_rounds_prune_what_the_recipe_asks_after_each_round(tiny_model_dir, tmp_path):
    from flywheel.models import METADATA_FILE
    from flywheel.storage import PRUNED_AT, PRUNED_BY

    workspace = tmp_path / "ws"
    workspace.mkdir()
    recipe = write_recipe(workspace / "recipe.yaml", tiny_recipe(
        tiny_model_dir, promotion__mode="manual", storage__prune_after_round="refused",
        generation__samples_per_prompt=2))
    run_cli(workspace, "run", "--config", str(recipe), "--rounds", "2")
    uri = f"sqlite:///{workspace / '.flywheel' / 'mlflow.db'}"
    store = workspace / ".flywheel" / "models" / "tiny-policy"
    # Each round's training folder went once its record was written; the champion's store copy stays.
    assert list((store / "rounds").iterdir()) == []
    assert (store / "v1" / METADATA_FILE).is_file()
    # Round 2's candidate took the alias from round 1's, which was never champion: its weights went after round 2.
    first = registry.get_version(uri, "tiny-policy", "2")
    assert first.tags[PRUNED_BY] == "flywheel:round-0002" and first.tags[PRUNED_AT]
    assert first.tags["flywheel.round_tag"] == "round-0001"  # the version and its lineage stay
    candidate = registry.get_version(uri, "tiny-policy", "candidate")
    assert candidate.version == "3" and PRUNED_AT not in candidate.tags
    assert "champion -> v3" in run_cli(workspace, "promote", "candidate", "--config", str(recipe)).stdout
