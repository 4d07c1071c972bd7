"""Work-pool routing (deployment.stage_pools): the recipe field, the stage deployments, the journal hand-over between
the round and a stage's own flow run, `flywheel serve` refusing routed recipes, and, on a local Prefect server with
a process worker per pool, a round whose training runs on a second pool (a crashed training run fails the round with
its message; the re-run resumes and completes). The server tests are marked `server`."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from uuid import uuid4

import pytest
from cli import cli_env, flywheel_cmd
from helpers import tiny_recipe, write_recipe
from servers import prefect_server, stop, wait_until

from flywheel.config import ConfigError, FlywheelConfig, parse_config

ROUTED = {"name": "routed", "model": {"registered_name": "tiny-policy"},
          "deployment": {"work_pool": "main-pool", "stage_pools": {"train": "gpu-pool"}}}


# --- no server -------------------------------------------------------------------------------------------------

def test_stage_pools_config():
    assert FlywheelConfig().deployment.stage_pools == {}
    config = parse_config(ROUTED)
    assert config.deployment.stage_pools == {"train": "gpu-pool"}
    # Where a stage runs does not change what it produces: a routed recipe resumes rounds of the unrouted one.
    assert config.config_hash() == parse_config({**ROUTED, "deployment": {}}).config_hash()
    with pytest.raises(ConfigError, match=r"deployment.stage_pools: train: work pool name is empty"):
        parse_config({"deployment": {"stage_pools": {"train": " "}}})
    with pytest.raises(ConfigError, match=r"deployment.stage_pools.judge.*'generate', 'train' or 'evaluate'"):
        parse_config({"deployment": {"stage_pools": {"judge": "gpu-pool"}}})


def test_build_deployments_add_a_stage_deployment_per_routed_stage(tmp_path):
    from flows.deployments import build_deployments, work_pools

    plain = parse_config({**ROUTED, "deployment": {}})
    assert [d.entrypoint.rsplit(".", 1)[1] for d in build_deployments(plain, str(tmp_path))] == [
        "scheduled_round", "evaluate_model", "promote_model"]
    config = parse_config({**ROUTED, "deployment": {"work_pool": "main-pool",
                                                    "stage_pools": {"train": "gpu-pool", "evaluate": "main-pool"}}})
    *_, train, evaluate = build_deployments(config, str(tmp_path))
    assert (train.entrypoint, train.name, train.work_pool_name) == ("flows.stages.train_stage", "routed", "gpu-pool")
    assert (evaluate.entrypoint, evaluate.work_pool_name) == ("flows.stages.evaluate_stage", "main-pool")
    module, name = train.entrypoint.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name).name == "flywheel-stage-train"
    assert "model:tiny-policy" in train.tags and train.parameters["workspace"] == str(tmp_path)
    assert set(train._parameter_openapi_schema.required) == {"config", "workspace", "context"}
    assert work_pools(config) == ["main-pool", "gpu-pool"]
    assert work_pools(config, "other") == ["other", "gpu-pool", "main-pool"]


def test_a_stage_run_continues_the_round_journal(tmp_path):
    """The round looks the stage up, the stage's flow run journals it at the same position, the round reads it back;
    a re-run finds it finished and dispatches nothing."""
    from pydantic import BaseModel, ConfigDict

    from flywheel.journal import JournalError, StageJournal

    class Out(BaseModel):
        model_config = ConfigDict(extra="forbid")
        value: int

    folder = tmp_path / "journal"
    round_journal = StageJournal(folder, "round-0001", "abc")
    assert round_journal.run("prompts", Out, lambda: Out(value=1)).value == 1
    assert round_journal.run("generate", Out, lambda: Out(value=2)).value == 2

    def stage_flow_run() -> Out:
        journal = StageJournal(folder, "round-0001", "abc")  # another process, on another pool
        journal.seek("train")
        return journal.run("train", Out, lambda inputs: Out(value=inputs.value * 10),
                           journal.recorded("generate", Out))

    dispatched = []

    def dispatch() -> Out:
        dispatched.append(stage_flow_run())
        return round_journal.recorded("train", Out)

    assert round_journal.run("train", Out, dispatch).value == 20
    assert round_journal.run("evaluate", Out, lambda: Out(value=3)).value == 3
    assert round_journal.finished() == ["prompts", "generate", "train", "evaluate"]
    again = StageJournal(folder, "round-0001", "abc")
    for name in again.finished():
        assert again.run(name, Out, lambda: pytest.fail(f"{name} ran twice")) is not None
    assert len(dispatched) == 1
    # A stage run that finds its own entry (a retried stage run) returns it instead of running twice.
    stage_again = StageJournal(folder, "round-0001", "abc")
    stage_again.seek("train")
    assert stage_again.run("train", Out, lambda: pytest.fail("train ran twice")).value == 20
    with pytest.raises(JournalError, match="no finished judge stage .* every worker sees"):
        round_journal.recorded("judge", Out)


def test_a_stage_run_that_did_not_complete_fails_the_round():
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Completed, Crashed

    from flows.stages import StageRunFailed, check_stage_run

    crashed = FlowRun(flow_id=uuid4(), name="round-0003-train",
                      state=Crashed(message="Flow run infrastructure exited with non-zero status code -9."))
    with pytest.raises(StageRunFailed, match=r"^train flow run 'round-0003-train' ended Crashed: Flow run "
                                             r"infrastructure exited with non-zero status code -9\.$"):
        check_stage_run("train", crashed)
    check_stage_run("train", FlowRun(flow_id=uuid4(), name="round-0003-train", state=Completed()))


def test_serve_refuses_a_routed_recipe(tmp_path):
    """`flywheel serve` has no workers to route to: one line naming stage_pools, before any server is contacted."""
    recipe = write_recipe(tmp_path / "routed.yaml", ROUTED)
    result = subprocess.run(flywheel_cmd("serve", "--config", str(recipe), "--workspace", str(tmp_path)),
                            cwd=tmp_path, env={**cli_env(tmp_path), "PREFECT_API_URL": "http://127.0.0.1:9/api"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == (
        "error: deployment.stage_pools routes stages to work pools (train -> gpu-pool), which `flywheel serve` "
        "cannot use: register with `flywheel deploy` and start a worker per pool, or remove stage_pools to serve")


def test_run_without_a_server_refuses_a_routed_recipe(tmp_path):
    """A plain `flywheel run` has no pools to route to: preflight says so before anything is written."""
    recipe = write_recipe(tmp_path / "routed.yaml", ROUTED)
    result = subprocess.run(flywheel_cmd("run", "--config", str(recipe), "--workspace", str(tmp_path)),
                            cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == (
        "error: deployment.stage_pools routes stages to work pools (train -> gpu-pool): that needs a Prefect server "
        "(PREFECT_API_URL) with the recipe deployed (`flywheel deploy`) and a worker per pool; remove stage_pools to "
        "run every stage here")
    assert [p.name for p in (tmp_path / ".flywheel").iterdir()] == ["prefect"]  # the CLI's Prefect home, no state


# --- on a local Prefect server, a process worker per pool --------------------------------------------------------

@pytest.fixture(scope="module")
def routed(tiny_model_dir, tmp_path_factory):
    """A tiny recipe deployed with training routed to `gpu-pool`, and a worker on the round's pool `main-pool`."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as api_url:
        saved = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = api_url
        from prefect.settings import PREFECT_API_URL, temporary_settings

        try:
            with temporary_settings({PREFECT_API_URL: api_url}):
                workspace = tmp_path_factory.mktemp("routed-ws")
                recipe = {**tiny_recipe(tiny_model_dir), "name": "tiny-routed", "deployment": ROUTED["deployment"]}
                path = write_recipe(workspace / "recipe.yaml", recipe)
                env = {**cli_env(workspace), "PREFECT_API_URL": api_url, "PREFECT_WORKER_QUERY_SECONDS": "2"}
                deployed = subprocess.run(flywheel_cmd("deploy", "--config", str(path), "--workspace", str(workspace)),
                                          cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
                assert deployed.returncode == 0, deployed.stderr[-4000:]
                assert "deployment flywheel-stage-train/tiny-routed" in deployed.stdout
                for pool in ("main-pool", "gpu-pool"):
                    assert f"start a worker with: prefect worker start --pool {pool}\n" in deployed.stdout
                main = _worker("main-pool", workspace, env)
                try:
                    yield {"workspace": workspace, "env": env, "main": main}
                finally:
                    stop(main["process"], timeout=60)
        finally:
            if saved is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = saved


def _worker(pool: str, workspace: Path, env: dict[str, str], **extra: str) -> dict:
    log = workspace / f"worker-{pool}-{uuid4().hex[:6]}.log"
    with log.open("w") as handle:
        process = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool],
                                   cwd=workspace, stdout=handle, stderr=subprocess.STDOUT, env={**env, **extra})
    return {"process": process, "log": log}


