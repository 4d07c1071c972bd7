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


# --- a stage killed half-way through a registry change is finished by its re-run, never doubled -----------------

@pytest.fixture
def registry_workspace(tmp_path: Path, monkeypatch, tiny_model_dir):
    from helpers import tiny_recipe

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = parse_config(tiny_recipe(tiny_model_dir))
    return config, Workspace.from_config(config, tmp_path)


def _register(config, workspace, round_number: int, aliases=()):
    from flywheel import registry
    from flywheel.models import model_sha256

    model = Path(config.model.base)
    uri, name = workspace.tracking_uri, config.model.registered_name
    experiment = registry.experiment_id(uri, f"flywheel/{name}", workspace.mlflow_artifacts)
    run = registry.client(uri).create_run(experiment, tags={"flywheel.round": str(round_number)})
    tags = {"flywheel.round": str(round_number), "flywheel.model_sha256": model_sha256(model)}
    return registry.register_model_dir(uri, name, model, run.info.run_id, tags=tags, description="d",
                                       aliases=aliases), run.info.run_id


def test_resolve_champion_finishes_a_first_registration_killed_before_its_alias(registry_workspace):
    from flywheel import registry
    from flywheel.stages import resolve_champion

    config, workspace = registry_workspace
    _register(config, workspace, 0)  # version 1 exists, `champion` was never set
    champion = resolve_champion(config, workspace)
    assert champion.version == "1"
    assert [v.version for v in registry.list_versions(workspace.tracking_uri, config.model.registered_name)] == ["1"]
    assert registry.get_version(workspace.tracking_uri, config.model.registered_name, "champion").version == "1"


def test_register_candidate_finishes_a_registration_killed_before_its_alias(registry_workspace):
    from flywheel import registry
    from flywheel.stages import register_candidate

    config, workspace = registry_workspace
    _register(config, workspace, 0, aliases=("champion",))
    version, run_id = _register(config, workspace, 1)
    context = type("Context", (), {"number": 1, "run_id": run_id})()
    # An earlier attempt created the version; the re-run reuses it (the other inputs go unused on that path).
    registration = register_candidate(config, workspace, context, None, None, None, None, None)
    assert registration.version == version.version == "2" and "candidate" in registration.aliases
    assert len(registry.list_versions(workspace.tracking_uri, config.model.registered_name)) == 2


def test_decide_promotion_reports_a_promotion_made_before_a_kill(registry_workspace):
    from flywheel import registry
    from flywheel.stages import Registration, decide_promotion

    config, workspace = registry_workspace
    _register(config, workspace, 0, aliases=("champion",))
    _register(config, workspace, 1, aliases=("candidate",))
    registry.set_champion(workspace.tracking_uri, config.model.registered_name, "2", reason="gain 0.1",
                          actor="policy:auto")
    registration = Registration(version="2", aliases=["candidate", "champion"], run_id="r")
    promotion = decide_promotion(config, workspace, registration, None, None)
    assert (promotion.promoted, promotion.version, promotion.previous, promotion.reason) == (True, "2", "1", "gain 0.1")


def test_open_round_reopens_the_run_of_a_failed_attempt(registry_workspace):
    from flywheel import registry
    from flywheel.stages import Champion, open_round

    config, workspace = registry_workspace
    champion = Champion(version="1", path=config.model.base, sha256="")
    first = open_round(config, workspace, champion, 1)
    registry.client(workspace.tracking_uri).set_terminated(first.run_id, status="FAILED")
    again = open_round(config, workspace, champion, 1)
    assert again.run_id == first.run_id
    assert registry.client(workspace.tracking_uri).get_run(first.run_id).info.status == "RUNNING"
    registry.client(workspace.tracking_uri).set_terminated(first.run_id)
    assert open_round(config, workspace, champion, 1).run_id != first.run_id  # a finished run is never reused
