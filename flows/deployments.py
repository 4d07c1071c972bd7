"""Deployments: the scheduled round (cron from the recipe, nightly by default), evaluation only, and promotion.

`flywheel serve` runs them in its own process against a Prefect server; `flywheel deploy` registers them with a
work pool for `prefect worker start --pool ...`, plus one deployment per stage that ``deployment.stage_pools`` routes
to a pool of its own (flows/stages.py). At most one round per registered model runs at a time: a round
holds the Prefect global concurrency limit ``flywheel-round-<registered_name>`` (limit 1) from start to finish, so
two schedules, a manual run and a retry can never train from the same champion at once.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger, tags
from prefect.concurrency.sync import concurrency

from flows.artifacts import publish_round
from flows.evaluate import evaluate_model
from flows.notifications import emit_champion_changed
from flows.promote import promote_model
from flows.round import flywheel_round
from flows.stages import STAGE_FLOW_OBJECTS
from flywheel.config import FlywheelConfig
from flywheel.operations import round_slot_name
from flywheel.stages import RoundRecord
from flywheel.workspace import Workspace

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment


class RoundSlotBusy(RuntimeError):
    """Another round of the same registered model holds the round slot."""


def _run_name() -> str:
    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config") or {}
    name = config.get("model", {}).get("registered_name", "flywheel-policy") if isinstance(config, dict) else \
        config.model.registered_name
    return f"{name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def run_tags(config: FlywheelConfig) -> list[str]:
    return ["flywheel", f"model:{config.model.registered_name}", f"recipe:{config.name}"]


def ensure_round_slot(config: FlywheelConfig) -> str:
    """Create the model's round slot (a global concurrency limit of 1) if the server has none yet."""
    from prefect import get_client

    name = round_slot_name(config)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    return name


@flow(name="flywheel-scheduled-round", flow_run_name=_run_name)
def scheduled_round(config: FlywheelConfig = FlywheelConfig(), workspace: str | None = None) -> RoundRecord:
    """One round under the model's round slot, then its summary, results table and links on the run page."""
    logger = get_run_logger()
    slot = ensure_round_slot(config)
    timeout = config.deployment.round_slot_timeout_s
    logger.info(f"waiting for round slot {slot!r}" + (f" (at most {timeout} s)" if timeout else ""))
    try:
        with concurrency(slot, occupy=1, timeout_seconds=timeout, strict=True):
            logger.info(f"holding round slot {slot!r}")
            with tags(*run_tags(config)):
                record = flywheel_round(config, workspace)
    except TimeoutError:
        raise RoundSlotBusy(f"another round of {config.model.registered_name!r} held round slot {slot!r} for more "
                            f"than {timeout} s: not starting a second round from the same champion") from None
    if record.promotion is not None:
        emit_champion_changed(record.promotion)
    publish_round(record, config.model.registered_name, Workspace.from_config(config, workspace).tracking_uri)
    return record


def build_deployments(config: FlywheelConfig, workspace: str, cron: str | None = None,
                      timezone_name: str | None = None) -> list[RunnerDeployment]:
    """The three deployments of one recipe, named after it; every run gets the recipe and workspace as parameters."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    settings = config.deployment
    if cron is not None or timezone_name is not None:
        # Validate an override exactly as a recipe value would be validated.
        from pydantic import ValidationError

        try:
            settings = type(settings).model_validate(
                {**settings.model_dump(), "cron": cron or settings.cron, "timezone": timezone_name or settings.timezone})
        except ValidationError as error:
            problem = error.errors()[0]
            raise ValueError(f"deployment.{problem['loc'][0]}: {problem['msg'].removeprefix('Value error, ')}") from None
    params = {"config": config.model_dump(mode="json"), "workspace": str(workspace)}
    common = dict(tags=run_tags(config), entrypoint_type=EntrypointType.MODULE_PATH)
    # A routed stage's deployment carries its pool; the round passes the round context when it runs it.
    routed = [
        STAGE_FLOW_OBJECTS[stage].to_deployment(
            config.name, parameters=params, work_pool_name=pool,
            description=f"The {stage} stage of {config.model.registered_name}'s rounds, on work pool {pool}", **common)
        for stage, pool in config.deployment.stage_pools.items()
    ]
    return [
        scheduled_round.to_deployment(
            config.name, parameters=params,
            schedules=[Cron(settings.cron, timezone=settings.timezone, active=settings.schedule_active)],
            description=f"One flywheel round of {config.model.registered_name} ({settings.cron}, {settings.timezone})",
            **common),
        evaluate_model.to_deployment(
            config.name, parameters={**params, "ref": "champion"},
            description=f"Score a version of {config.model.registered_name} on the held-out prompts", **common),
        promote_model.to_deployment(
            config.name, parameters={**params, "version": "candidate", "action": "promote"},
            description=f"Move the champion alias of {config.model.registered_name}", **common),
        *routed,
    ]


def work_pools(config: FlywheelConfig, work_pool: str | None = None) -> list[str]:
    """The pools `deploy` registers with: the round's, then each routed stage's (each once)."""
    return list(dict.fromkeys([work_pool or config.deployment.work_pool, *config.deployment.stage_pools.values()]))


def serve(config: FlywheelConfig, workspace: str, cron: str | None = None, limit: int | None = None) -> None:
    """Register the deployments and run their scheduled and triggered runs in this process until interrupted."""
    from prefect import serve as prefect_serve

    if config.deployment.stage_pools:
        # A served round has no workers to hand a stage to; running it here instead would ignore the recipe.
        routes = ", ".join(f"{stage} -> {pool}" for stage, pool in config.deployment.stage_pools.items())
        raise ValueError(f"deployment.stage_pools routes stages to work pools ({routes}), which `flywheel serve` "
                         f"cannot use: register with `flywheel deploy` and start a worker per pool, or remove "
                         f"stage_pools to serve")
    prefect_serve(*build_deployments(config, workspace, cron), limit=limit, print_starting_message=True)


def deploy(config: FlywheelConfig, workspace: str, cron: str | None = None, work_pool: str | None = None) -> list[str]:
    """Register the deployments with their work pools (each created as a process pool if missing): the round's
    pool, and for each routed stage (``deployment.stage_pools``) its own. A worker per pool runs them."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    pool = work_pool or config.deployment.work_pool
    with get_client(sync_client=True) as client:
        for name in work_pools(config, work_pool):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                from prefect.workers.process import ProcessWorker

                client.create_work_pool(WorkPoolCreate(
                    name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
    ensure_round_slot(config)
    names = []
    for deployment in build_deployments(config, workspace, cron):
        deployment.apply(work_pool_name=deployment.work_pool_name or pool)
        names.append(deployment.full_name)
    remove_unrouted_stage_deployments(config)
    return names


def remove_unrouted_stage_deployments(config: FlywheelConfig) -> None:
    """Delete this recipe's stage deployments for stages the recipe no longer routes: a stale one is never run by
    the round, but would show in the UI (and in `prefect deployment ls`) as if the stage still went to its pool."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.stages import STAGE_FLOWS

    with get_client(sync_client=True) as client:
        for stage, flow_name in STAGE_FLOWS.items():
            if stage in config.deployment.stage_pools:
                continue
            try:
                stale = client.read_deployment_by_name(f"{flow_name}/{config.name}")
            except ObjectNotFound:
                continue
            client.delete_deployment(stale.id)