def _client():
    from prefect import get_client

    return get_client(sync_client=True)


def _flow_runs(flow_name: str) -> list:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with _client() as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                     sort=FlowRunSort.START_TIME_ASC)


def _run_round(routed, train_worker: dict) -> object:
    """Run the round deployment and wait for it to end (the workers' logs explain a timeout)."""
    from prefect.deployments import run_deployment

    run = run_deployment("flywheel-scheduled-round/tiny-routed", timeout=0)
    logs = (routed["main"]["log"], train_worker["log"])

    def final():
        with _client() as client:
            current = client.read_flow_run(run.id)
        if current.state.is_final():
            return current
        for worker in (routed["main"], train_worker):
            if worker["process"].poll() is not None:
                tail = worker["log"].read_text()[-3000:]
                raise AssertionError(f"worker exited {worker['process'].returncode}\n{tail}")
        return None

    try:
        return wait_until(final, 420, "routed round", every=2)
    except AssertionError as error:
        raise AssertionError(f"{error}\n" + "\n".join(log.read_text()[-3000:] for log in logs)) from None


@pytest.mark.server
@pytest.mark.timeout(900)  # includes starting the server, `flywheel deploy` and the main pool's worker
def test_a_crashed_stage_run_fails_the_round_with_its_message(routed):
    # The training pool's worker kills its flow run where training starts, as an OOM kill on a GPU node would.
    train_worker = _worker("gpu-pool", routed["workspace"], routed["env"], FLYWHEEL_FAULT_POINT="before:train")
    try:
        done = _run_round(routed, train_worker)
    finally:
        stop(train_worker["process"], timeout=60)
    assert done.state.is_failed(), done.state.message
    [child] = _flow_runs("flywheel-stage-train")
    assert child.work_pool_name == "gpu-pool" and not child.state.is_completed()
    assert child.state.message and child.state.message in done.state.message, done.state.message
    assert f"train flow run {child.name!r} ended {child.state.name}" in done.state.message
    assert not _flow_runs("flywheel-stage-generate") and not _flow_runs("flywheel-stage-evaluate")


