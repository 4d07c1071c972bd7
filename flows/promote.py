"""Promotion: move `champion` to a version (or back, with rollback), record who and why, and announce it."""

from __future__ import annotations

import os

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.artifacts import artifact_key
from flows.notifications import emit_champion_changed
from flywheel import registry
from flywheel.config import FlywheelConfig
from flywheel.operations import mlflow_version_url
from flywheel.workspace import Workspace
from tasks.operations import rollback_champion, set_champion


@flow(name="flywheel-promote", flow_run_name="{action}-{version}")
def promote_model(config: FlywheelConfig = FlywheelConfig(), version: str = registry.CANDIDATE,
                  action: str = "promote", reason: str = "promoted through Prefect",
                  actor: str = os.environ.get("USER", "prefect"), workspace: str | None = None) -> registry.Promotion:
    if action not in ("promote", "rollback"):
        raise ValueError(f"action must be 'promote' or 'rollback', got {action!r}")
    ws = Workspace.from_config(config, workspace)
    if action == "rollback":
        result = rollback_champion(config, ws, reason, actor)
    else:
        result = set_champion(config, ws, version, reason, actor)
    emit_champion_changed(result, rollback=action == "rollback")
    link = mlflow_version_url(ws.tracking_uri, result.name, result.version)
    create_markdown_artifact(
        f"## {result.name}: champion {'-> v' + result.version if result.promoted else 'unchanged'}\n\n"
        f"previous: v{result.previous or '-'}\n\nreason: {result.reason}\n\nby: {actor}\n\n"
        + (f"[MLflow model version]({link})\n" if link else ""),
        key=artifact_key("promotion", result.name),
    )
    return result
