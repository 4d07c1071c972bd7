from pathlib import Path

import pytest

from flywheel.config import FlywheelConfig, parse_config
from flywheel.stages import next_round_number
from flywheel.workspace import Workspace


@pytest.mark.parametrize("prefix", ["round-", "r", "nightly_"])
def test_next_round_number_counts_finished_records(tmp_path: Path, prefix: str):
    config = parse_config({"storage": {"tag_prefix": prefix}})
    workspace = Workspace.from_config(config, tmp_path)
    workspace.records.mkdir(parents=True)
    assert next_round_number(workspace) == 1
    for number in (1, 2, 7):
        (workspace.records / f"{workspace.round_name(number)}.json").write_text("{}")
    (workspace.records / "notes.json").write_text("{}")  # not a round record
    assert next_round_number(workspace) == 8


def test_workspace_paths_follow_config(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = Workspace.from_config(FlywheelConfig(), tmp_path)
    assert workspace.state == tmp_path.resolve() / ".flywheel"
    assert workspace.tracking_uri == f"sqlite:///{workspace.state / 'mlflow.db'}"
    assert workspace.round_data(3) == tmp_path.resolve() / "data" / "rounds" / "round-0003"
