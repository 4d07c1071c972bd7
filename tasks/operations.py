from prefect import task

from flywheel import operations, registry
from flywheel.config import FlywheelConfig
from flywheel.workspace import Workspace


@task(name="evaluate-version")
def evaluate_version(config: FlywheelConfig, workspace: Workspace, ref: str) -> operations.VersionEvaluation:
    return operations.evaluate_version(config, workspace, ref)


@task(name="set-champion", retries=2, retry_delay_seconds=5)
def set_champion(config: FlywheelConfig, workspace: Workspace, ref: str, reason: str, actor: str) -> registry.Promotion:
    return operations.promote(config, workspace, ref, reason=reason, actor=actor)


@task(name="rollback-champion", retries=2, retry_delay_seconds=5)
def rollback_champion(config: FlywheelConfig, workspace: Workspace, reason: str, actor: str) -> registry.Promotion:
    return operations.rollback(config, workspace, reason=reason, actor=actor)
