"""Every strategy as a recipe, a round on the tiny model from the same base: each writes its rows with their origin
and judge, and trains with its method. The reward-model round runs second in the best-of-n round's workspace (it
learns from the earlier rounds' pairs); the tests run in file order.

(Rounds are not chained across strategies: the tiny random model trained at a learning rate of 1e-3 soon answers
nothing, and a round with nothing to learn fails, as it should.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli import run_cli
from helpers import tiny_recipe, write_recipe

from flywheel import registry
from flywheel.dataset import read_table


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("strategies") / "ws"
    ws.mkdir()
    return ws


@pytest.fixture
def workspace(tmp_path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws


def run_round(workspace: Path, tiny_model_dir: Path, name: str, **overrides) -> tuple[dict, Path]:
    recipe = write_recipe(workspace / f"{name}.yaml", tiny_recipe(tiny_model_dir, **overrides))
    before = {p.name for p in (workspace / ".flywheel" / "rounds").glob("*.json")} \
        if (workspace / ".flywheel" / "rounds").is_dir() else set()
    run_cli(workspace, "run", "--config", str(recipe))
    new, = {p.name for p in (workspace / ".flywheel" / "rounds").glob("*.json")} - before
    record = json.loads((workspace / ".flywheel" / "rounds" / new).read_text())
    assert record["status"] == "completed"
    return record, workspace / "data" / "rounds" / Path(new).stem


def metrics(workspace: Path, run_id: str) -> dict[str, float]:
    return registry.client(f"sqlite:///{workspace / '.flywheel' / 'mlflow.db'}").get_run(run_id).data.metrics


def test_best_of_n_rows_record_their_origin_and_judge(shared, tiny_model_dir):
    workspace = shared
    record, data = run_round(workspace, tiny_model_dir, "best-of-n")
    assert record["quality"]["clean"]["strategy"] == "best_of_n"
    pairs = read_table(data / "pairs.parquet")
    assert len(pairs) > 0 and set(pairs["origin"]) == {"best_of_n:pair"} and set(pairs["judge"]) == {"verifier"}
    made = record["quality"]["clean"]["stats"]["best_of_n_pairs"]  # before the quality gate
    assert made >= len(pairs) and metrics(workspace, record["run_id"])["strategy.best_of_n_pairs"] == made


def test_repair_round_pairs_repaired_answers_with_their_originals(workspace, tiny_model_dir):
    record, data = run_round(workspace, tiny_model_dir, "repair", strategy__name="repair")
    assert record["quality"]["clean"]["strategy"] == "repair"
    stats = record["quality"]["clean"]["stats"]
    assert stats["repair_pairs"] >= 1
    pairs = read_table(data / "pairs.parquet")
    assert pairs["prompt_id"].is_unique
    repaired = pairs[pairs["origin"] == "repair:pair"]
    assert len(repaired) >= 1 and set(repaired["judge"]) == {"verifier"}
    assert (repaired["chosen_score"] > repaired["rejected_score"]).all()
    assert record["trained"]["method"] == "dpo" and record["trained"]["changed_parameters"] > 0
    assert metrics(workspace, record["run_id"])["strategy.repair_pairs"] == stats["repair_pairs"]


def test_self_refine_round_adds_critiques_and_rewrites(workspace, tiny_model_dir):
    record, data = run_round(workspace, tiny_model_dir, "self-refine", strategy__name="self_refine",
                             strategy__self_refine={"refinements": 2, "max_answers": 4, "critique_max_new_tokens": 12})
    stats = record["quality"]["clean"]["stats"]
    assert stats["self_refine_answers_refined"] >= 1 and stats["self_refine_rewrites"] == \
        2 * stats["self_refine_answers_refined"]
    pairs = read_table(data / "pairs.parquet")
    assert pairs["prompt_id"].is_unique
    assert set(pairs["origin"]) <= {"best_of_n:pair", "self_refine:pair"}
    refined = pairs[pairs["origin"] == "self_refine:pair"]
    assert (refined["chosen_score"] > refined["rejected_score"]).all()
    sft = read_table(data / "sft.parquet")
    assert set(sft["origin"]) <= {"best_of_n:accepted", "self_refine:refined", "self_refine:critique",
                                  "self_refine:refinement"}
    assert record["trained"]["method"] == "dpo" and record["trained"]["changed_parameters"] > 0
    found = metrics(workspace, record["run_id"])
    assert found["strategy.self_refine_answers_refined"] == stats["self_refine_answers_refined"]


def test_spar_round_searches_refinement_trees(workspace, tiny_model_dir):
    record, data = run_round(workspace, tiny_model_dir, "spar", strategy__name="spar", strategy__spar={
        "breadth": 2, "keep": 1, "depth": 2, "judge_samples": 3, "max_answers": 3})
    stats = record["quality"]["clean"]["stats"]
    assert 1 <= stats["spar_searched"] <= 3
    # The verifier decides these prompts: each node is judged once, at most breadth x keep nodes per level.
    assert stats["spar_nodes_expanded"] <= stats["spar_searched"] * (2 + 2)
    pairs = read_table(data / "pairs.parquet")
    assert set(pairs["origin"]) <= {"best_of_n:pair", "spar:pair"}
    assert (pairs["origin"] == "spar:pair").sum() == stats["spar_solved"] - _quarantined(data, "spar:pair")
    assert record["trained"]["method"] == "dpo"


def test_spar_trained_refiner_learns_between_rounds(workspace, tiny_model_dir):
    # Short answers to lowercase-only requests: the tiny model's byte soup breaks the constraint often and a
    # refinement meets it often enough for searches to be solved, so round 1 has refiner rows to train on. Manual
    # promotion keeps the policy at its base: round 2 differs from round 1 only by the refiner.
    from safetensors.torch import load_file

    from flywheel.prompts import Constraint, Prompt, save_prompts

    save_prompts([Prompt(id=f"q{i}", prompt=f"write note {i} about the weather in lowercase",
                         constraints=[Constraint(type="all_lowercase")]) for i in range(24)],
                 workspace / "prompts.jsonl")
    options = dict(strategy__name="spar", prompts__source="prompts.jsonl", prompts__per_round=6,
                   prompts__eval_limit=4, generation__samples_per_prompt=2, promotion__mode="manual",
                   strategy__spar={"breadth": 3, "keep": 1, "depth": 2, "max_answers": 4, "refine_max_new_tokens": 4,
                                   "refiner": "trained", "refiner_max_steps": 2})
    first, first_data = run_round(workspace, tiny_model_dir, "spar-refiner", **options)
    uri = f"sqlite:///{workspace / '.flywheel' / 'mlflow.db'}"
    name = "tiny-policy-refiner"
    update = first["trained"]["refiner"]
    assert update["used_version"] == "1" and update["version"] == "2" and update["trained"]["method"] == "sft"
    initial, trained = registry.get_version(uri, name, "1"), registry.get_version(uri, name, "2")
    policy_base = registry.get_version(uri, "tiny-policy", "1")
    assert initial.source == policy_base.source and initial.tags["flywheel.role"] == "refiner"  # the policy's weights
    assert "champion" in trained.aliases
    assert trained.tags["flywheel.role"] == "refiner" and trained.tags["flywheel.parent_version"] == "1"
    dataset = json.loads((first_data / "dataset.json").read_text())
    assert trained.tags["flywheel.config_hash"] == first["config_hash"] == dataset["config_hash"]
    assert trained.tags["flywheel.dataset_md5"] == first["dataset"]["dvc_md5"]
    assert trained.tags["flywheel.git_commit"] == first["dataset"]["commit"]
    assert trained.tags["flywheel.evaluation"].startswith("none")
    sft = read_table(first_data / "sft.parquet")
    assert update["trained"]["rows"] == sft["origin"].isin(["spar:refinement", "spar:judgement"]).sum() > 0
    store = workspace / ".flywheel" / "models"
    before = load_file(registry.materialize(uri, initial, store) / "model.safetensors")
    after = load_file(registry.materialize(uri, trained, store) / "model.safetensors")
    assert any(not before[k].equal(after[k]) for k in before)  # SFT moved the refiner's weights
    candidate = registry.get_version(uri, "tiny-policy", first["registration"]["version"])
    assert candidate.tags["flywheel.spar.refiner_version"] == "1"
    assert candidate.tags["flywheel.spar.refiner_trained_version"] == "2"
    run_tags = registry.client(uri).get_run(first["run_id"]).data.tags
    assert run_tags["flywheel.spar.refiner_version"] == "1" and run_tags["flywheel.spar.refiner_trained_version"] == "2"
    assert json.loads((first_data / "strategy.json").read_text())["refiner"]["version"] == "1"

    second, _ = run_round(workspace, tiny_model_dir, "spar-refiner", **options)
    assert second["parent_version"] == "1"  # the policy stayed; the refiner moved
    assert second["trained"]["refiner"]["used_version"] == "2"
    assert registry.client(uri).get_run(second["run_id"]).data.tags["flywheel.spar.refiner_version"] == "2"
    assert registry.get_version(uri, "tiny-policy", second["registration"]["version"]).tags[
        "flywheel.spar.refiner_version"] == "2"
    latest = registry.get_version(uri, name, "champion")
    assert latest.version == second["trained"]["refiner"]["version"]


def test_sami_round_trains_the_contrastive_objective(workspace, tiny_model_dir):
    record, data = run_round(workspace, tiny_model_dir, "sami", strategy__name="sami", strategy__sami={
        "writer": "self", "written_principles": 1, "constitutions_per_prompt": 2, "principles_per_constitution": 1,
        "writer_max_new_tokens": 12}, training__method="sami", generation__samples_per_prompt=1)
    sft = read_table(data / "sft.parquet")
    assert len(sft) > 0 and set(sft["origin"]) == {"sami:response"}
    assert {"constitution_id", "constitution"} <= set(sft.columns)
    assert (sft.groupby("prompt_id")["constitution_id"].nunique() <= 2).all()
    written = json.loads((data / "strategy.json").read_text())
    assert written["strategy"] == "sami" and len(written["principles"]) == len(written["antitheses"]) >= 4
    trained = record["trained"]
    assert trained["method"] == "sami" and trained["changed_parameters"] > 0
    assert trained["rows_used"] <= sft["prompt_id"].nunique()  # one training item per prompt group
    assert "train.sami_accuracy" in metrics(workspace, record["run_id"])


def test_distill_round_learns_the_teachers_answers(workspace, tiny_model_dir):
    record, data = run_round(workspace, tiny_model_dir, "distill", strategy__name="distill", strategy__distill={
        "teacher": {"model": str(tiny_model_dir)}, "guideline_max_new_tokens": 8, "require_pass": False},
        training__method="sft", generation__samples_per_prompt=1)
    sft = read_table(data / "sft.parquet")
    assert len(sft) > 0 and set(sft["origin"]) == {"distill:teacher"}
    assert set(sft["teacher"]) == {str(tiny_model_dir)}
    # The random teacher seldom ends its turn before the token limit: those rows say so, for open_cut_off_targets.
    assert sft["ended"].dtype == bool and not sft["ended"].all()
    prompts = {json.loads(line)["prompt"] for line in (data / "prompts.jsonl").read_text().splitlines()}
    assert set(sft["prompt"]) <= prompts  # learned against the plain prompt, not the guideline request
    written = json.loads((data / "strategy.json").read_text())
    assert written["teacher"] == str(tiny_model_dir) and len(written["guidelines"]) == record["prompts"]["round_prompts"]
    assert record["trained"]["method"] == "sft"


def test_grpo_round_trains_online_on_the_verifier_reward(workspace, tiny_model_dir):
    # A group whose answers all score the same has no advantage to learn from: prompts whose constraints short
    # random answers meet some of the time (lowercase, no commas) give the groups a spread.
    from flywheel.prompts import Constraint, Prompt, save_prompts

    constraints = [Constraint(type="all_lowercase"), Constraint(type="no_commas")]
    save_prompts([Prompt(id=f"q{i}", prompt=f"write note {i} about the weather", constraints=constraints)
                  for i in range(40)], workspace / "prompts.jsonl")
    record, data = run_round(workspace, tiny_model_dir, "grpo", strategy__name="grpo", strategy__grpo={
        "rewards": ["verifier"], "num_generations": 4, "max_completion_length": 4}, training__method="grpo",
        generation__samples_per_prompt=1, training__max_steps=2, training__batch_size=4,
        prompts__source="prompts.jsonl")
    trained = record["trained"]
    assert trained["method"] == "grpo" and trained["changed_parameters"] > 0 and trained["steps"] == 2
    assert trained["rows"] == read_table(data / "samples.parquet")["prompt_id"].nunique()
    found = metrics(workspace, record["run_id"])
    assert "train.rewards/verifier/mean" in found and "train.reward_std" in found


def test_reward_model_judges_a_round_from_the_earlier_pairs(shared, tiny_model_dir):
    workspace = shared
    earlier = sum(len(read_table(p)) for p in (workspace / "data" / "rounds").glob("*/pairs.parquet"))
    record, data = run_round(workspace, tiny_model_dir, "reward-model",
                             feedback__judges=["verifier", "reward_model"], feedback__llm_scope="all")
    samples = read_table(data / "samples.parquet")
    assert set(samples["judge"]) == {"reward_model"}
    assert samples["llm_verdict"].isin(["pass", "fail"]).all()
    assert record["judged"]["agreement"] is not None  # the verifier's verdicts measure the reward model
    assert metrics(workspace, record["run_id"])["reward_model.rows"] == earlier


def test_reward_model_without_earlier_pairs_says_so(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path / "rm.yaml", tiny_recipe(tiny_model_dir, feedback__judges=["verifier", "reward_model"],
                                                             feedback__llm_scope="all"))
    result = run_cli(tmp_path, "run", "--config", str(recipe), check=False)
    assert result.returncode == 2 and "no preference pairs from earlier rounds" in result.stderr


def _quarantined(data: Path, origin: str) -> int:
    quarantine = read_table(data / "quarantine.parquet")
    return sum(json.loads(row).get("origin") == origin for row in quarantine["row_json"])
