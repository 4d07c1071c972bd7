from prefect import task

from flywheel import stages
from flywheel.config import FlywheelConfig
from flywheel.workspace import Workspace


@task(name="prepare-workspace", retries=1)
def prepare_workspace(config: FlywheelConfig, workspace: Workspace) -> Workspace:
    return stages.prepare_workspace(config, workspace)


@task(name="resolve-champion", retries=2, retry_delay_seconds=5)
def resolve_champion(config: FlywheelConfig, workspace: Workspace) -> stages.Champion:
    return stages.resolve_champion(config, workspace)


@task(name="open-round", retries=2, retry_delay_seconds=5)
def open_round(config: FlywheelConfig, workspace: Workspace, champion: stages.Champion) -> stages.RoundContext:
    return stages.open_round(config, workspace, champion, stages.next_round_number(workspace))
