"""A whole round on a tiny model through the CLI: every stage real (Prefect, GX, DVC, git, TRL, MLflow)."""

from __future__ import annotations

import json

import pytest
import yaml
from cli import run_cli
from helpers import tiny_recipe, write_recipe

from flywheel import registry
from flywheel.dataset import read_table
from flywheel.versioning import dvc_md5, git, tag_commit


@pytest.fixture(scope="module")
def finished_round(tiny_model_dir, tmp_path_factory):
    workspace = tmp_path_factory.mktemp("ws")
    recipe = tiny_recipe(tiny_model_dir, promotion__mode="manual")
    recipe["evaluation"].update(open_ended=2)  # and the open-ended win rate, judged by the champion
    recipe = write_recipe(workspace / "recipe.yaml", recipe)
    result = run_cli(workspace, "run", "--config", str(recipe), "--workspace", str(workspace))
    return workspace, recipe, result


def uri(workspace):
    return f"sqlite:///{workspace / '.flywheel' / 'mlflow.db'}"


def test_round_registers_candidate_with_lineage(finished_round):
    workspace, _, result = finished_round
    assert "round-0001" in result.stdout
    champion = registry.get_version(uri(workspace), "tiny-policy", "champion")
    candidate = registry.get_version(uri(workspace), "tiny-policy", "candidate")
    assert champion.version == "1"  # manual promotion: the champion does not move by itself
    assert candidate.version == "2"
    tags = candidate.tags
    assert tags["flywheel.round"] == "1"
    assert tags["flywheel.parent_version"] == "1"
    assert tags["flywheel.round_tag"] == "round-0001"
    assert tags["flywheel.dataset_md5"] == dvc_md5(workspace, "round-0001")
    assert tags["flywheel.git_commit"] == tag_commit(workspace, "round-0001")
    assert len(tags["flywheel.config_hash"]) == 16
    assert tags["flywheel.review"] == "approved by policy:auto"
    assert "round-0001" in candidate.description
    # The open-ended comparison ran in the evaluate stage: in the record, the tags, the table and the summary.
    record = json.loads((workspace / ".flywheel" / "rounds" / "round-0001.json").read_text())
    open_ended = record["evaluation"]["open_ended"]
    assert open_ended["prompts"] == 2 and open_ended["wins"] + open_ended["losses"] + open_ended["ties"] == 2
    assert float(tags["flywheel.eval.open_ended.win_rate"]) == pytest.approx(open_ended["win_rate"])
    assert "open-ended win rate" in candidate.description and "open-ended win rate" in result.stdout
    table = read_table(workspace / ".flywheel" / "work" / "round-0001" / "eval_open_ended.parquet")
    assert len(table) == 2 and set(table["outcome"]) <= {"win", "loss", "tie"}


def test_round_dataset_versioned_by_dvc_and_git(finished_round):
    workspace, _, _ = finished_round
    data = workspace / "data" / "rounds" / "round-0001"
    for name in ("prompts.jsonl", "samples.parquet", "pairs.parquet", "sft.parquet", "quarantine.parquet",
                 "quality.json", "review.json", "dataset.json"):
        assert (data / name).is_file(), name
    committed = set(git(workspace, "show", "--name-only", "--format=", "round-0001^{commit}").split())
    assert "data.dvc" in committed and committed <= {"data.dvc", ".gitignore"}
    remote_files = [p for p in (workspace / ".flywheel" / "dvc-remote").rglob("*") if p.is_file()]
    assert len(remote_files) >= 8  # every dataset file was pushed
    manifest = json.loads((data / "dataset.json").read_text())
    assert manifest["rows"]["samples"] == len(read_table(data / "samples.parquet"))
    assert manifest["parent_version"] == "1"


