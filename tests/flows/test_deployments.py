"""Deployments: definitions load; on a local Prefect server a schedule creates a tiny round that completes, the
round slot blocks a second concurrent round, notifications reach a webhook, and the evaluation and promotion
deployments run. The server tests are marked `server` (run alone with: -m server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli import cli_env, flywheel_cmd, run_cli
from helpers import tiny_recipe, write_recipe
from servers import Receiver, prefect_server, stop, wait_until

from flywheel.config import FlywheelConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]


# --- definitions, no server -------------------------------------------------------------------------------------

def test_prefect_yaml_entrypoints_load_and_parameters_validate():
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = {}
    for deployment in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        names[flow.name] = deployment
        validated = flow.validate_parameters(deployment["parameters"])
        assert isinstance(validated["config"], FlywheelConfig)
        assert deployment["work_pool"]["name"] == "flywheel"
        for schedule in deployment.get("schedules", []):
            Cron(schedule["cron"], timezone=schedule["timezone"])
    assert set(names) == {"flywheel-scheduled-round", "flywheel-evaluate", "flywheel-promote"}
    assert names["flywheel-scheduled-round"]["schedules"][0]["cron"] == FlywheelConfig().deployment.cron


def test_build_deployments_carry_recipe_schedule_and_tags(tmp_path):
    from flows.deployments import build_deployments
    from flows.round import flywheel_round  # noqa: F401  (the round flow the scheduled one wraps)

    config = parse_config({"name": "nightly-test", "model": {"registered_name": "tiny-policy"},
                           "deployment": {"timezone": "Europe/Paris"}})
    rounds, evaluate, promote = build_deployments(config, str(tmp_path))
    assert rounds.name == evaluate.name == promote.name == "nightly-test"
    assert [d.entrypoint for d in (rounds, evaluate, promote)] == [
        "flows.deployments.scheduled_round", "flows.evaluate.evaluate_model", "flows.promote.promote_model"]
    schedule = rounds.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("0 2 * * *", "Europe/Paris")  # nightly by default
    assert not evaluate.schedules and not promote.schedules
    assert "model:tiny-policy" in rounds.tags
    assert FlywheelConfig.model_validate(rounds.parameters["config"]) == config
    assert rounds.parameters["workspace"] == str(tmp_path)
    override = build_deployments(config, str(tmp_path), cron="*/15 * * * *")[0].schedules[0].schedule
    assert override.cron == "*/15 * * * *"
    with pytest.raises(ValueError, match="invalid cron expression"):
        build_deployments(config, str(tmp_path), cron="every night")


def test_serve_and_deploy_need_a_server(tmp_path):
    for command in ("serve", "deploy"):
        result = run_cli(tmp_path, command, "--workspace", str(tmp_path), check=False)
        assert result.returncode == 2, result.stderr
        assert "needs a Prefect server" in result.stderr and "PREFECT_API_URL" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    # A bad schedule is refused before any server is contacted (this URL answers nothing).
    bad = subprocess.run(flywheel_cmd("serve", "--workspace", str(tmp_path), "--cron", "every night"), cwd=tmp_path,
                         env={**cli_env(tmp_path), "PREFECT_API_URL": "http://127.0.0.1:9/api"},
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "error: deployment.cron: invalid cron expression 'every night' (Wrong number of fields)"


# --- on a local Prefect server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as api_url:
        saved = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = api_url
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api_url}):
            yield api_url
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved


@pytest.fixture(scope="module")
def receiver():
    with Receiver() as hook:
        yield hook


@pytest.fixture(scope="module")
def served(server, receiver, tiny_model_dir, tmp_path_factory):
    """`flywheel serve` of a tiny recipe, scheduled every minute, with notifications to the receiver."""
    workspace = tmp_path_factory.mktemp("served-ws")
    recipe_data = tiny_recipe(tiny_model_dir)
    recipe = write_recipe(workspace / "recipe.yaml", recipe_data)
    env = {**cli_env(workspace), "PREFECT_API_URL": server, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = workspace / "serve.log"
    with log.open("w") as handle:
        process = subprocess.Popen(
            flywheel_cmd("serve", "--config", str(recipe), "--workspace", str(workspace), "--cron", "* * * * *",
                         "--notify-url", receiver.url),
            cwd=workspace, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: _deployment("flywheel-promote/tiny", missing_ok=True), 240, "flywheel serve", process, log)
        yield {"workspace": workspace, "recipe": recipe_data, "log": log, "process": process}
    finally:
        stop(process, timeout=60)


def _deployment(name: str, missing_ok: bool = False):
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            if missing_ok:
                return None
            raise


def _runs(flow_name: str, state: str | None = None):
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
    )

    run_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state]))) if state else None
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                     flow_run_filter=run_filter)


def _run(flow_run_id):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _final(flow_run_id, timeout: float, served) -> object:
    return wait_until(lambda: (run := _run(flow_run_id)).state.is_final() and run, timeout,
                      f"flow run {flow_run_id}", served["process"], served["log"], every=2)


def _artifacts(flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def _mlflow(served) -> str:
    return f"sqlite:///{served['workspace'] / '.flywheel' / 'mlflow.db'}"


@pytest.mark.server
@pytest.mark.timeout(900)  # includes starting the server and `flywheel serve` (the module's fixtures)
def test_schedule_creates_a_round_that_completes(served):
    from prefect import get_client

    from flywheel import registry

    deployment = _deployment("flywheel-scheduled-round/tiny")
    assert deployment.schedules[0].schedule.cron == "* * * * *"

    def started():
        return [r for r in _runs("flywheel-scheduled-round")
                if r.deployment_id == deployment.id and r.state.type.value != "SCHEDULED"]

    # The server's scheduler creates runs on the cron; the served process starts the first when it is due.
    first = wait_until(started, 180, "a scheduled run that started", served["process"], served["log"], every=2)[0]
    assert first.auto_scheduled
    # Stop the schedule so later tests control which rounds run.
    with get_client(sync_client=True) as client:
        client.pause_deployment(deployment.id)
        for run in _runs("flywheel-scheduled-round", "SCHEDULED"):
            client.delete_flow_run(run.id)
    done = _final(first.id, 480, served)
    assert done.state.is_completed(), done.state.message
    assert {"flywheel", "model:tiny-policy", "recipe:tiny"} <= set(done.tags)
    rounds = _runs("flywheel-round")
    assert len(rounds) == 1 and rounds[0].parent_task_run_id is not None and rounds[0].state.is_completed()
    # tiny_recipe promotes by policy: the round's candidate became the champion
    assert registry.get_version(_mlflow(served), "tiny-policy", "champion").version == "2"
    artifacts = _artifacts(first.id)
    keys = {a.key for a in artifacts}
    assert {"round-results-tiny-policy", "round-per-type-tiny-policy", "round-summary-tiny-policy",
            "round-plot-tiny-policy"} <= keys
    per_type = next(a for a in artifacts if a.key == "round-per-type-tiny-policy").data
    per_type = json.loads(per_type) if isinstance(per_type, str) else per_type
    assert per_type and {"instruction type", "champion", "candidate", "lost", "gained"} <= set(per_type[0])
    summary = next(a for a in artifacts if a.key == "round-summary-tiny-policy").data
    assert "champion at start: v1" in summary and "candidate: v2" in summary
    plot = next(a for a in artifacts if a.key == "round-plot-tiny-policy")
    assert plot.type == "image" and plot.data.startswith("data:image/png;base64,")


@pytest.mark.server
@pytest.mark.timeout(600)
def test_round_slot_blocks_a_second_concurrent_round(served):
    from prefect import get_client
    from prefect.deployments import run_deployment

    from flywheel.operations import round_slot_name
    from flywheel.prefect_review import paused_rounds, resume_round

    before = {r.id for r in _runs("flywheel-round")}
    holding = parse_config({**served["recipe"], "review": {"mode": "required", "timeout_s": 600}})
    first = run_deployment("flywheel-scheduled-round/tiny", timeout=0,
                           parameters={"config": holding.model_dump(mode="json")})
    paused = wait_until(paused_rounds, 400, "round paused for review", served["process"], served["log"], every=2)
    assert len(paused) == 1
    waiting = parse_config({**served["recipe"], "deployment": {"round_slot_timeout_s": 5}})
    second = run_deployment("flywheel-scheduled-round/tiny", timeout=0,
                            parameters={"config": waiting.model_dump(mode="json")})
    blocked = _final(second.id, 120, served)
    assert blocked.state.is_failed()
    assert "held round slot" in blocked.state.message or "held round slot" in served["log"].read_text()
    started = {r.id for r in _runs("flywheel-round")} - before
    assert len(started) == 1, "the second run started a round although the first held the slot"
    with get_client(sync_client=True) as client:
        slot = client.read_global_concurrency_limit_by_name(round_slot_name(waiting))
        assert slot.limit == 1 and slot.active_slots == 1
    resume_round(paused[0].flow_run_id, approve=False, reviewer="tester", notes="slot test")
    done = _final(first.id, 300, served)
    assert done.state.is_completed(), done.state.message
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(round_slot_name(waiting)).active_slots == 0


@pytest.mark.server
@pytest.mark.timeout(600)
def test_evaluation_and_promotion_deployments(served):
    from prefect.deployments import run_deployment

    from flywheel import registry

    evaluation = run_deployment("flywheel-evaluate/tiny", parameters={"ref": "1"}, timeout=0)
    done = _final(evaluation.id, 300, served)
    assert done.state.is_completed(), done.state.message
    table = next(a for a in _artifacts(evaluation.id) if a.key == "evaluation-tiny-policy-v1")
    assert "instruction type" in table.data
    summary = next(a for a in _artifacts(evaluation.id) if a.key == "evaluation-summary-tiny-policy").data
    assert f"on {served['recipe']['prompts']['eval_limit']} held-out prompts" in summary
    rollback = run_deployment("flywheel-promote/tiny", parameters={"action": "rollback", "reason": "test rollback"},
                              timeout=0)
    done = _final(rollback.id, 120, served)
    assert done.state.is_completed(), done.state.message
    assert registry.get_version(_mlflow(served), "tiny-policy", "champion").version == "1"


@pytest.mark.server
@pytest.mark.timeout(400)
def test_notifications_reach_the_webhook(served, receiver):
    """Failure (the blocked round), pause for review and champion changes (promotion, rollback) were announced."""
    def subjects():
        return [post.get("subject") for post in receiver.posts]

    # `flywheel promote` from a terminal is announced too (champion is v1 after the rollback test).
    workspace = served["workspace"]
    recipe = write_recipe(workspace / "cli-recipe.yaml", served["recipe"])
    promoted = subprocess.run(flywheel_cmd("promote", "2", "--config", str(recipe), "--workspace", str(workspace),
                                           "--reason", "promoted from the terminal"), cwd=workspace,
                              env={**cli_env(workspace), "PREFECT_API_URL": os.environ["PREFECT_API_URL"]},
                              capture_output=True, text=True, timeout=300)
    assert promoted.returncode == 0 and "champion -> v2 (was v1)" in promoted.stdout, promoted.stderr[-3000:]
    wanted = {"flywheel: run failed", "flywheel: round waiting for review", "flywheel: champion changed"}
    wait_until(lambda: wanted <= set(subjects()), 90, f"notifications (got {subjects()})", every=2)
    bodies = [post["body"] for post in receiver.posts]
    assert any("held round slot" in body for body in bodies if "Failed" in body), bodies
    assert any("champion is now v2 (was v1)" in body for body in bodies), bodies
    wait_until(lambda: any("rolled-back" in p["body"] and "champion is now v1" in p["body"] for p in receiver.posts),
               60, "rollback notification")
    wait_until(lambda: any("promoted from the terminal" in p["body"] for p in receiver.posts), 60,
               "terminal promotion notification")


@pytest.mark.server
@pytest.mark.timeout(400)
def test_deploy_registers_with_a_work_pool_that_a_worker_runs(served, server, tmp_path):
    from prefect import get_client
    from prefect.deployments import run_deployment

    from flywheel import registry

    workspace = served["workspace"]
    recipe = write_recipe(tmp_path / "pool.yaml", {**served["recipe"], "name": "tiny-pool"})
    env = {**cli_env(workspace), "PREFECT_API_URL": server}
    result = subprocess.run(flywheel_cmd("deploy", "--config", str(recipe), "--workspace", str(workspace),
                                         "--pool", "test-pool", "--cron", "0 3 * * *"),
                            cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "prefect worker start --pool test-pool" in result.stdout
    rounds = _deployment("flywheel-scheduled-round/tiny-pool")
    assert rounds.work_pool_name == "test-pool" and rounds.schedules[0].schedule.cron == "0 3 * * *"
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("test-pool").type == "process"
    # A process worker on that pool runs a promotion registered by `flywheel deploy`.
    before = registry.get_version(_mlflow(served), "tiny-policy", "champion").version
    target = "2" if before == "1" else "1"
    run = run_deployment("flywheel-promote/tiny-pool", timeout=0,
                         parameters={"version": target, "reason": "worker test", "actor": "tester"})
    log = tmp_path / "worker.log"
    with log.open("w") as handle:
        worker = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool",
                                   "test-pool"], cwd=workspace, stdout=handle, stderr=subprocess.STDOUT,
                                  env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"})
    try:
        done = wait_until(lambda: (r := _run(run.id)).state.is_final() and r, 300, "worker run", worker, log, every=2)
    finally:
        stop(worker, timeout=60)
    assert done.state.is_completed(), f"{done.state.message}\n{log.read_text()[-3000:]}"
    champion = registry.get_version(_mlflow(served), "tiny-policy", "champion")
    assert champion.version == target and champion.tags["flywheel.promoted_by"] == "tester"
