"""review.mode: required pauses the round before training; a reviewer resumes it from the terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli import run_cli, start_cli
from helpers import tiny_recipe, write_recipe

from flywheel import registry
from flywheel.dataset import read_table


def wait_for_pause(workspace, recipe, process, log, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"round exited before pausing:\n{log.read_text()[-6000:]}")
        listing = run_cli(workspace, "review", "--config", str(recipe)).stdout
        if "paused since" in listing:
            return listing
        time.sleep(3)
    process.kill()
    raise AssertionError(f"round never paused:\n{log.read_text()[-6000:]}")


@pytest.mark.parametrize("approve", [True, False], ids=["approve", "reject"])
def test_required_review_pauses_and_resumes(tiny_model_dir, tmp_path, approve):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    # 16 prompts: the tiny model's byte soup ties most samples, and the round must keep a pair after the drop.
    recipe = write_recipe(workspace / "recipe.yaml", tiny_recipe(
        tiny_model_dir, review__mode="required", review__timeout_s=600, review__sample_size=3,
        prompts__per_round=16))
    log = tmp_path / "round.log"
    process = start_cli(workspace, "run", "--config", str(recipe), log=log)
    try:
        listing = wait_for_pause(workspace, recipe, process, log)
        assert "# Review round-0001" in listing  # the published sample is shown to the terminal reviewer
        pairs = read_table(workspace / "data" / "rounds" / "round-0001" / "pairs.parquet")
        assert len(pairs) >= 2, "the seeded round must leave a pair to train on after the reviewer's drop"
        drop = str(pairs["row_id"].iloc[0])
        # unknown row ids are refused before the run is touched
        bad = run_cli(workspace, "review", "--config", str(recipe), "--approve", "--reviewer", "alice",
                      "--drop", "no-such-row", check=False)
        assert bad.returncode == 2 and "unknown row ids: no-such-row" in bad.stderr
        decision = "--approve" if approve else "--reject"
        run_cli(workspace, "review", "--config", str(recipe), decision, "--reviewer", "alice",
                "--notes", "spot-checked", "--drop", drop)
        assert process.wait(timeout=600) == 0, log.read_text()[-6000:]
    finally:
        if process.poll() is None:
            process.kill()
    data = workspace / "data" / "rounds" / "round-0001"
    review = json.loads((data / "review.json").read_text())
    assert review["reviewer"] == "alice" and review["mode"] == "human" and review["approved"] is approve
    assert review["notes"] == "spot-checked" and review["dropped_ids"] == [drop]
    quarantine = read_table(data / "quarantine.parquet")
    assert "dropped by reviewer alice: spot-checked" in set(quarantine.loc[quarantine["row_id"] == drop, "reasons"])
    record = json.loads((workspace / ".flywheel" / "rounds" / "round-0001.json").read_text())
    uri = f"sqlite:///{workspace / '.flywheel' / 'mlflow.db'}"
    # who, when, what and which rows were seen: in the round record and on the round's MLflow run
    assert record["review"]["decided_at"].endswith("+00:00") and "decided_at" not in review
    pairs_before_drop = len(read_table(data / "pairs.parquet")) + 1
    assert len(record["review"]["sample_ids"]) == min(3, pairs_before_drop)
    assert record["review"]["sample_ids"] == review["sample_ids"]
    tags = registry.client(uri).get_run(record["run_id"]).data.tags
    assert tags["flywheel.review.reviewer"] == "alice" and tags["flywheel.review.approved"] == str(approve).lower()
    assert json.loads(tags["flywheel.review.dropped_ids"]) == [drop]
    # The reviewer as a judge: verdicts on the rows they saw (kept: pass, only when approved; dropped: fail),
    # compared with the round's judge.
    found = registry.client(uri).get_run(record["run_id"]).data.metrics
    seen = set(record["review"]["sample_ids"]) | {drop}
    assert found["judge.human_rows"] == (len(seen) if approve else 1)
    assert 0.0 <= found["judge.human_agreement"] <= 1.0
    if approve:
        assert record["status"] == "completed"
        assert registry.get_version(uri, "tiny-policy", "2").tags["flywheel.review"] == "approved by alice"
        assert drop not in set(read_table(data / "pairs.parquet")["row_id"])
    else:
        assert record["status"] == "rejected"
        assert [v.version for v in registry.list_versions(uri, "tiny-policy")] == ["1"]


CASES = {"reject:0": False, "approve_if_checks_passed:0": True, "approve_if_checks_passed:3": False}


@pytest.fixture(scope="module")
def timed_out_gates(tmp_path_factory) -> dict[str, dict]:
    """Three review gates left to time out (2 s) in a real Prefect flow, one per action and check outcome."""
    home = tmp_path_factory.mktemp("prefect")
    script = Path(__file__).parents[1] / "support" / "review_timeout_flow.py"
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run([sys.executable, str(script), *CASES], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {line["case"]: line for line in lines}


@pytest.mark.parametrize("case", list(CASES))
def test_a_review_that_times_out_takes_the_configured_action_and_the_flow_goes_on(timed_out_gates, case):
    outcome = timed_out_gates[case]
    # Prefect fails a pause past its timeout; the gate takes the run back, so tasks after it run and the flow completes
    assert outcome["state"] == "COMPLETED", outcome
    decision, approved = outcome["result"]["decision"], CASES[case]
    assert decision["approved"] is approved and outcome["result"]["next"] == ("train" if approved else "stop")
    assert decision["reviewer"] == "timeout" and decision["mode"] == "timeout"
    assert decision["sample_ids"] == ["p1-pair", "p2-pair"] and decision["dropped_ids"] == []
    on_timeout = case.split(":")[0]
    assert decision["notes"].startswith(f"no decision within 2 s: {'approved' if approved else 'rejected'} "
                                        f"(review.on_timeout is {on_timeout}")
    if case.endswith(":3"):
        assert "3 row(s) failed expectations" in decision["notes"]


def test_a_round_whose_review_times_out_is_rejected_and_recorded(tiny_model_dir, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    recipe = write_recipe(workspace / "recipe.yaml", tiny_recipe(
        tiny_model_dir, review__mode="required", review__timeout_s=2, review__on_timeout="reject",
        review__sample_size=3))
    run_cli(workspace, "run", "--config", str(recipe))  # the pause times out; the round must not crash

    record = json.loads((workspace / ".flywheel" / "rounds" / "round-0001.json").read_text())
    review = record["review"]
    assert record["status"] == "rejected" and record["trained"] is None
    assert review["reviewer"] == "timeout" and review["mode"] == "timeout" and review["approved"] is False
    assert review["notes"] == "no decision within 2 s: rejected (review.on_timeout is reject)"
    assert review["sample_ids"] and review["decided_at"].endswith("+00:00")
    uri = f"sqlite:///{workspace / '.flywheel' / 'mlflow.db'}"
    assert [v.version for v in registry.list_versions(uri, "tiny-policy")] == ["1"]
    tags = registry.client(uri).get_run(record["run_id"]).data.tags
    assert tags["flywheel.review.reviewer"] == "timeout" and tags["flywheel.review.approved"] == "false"
    assert tags["flywheel.review.decided_at"] == review["decided_at"]
    assert json.loads(tags["flywheel.review.sample_ids"]) == review["sample_ids"]
    # the data is kept, and its copy of the decision carries no wall-clock time
    data = workspace / "data" / "rounds" / "round-0001"
    assert (data / "pairs.parquet").is_file() and (data / "samples.parquet").is_file()
    data_review = json.loads((data / "review.json").read_text())
    assert "decided_at" not in data_review and data_review["reviewer"] == "timeout"
