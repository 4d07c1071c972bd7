"""Pruning gives back copies of weights the registry holds, and refused candidates' weights only when asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel import registry, storage
from flywheel.config import FlywheelConfig
from flywheel.lineage import render, trace
from flywheel.models import METADATA_FILE, ModelError, read_metadata, write_metadata
from flywheel.registry import CANDIDATE, CHAMPION, TAG
from flywheel.workspace import Workspace, WorkspaceBusy, round_lock

NAME = FlywheelConfig().model.registered_name


def _weights(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(content)
    (folder / "tokenizer.json").write_text("{}")
    write_metadata(folder)
    return folder


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    """Five versions and the folders rounds leave: v1 the base; v2 (round 1) and v3 (round 2) refused; v4 (round 3)
    promoted, the champion; v5 (round 4) the candidate. Round 5 is still running: its output has no record yet."""
    ws = Workspace.from_config(FlywheelConfig(), tmp_path)
    experiment = registry.experiment_id(ws.tracking_uri, "tests", ws.mlflow_artifacts)
    mlflow_client = registry.client(ws.tracking_uri)
    ws.records.mkdir(parents=True)
    for number in range(5):
        content = bytes([number]) * (1000 + number)
        if number == 0:
            folder = _weights(ws.models / "base", content)
        else:
            folder = _weights(ws.models / NAME / "rounds" / ws.round_name(number), content)
            (ws.records / f"{ws.round_name(number)}.json").write_text("{}")
        run = mlflow_client.create_run(experiment)
        tags = {f"{TAG}round": str(number), f"{TAG}round_tag": ws.round_name(number) if number else "",
                f"{TAG}model_sha256": read_metadata(folder)["sha256"]}
        registry.register_model_dir(ws.tracking_uri, NAME, folder, run.info.run_id, tags=tags, description="",
                                    aliases=(CHAMPION,) if number == 0 else (CANDIDATE,))
        if number == 3:
            registry.set_champion(ws.tracking_uri, NAME, "4", reason="gain", actor="policy", store=ws.models)
    _weights(ws.models / NAME / "rounds" / ws.round_name(5), b"running" * 100)
    registry.materialize(ws.tracking_uri, registry.get_version(ws.tracking_uri, NAME, "2"), ws.models)  # an eval
    return ws


def _flat_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def _by_location(plan: storage.PrunePlan) -> dict[str, storage.PruneItem]:
    return {item.location: item for item in plan.items}


def test_the_plan_removes_copies_and_keeps_what_rounds_need(workspace):
    plan = storage.plan_prune(workspace, NAME)
    items = _by_location(plan)
    rounds = workspace.models / NAME / "rounds"
    for number, version in ((1, "2"), (2, "3"), (3, "4"), (4, "5")):
        item = items[str(rounds / workspace.round_name(number))]
        assert item.remove and item.version == version and item.reason == f"registered as v{version} (same sha256)"
        assert item.size == _flat_size(Path(item.location)) > 1000 + number
    running = items[str(rounds / workspace.round_name(5))]
    assert not running.remove and "no record yet" in running.reason
    fetched = items[str(workspace.models / NAME / "v2")]
    assert fetched.remove  # fetched for an evaluation, fetched again on use
    # Linked to its registered artifact: removing it gives back only its own checksums file.
    assert fetched.size == (Path(fetched.location) / METADATA_FILE).stat().st_size
    champion = items[str(workspace.models / NAME / "v4")]
    assert not champion.remove and "holds champion" in champion.reason
    assert not any(item.kind == "registered_weights" for item in plan.items)  # only with refused=True
    assert str(workspace.models / "base") not in items


def test_prune_removes_the_copies_and_every_version_is_fetched_again(workspace):
    result = storage.prune(workspace, NAME, actor="tester")
    assert {Path(item.location).name for item in result.removed} == {
        "round-0001", "round-0002", "round-0003", "round-0004", "v2"}
    assert result.freed_bytes == sum(item.size for item in result.removed) > 0
    assert sorted(p.name for p in (workspace.models / NAME / "rounds").iterdir()) == ["round-0005"]
    assert sorted(p.name for p in (workspace.models / NAME).iterdir()) == ["rounds", "v4"]  # nothing left aside
    for version in ("1", "2", "3", "5"):
        info = registry.get_version(workspace.tracking_uri, NAME, version)
        assert (registry.materialize(workspace.tracking_uri, info, workspace.models) / METADATA_FILE).is_file()
    again = storage.prune(workspace, NAME).removed  # the fetched copies but the candidate's, and nothing else
    assert {Path(item.location).name for item in again} == {"v1", "v2", "v3"}


def test_refused_weights_go_only_when_asked_and_their_versions_stay(workspace):
    plan = storage.plan_prune(workspace, NAME, refused=True)
    weights = {item.version: item for item in plan.items if item.kind == "registered_weights"}
    assert sorted(weights) == ["2", "3", "5"]  # v1 and v4 were champions
    assert all(item.size == _flat_size(Path(item.location.removeprefix("file://"))) for item in weights.values())
    assert weights["2"].remove and weights["3"].remove
    # The newest round's candidate is listed, kept, with the reason: refused or not, a promotion may still pick it.
    assert not weights["5"].remove and weights["5"].reason.startswith("holds candidate")

    result = storage.prune(workspace, NAME, refused=True, actor="tester")
    assert {(i.kind, i.version) for i in result.removed if i.kind == "registered_weights"} == {
        ("registered_weights", "2"), ("registered_weights", "3")}
    for version in ("2", "3"):
        info = registry.get_version(workspace.tracking_uri, NAME, version)
        assert info.tags[storage.PRUNED_BY] == "tester" and info.tags[storage.PRUNED_AT]
        assert not Path(info.source.removeprefix("file://")).exists()
        with pytest.raises(ModelError, match=rf"v{version}: its weights were deleted by `flywheel prune --refused`"):
            registry.materialize(workspace.tracking_uri, info, workspace.models)
    with pytest.raises(ModelError, match="deleted"):
        registry.set_champion(workspace.tracking_uri, NAME, "2", reason="r", actor="a", store=workspace.models)
    assert registry.get_version(workspace.tracking_uri, NAME, CHAMPION).version == "4"
    assert "weights            deleted" in render(trace(workspace, NAME, "2"))
    for version in ("1", "4", "5"):  # the champions and the candidate keep their weights
        info = registry.get_version(workspace.tracking_uri, NAME, version)
        assert storage.PRUNED_AT not in info.tags
        assert Path(info.source.removeprefix("file://"), "model.safetensors").is_file()
    # A second prune has no refused candidate left to delete, and no round output of a pruned version to remove.
    assert not any(i.remove for i in storage.plan_prune(workspace, NAME, refused=True).items)


def test_keep_refused_keeps_the_newest(workspace):
    plan = storage.plan_prune(workspace, NAME, refused=True, keep_refused=1)
    weights = {item.version: item for item in plan.items if item.kind == "registered_weights"}
    assert weights["2"].remove and not weights["3"].remove and "--keep-refused" in weights["3"].reason
    rounds = _by_location(plan)
    assert rounds[str(workspace.models / NAME / "rounds" / "round-0001")].reason.startswith("v2 was refused")
    with pytest.raises(ValueError, match="keep_refused"):
        storage.plan_prune(workspace, NAME, refused=True, keep_refused=-1)


def test_a_version_promoted_after_the_plan_keeps_its_weights(workspace, monkeypatch):
    stale = storage.plan_prune(workspace, NAME, refused=True)
    registry.set_champion(workspace.tracking_uri, NAME, "3", reason="a reviewer", actor="a")
    monkeypatch.setattr(storage, "plan_prune", lambda *args, **kwargs: stale)
    removed = storage.prune(workspace, NAME, refused=True).removed
    assert [i.version for i in removed if i.kind == "registered_weights"] == ["2"]
    assert storage.PRUNED_AT not in registry.get_version(workspace.tracking_uri, NAME, "3").tags


def test_folders_that_are_the_only_copy_are_kept(workspace):
    rounds = workspace.models / NAME / "rounds"
    _weights(rounds / "round-0009", b"never registered")
    (workspace.records / "round-0009.json").write_text("{}")
    unfinished = rounds / "round-0010"
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"half written")
    (workspace.records / "round-0010.json").write_text("{}")
    (workspace.models / NAME / "v77").mkdir()
    items = _by_location(storage.plan_prune(workspace, NAME))
    assert not items[str(rounds / "round-0009")].remove and "only copy" in items[str(rounds / "round-0009")].reason
    assert not items[str(unfinished)].remove and "incomplete" in items[str(unfinished)].reason
    assert not items[str(workspace.models / NAME / "v77")].remove


def test_prune_waits_for_no_round(workspace):
    with round_lock(workspace):
        with pytest.raises(WorkspaceBusy):
            storage.prune(workspace, NAME)
    assert (workspace.models / NAME / "rounds" / "round-0001").is_dir()


def test_prune_with_wait_runs_once_the_round_releases_the_lock(workspace):
    import threading

    outcome: dict = {}

    def prune_waiting():
        try:
            outcome["result"] = storage.prune(workspace, NAME, wait=True)
        except WorkspaceBusy as error:  # what a prune without waiting raises at once
            outcome["error"] = error

    with round_lock(workspace):
        pruner = threading.Thread(target=prune_waiting)
        pruner.start()
        pruner.join(timeout=0.5)
        assert pruner.is_alive() and not outcome, "prune went ahead while a round held the workspace"
        assert (workspace.models / NAME / "rounds" / "round-0001").is_dir()
    pruner.join(timeout=60)
    assert "error" not in outcome
    assert not (workspace.models / NAME / "rounds" / "round-0001").exists()
    assert str(workspace.models / NAME / "rounds" / "round-0001") in {i.location for i in outcome["result"].removed}


def test_the_command_shows_the_plan_and_prunes(workspace, monkeypatch):
    from typer.testing import CliRunner

    from flywheel.cli import app

    for key in ("MLFLOW_TRACKING_URI", "PREFECT_HOME", "FLYWHEEL_WORKSPACE"):
        monkeypatch.delenv(key, raising=False)  # the CLI points these at the workspace; restored after the test
    monkeypatch.setenv("COLUMNS", "200")
    args = ["prune", "--workspace", str(workspace.root)]
    dry = CliRunner().invoke(app, [*args, "--dry-run", "--refused"])
    assert dry.exit_code == 0, dry.output
    assert "registered weights" in dry.output and "would free" in dry.output
    assert (workspace.models / NAME / "rounds" / "round-0001").is_dir()
    done = CliRunner().invoke(app, [*args, "--refused", "--keep-refused", "1", "--actor", "night-shift"])
    assert done.exit_code == 0, done.output
    assert "freed" in done.output
    assert registry.get_version(workspace.tracking_uri, NAME, "2").tags[storage.PRUNED_BY] == "night-shift"
    assert storage.PRUNED_AT not in registry.get_version(workspace.tracking_uri, NAME, "3").tags
    assert not (workspace.models / NAME / "rounds" / "round-0001").exists()
