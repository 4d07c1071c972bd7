"""review.mode: required pauses the round before training; a reviewer resumes it from the terminal."""

from __future__ import annotations

import json
import time

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
    recipe = write_recipe(workspace / "recipe.yaml", tiny_recipe(
        tiny_model_dir, review__mode="required", review__timeout_s=600, review__sample_size=3))
    log = tmp_path / "round.log"
    process = start_cli(workspace, "run", "--config", str(recipe), log=log)
    try:
        listing = wait_for_pause(workspace, recipe, process, log)
        assert "# Review round-0001" in listing  # the published sample is shown to the terminal reviewer
        pairs = read_table(workspace / "data" / "rounds" / "round-0001" / "pairs.parquet")
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
    if approve:
        assert record["status"] == "completed"
        assert registry.get_version(uri, "tiny-policy", "2").tags["flywheel.review"] == "approved by alice"
        assert drop not in set(read_table(data / "pairs.parquet")["row_id"])
    else:
        assert record["status"] == "rejected"
        assert [v.version for v in registry.list_versions(uri, "tiny-policy")] == ["1"]