def test_quality_result_and_review_decision_stored(finished_round):
    workspace, _, _ = finished_round
    data = workspace / "data" / "rounds" / "round-0001"
    quality = json.loads((data / "quality.json").read_text())
    assert {t["table"] for t in quality["tables"]} == {"samples", "pairs", "sft"}
    stored = list((workspace / "great_expectations" / "uncommitted" / "validations").rglob("*.json"))
    assert len(stored) >= 3
    review = json.loads((data / "review.json").read_text())
    assert review["approved"] is True and review["mode"] == "auto"
    assert review["sample_ids"]


def test_trained_weights_differ_from_parent(finished_round, tiny_model_dir):
    from safetensors.torch import load_file

    workspace, _, _ = finished_round
    parent = load_file(tiny_model_dir / "model.safetensors")
    child = load_file(workspace / ".flywheel" / "models" / "tiny-policy" / "rounds" / "round-0001" / "model.safetensors")
    assert parent.keys() == child.keys()
    assert any(not parent[k].equal(child[k]) for k in parent)


def test_round_record_and_mlflow_metrics(finished_round):
    from mlflow import MlflowClient

    workspace, _, _ = finished_round
    record = json.loads((workspace / ".flywheel" / "rounds" / "round-0001.json").read_text())
    assert record["status"] == "completed"
    assert record["registration"]["version"] == "2"
    client = MlflowClient(tracking_uri=uri(workspace))
    history = client.get_metric_history(record["run_id"], "train.loss")
    assert len(history) == record["trained"]["steps"] and len(history) >= 2
    run = client.get_run(record["run_id"])
    logged = {a.path for a in client.list_artifacts(record["run_id"], "quality")}
    assert logged == {"quality/quality.json", "quality/quarantine.parquet"}
    assert "eval.candidate.prompt_accuracy" in run.data.metrics
    assert run.data.metrics["eval.candidate.probe_perplexity"] > 1
    assert run.data.metrics["judge.pass_rate"] == pytest.approx(record["judged"]["pass_rate"])
    assert run.data.metrics["data.pairs"] == record["quality"]["clean"]["pairs"]
    assert run.data.params["training.method"] == "dpo"


def test_promote_then_next_round_starts_from_new_champion(finished_round):
    workspace, recipe, _ = finished_round
    out = run_cli(workspace, "promote", "2", "--config", str(recipe), "--reason", "test").stdout
    assert "champion -> v2" in out
    config = yaml.safe_load(recipe.read_text())
    config["promotion"] = {"mode": "auto", "min_gain": -1.0, "max_type_regression": None,
                           "max_perplexity_increase": None}  # always promote, to exercise the policy path
    write_recipe(recipe, config)
    out = run_cli(workspace, "run", "--config", str(recipe)).stdout
    assert "round-0002" in out
    second = registry.get_version(uri(workspace), "tiny-policy", "3")
    assert second.tags["flywheel.parent_version"] == "2"
    # The drift budget's reference is the base (v1), measured in round 1 as its champion.
    records = [json.loads((workspace / ".flywheel" / "rounds" / f"round-000{n}.json").read_text()) for n in (1, 2)]
    assert records[1]["evaluation"]["base_version"] == "1"
    assert second.tags["flywheel.base_version"] == "1"
    assert records[1]["evaluation"]["base_perplexity"] == records[0]["evaluation"]["champion_perplexity"]
    assert records[1]["evaluation"]["champion_perplexity"] == records[0]["evaluation"]["candidate_perplexity"]
    assert registry.get_version(uri(workspace), "tiny-policy", "champion").version == "3"
    assert tag_commit(workspace, "round-0002") is not None
    # rollback is one command and returns to the version the champion replaced
    run_cli(workspace, "rollback", "--config", str(recipe), "--reason", "regression seen")
    assert registry.get_version(uri(workspace), "tiny-policy", "champion").version == "2"
    status = run_cli(workspace, "status", "--config", str(recipe)).stdout
    assert "champion   v2" in status and "round-0002" in status


