"""Several rounds in a row: each round starts from whatever `champion` points at when it begins."""

from __future__ import annotations

from prefect import flow

from flows.round import flywheel_round
from flywheel.config import FlywheelConfig
from flywheel.stages import RoundRecord


@flow(name="flywheel")
def flywheel(config: FlywheelConfig = FlywheelConfig(), rounds: int = 1, workspace: str | None = None,
             wait: bool = False, restart: bool = False) -> list[RoundRecord]:
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    from flows.artifacts import publish_round
    from flywheel.workspace import Workspace

    records = []
    for i in range(rounds):
        # ``restart`` concerns the unfinished round this run may find, i.e. only the first.
        record = flywheel_round(config, workspace, wait=wait, restart=restart and i == 0)
        publish_round(record, config.model.registered_name, Workspace.from_config(config, workspace).tracking_uri)
        records.append(record)
    return records