@pytest.mark.server
@pytest.mark.timeout(600)
def test_a_routed_stage_runs_as_its_own_flow_run_on_its_pool(routed):
    from flywheel import registry
    from flywheel.stages import RoundRecord

    before = {r.id for r in _flow_runs("flywheel-stage-train")}
    train_worker = _worker("gpu-pool", routed["workspace"], routed["env"])
    try:
        done = _run_round(routed, train_worker)
    finally:
        stop(train_worker["process"], timeout=60)
    logs = routed["main"]["log"].read_text()[-3000:] + train_worker["log"].read_text()[-3000:]
    assert done.state.is_completed(), f"{done.state.message}\n{logs}"
    assert done.work_pool_name == "main-pool"
    [child] = [r for r in _flow_runs("flywheel-stage-train") if r.id not in before]
    assert child.state.is_completed() and child.work_pool_name == "gpu-pool"
    assert re.fullmatch(r"round-\d{4}-train", child.name), child.name
    assert {"flywheel", "model:tiny-policy", "recipe:tiny-routed"} <= set(child.tags)
    assert child.parent_task_run_id is not None  # a subflow of the round: nested under it in the UI
    assert not _flow_runs("flywheel-stage-generate") and not _flow_runs("flywheel-stage-evaluate")
    # The training stage's output reached the round through the journal: the candidate it trained is registered.
    workspace = routed["workspace"]
    [record_path] = sorted((workspace / ".flywheel" / "rounds").glob("*.json"))
    record = RoundRecord.model_validate_json(record_path.read_text())
    assert record.status == "completed" and record.trained is not None
    assert record.name in child.name
    uri = f"sqlite:///{workspace / '.flywheel' / 'mlflow.db'}"
    assert registry.get_version(uri, "tiny-policy", record.registration.version).version == \
        record.registration.version != "1"


@pytest.mark.server
@pytest.mark.timeout(900)  # run alone, it includes the module's server, deploy and worker start
def test_redeploying_without_routing_removes_the_stage_deployment(routed, tiny_model_dir):
    from prefect.exceptions import ObjectNotFound

    from flows.deployments import deploy
    from flywheel.config import parse_config

    recipe = {**tiny_recipe(tiny_model_dir), "name": "tiny-rerouted"}
    workspace = str(routed["workspace"])
    names = deploy(parse_config({**recipe, "deployment": ROUTED["deployment"]}), workspace)
    assert "flywheel-stage-train/tiny-rerouted" in names
    with _client() as client:
        client.read_deployment_by_name("flywheel-stage-train/tiny-rerouted")
    names = deploy(parse_config(recipe), workspace)
    assert not any(name.startswith("flywheel-stage-") for name in names)
    with _client() as client, pytest.raises(ObjectNotFound):
        client.read_deployment_by_name("flywheel-stage-train/tiny-rerouted")
    with _client() as client:  # another recipe's stage deployment is left alone
        client.read_deployment_by_name("flywheel-stage-train/tiny-routed")