def test_lineage_traces_version_to_data_and_checkout_restores_it(finished_round):
    workspace, recipe, _ = finished_round
    out = run_cli(workspace, "lineage", "2", "--config", str(recipe)).stdout
    tags = registry.get_version(uri(workspace), "tiny-policy", "2").tags
    for expected in ("tiny-policy v2", "parent version     1", "base version       1", "git tag            round-0001",
                     tags["flywheel.dataset_md5"], tags["flywheel.git_commit"], "approved by policy:auto",
                     "eval.candidate.prompt_accuracy", '"registered_name": "tiny-policy"',
                     "flywheel checkout --round 1"):
        assert expected in out, expected
    # the data of round 1 comes back exactly, even after later rounds changed data/
    import shutil

    shutil.rmtree(workspace / "data" / "rounds" / "round-0001")
    out = run_cli(workspace, "checkout", "--round", "1", "--config", str(recipe)).stdout
    assert tags["flywheel.dataset_md5"] in out
    assert (workspace / "data" / "rounds" / "round-0001" / "pairs.parquet").is_file()
    assert dvc_md5(workspace) == tags["flywheel.dataset_md5"]
    bad = run_cli(workspace, "lineage", "99", "--config", str(recipe), check=False)
    assert bad.returncode == 2 and "no version or alias '99'" in bad.stderr


def test_export_writes_loadable_model(finished_round, tmp_path):
    from transformers import AutoModelForCausalLM

    workspace, recipe, _ = finished_round
    run_cli(workspace, "export", "candidate", str(tmp_path / "out"), "--config", str(recipe))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.num_parameters() > 0


def _cells(stdout: str, label: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if label in line)
    return [cell.strip() for cell in line.split("│") if cell.strip()]


def test_eval_scores_a_registered_version_as_the_round_did(finished_round):
    workspace, recipe, _ = finished_round
    record = json.loads((workspace / ".flywheel" / "rounds" / "round-0001.json").read_text())
    evaluation = record["evaluation"]
    # The round counted the held-out answers that copy their instructions, for both models (0 to 6 prompts).
    assert 0 <= evaluation["candidate_echoes"] <= 6 and 0 <= evaluation["champion_echoes"] <= 6
    # and the answers that are degenerate repetitions
    assert 0 <= evaluation["candidate_repetitive"] <= 6 and 0 <= evaluation["champion_repetitive"] <= 6
    # Version 2 is round 1's candidate (later tests in this module may have moved the alias), version 1 its parent.
    result = run_cli(workspace, "eval", "v2", "--against", "v1", "--config", str(recipe),
                     "--workspace", str(workspace))
    assert "tiny-policy v2 (v2) on 6 held-out prompts" in result.stdout
    for label in ("prompt accuracy", "instruction accuracy", "truncated share", "perplexity (probe)"):
        assert label in result.stdout
    _, strict, loose = _cells(result.stdout, "prompt accuracy")
    assert float(strict) == pytest.approx(evaluation["candidate"]["prompt_accuracy"], abs=1e-3)
    assert float(loose) >= float(strict)  # loose checks accept whatever strict ones do, and more
    assert _cells(result.stdout, "answers copying their instructions")[1] == str(evaluation["candidate_echoes"])
    assert _cells(result.stdout, "answers repeating themselves")[1] == str(evaluation["candidate_repetitive"])
    win = _cells(result.stdout, "win rate vs v1")
    assert "verifier" in win[0] and float(win[1]) == pytest.approx(evaluation["win_rate"], abs=1e-3)
    # The drift against the base v2 descends from (v1), as round 1 measured both probes.
    label, drift = _cells(result.stdout, "against the base")
    assert f"v1: {evaluation['champion_perplexity']:.2f}" in label
    rise = evaluation["candidate_perplexity"] / evaluation["champion_perplexity"] - 1
    assert float(drift.rstrip("%")) == pytest.approx(100 * rise, abs=0.06)


def test_eval_open_ended_win_rate(finished_round):
    workspace, recipe, _ = finished_round
    result = run_cli(workspace, "eval", "v2", "--against", "v1", "--judge", "self", "--open-ended", "3",
                     "--config", str(recipe))
    row = _cells(result.stdout, "open-ended win rate vs v1")
    assert "3 prompts, self" in row[0] and 0.0 <= float(row[1]) <= 1.0
    assert "open-ended answers and verdicts:" in result.stdout
    verifier = run_cli(workspace, "eval", "v2", "--against", "v1", "--open-ended", "3", "--config", str(recipe),
                       check=False)
    assert verifier.returncode != 0 and "needs an LLM judge" in verifier.stderr
    alone = run_cli(workspace, "eval", "v2", "--against", "none", "--judge", "self", "--open-ended", "3",
                    "--config", str(recipe), check=False)
    assert alone.returncode != 0 and "compares two models" in alone.stderr


def test_eval_scores_a_model_folder(finished_round):
    workspace, recipe, _ = finished_round
    record = json.loads((workspace / ".flywheel" / "rounds" / "round-0001.json").read_text())
    folder = record["trained"]["path"]
    result = run_cli(workspace, "eval", "--model", folder, "--against", "none", "--config", str(recipe))
    assert f"{folder} ({folder}) on 6 held-out prompts" in result.stdout
    assert "win rate" not in result.stdout and "against the base" not in result.stdout  # a folder has no lineage
    _, strict, _ = _cells(result.stdout, "prompt accuracy")
    assert float(strict) == pytest.approx(record["evaluation"]["candidate"]["prompt_accuracy"], abs=1e-3)
    missing = run_cli(workspace, "eval", "--model", str(workspace / "nope"), "--config", str(recipe), check=False)
    assert missing.returncode != 0 and "model folder not found" in missing.stderr


def test_a_round_rerun_from_its_recorded_recipe_reproduces_its_dataset_hash(finished_round, tmp_path):
    """Same parent, same recipe (the snapshot versioned with the data), same seed: the same bytes on CPU."""
    workspace, _, _ = finished_round
    run_cli(workspace, "checkout", "--round", "1", "--config", str(workspace / "recipe.yaml"))
    snapshot = workspace / "data" / "rounds" / "round-0001" / "config.json"
    again = tmp_path / "again"
    again.mkdir()
    run_cli(again, "run", "--config", str(snapshot), "--workspace", str(again))
    assert dvc_md5(again, "round-0001") == dvc_md5(workspace, "round-0001")


def test_generate_answers_with_inference_time_self_refinement(finished_round, tmp_path):
    workspace, recipe, _ = finished_round
    out = tmp_path / "answers.jsonl"
    result = run_cli(workspace, "generate", "v2", "--out", str(out), "--samples", "2", "--refine", "1",
                     "--config", str(recipe))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and {r["sample_index"] for r in rows} == {0, 1}  # 6 held-out prompts x 2
    assert all(r["version"] == "2" and r["model"] == "tiny-policy" for r in rows)
    refined = sum(r["refined"] for r in rows)
    assert all((r["response"] != r["first_response"]) == r["refined"] for r in rows)
    assert f"12 answers to 6 prompts, {refined} changed by 1 refinement round(s)" in result.stdout
    missing = run_cli(workspace, "generate", "v2", "--out", str(out), "--prompts", str(tmp_path / "none.jsonl"),
                      "--config", str(recipe), check=False)
    assert missing.returncode == 2 and "--prompts: file not found" in missing.stderr


def test_the_round_plot_is_logged_with_the_round(finished_round):
    workspace, _, _ = finished_round
    record = json.loads((workspace / ".flywheel" / "rounds" / "round-0001.json").read_text())
    mlflow_client = registry.client(f"sqlite:///{workspace / '.flywheel' / 'mlflow.db'}")
    assert [a.path for a in mlflow_client.list_artifacts(record["run_id"], "plots")] == ["plots/round-0001.png"]
