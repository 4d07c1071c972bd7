"""Evaluation only: score one registered version (number or alias) on the held-out prompts, no training."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.artifacts import artifact_key
from flywheel import registry
from flywheel.config import FlywheelConfig
from flywheel.operations import VersionEvaluation, mlflow_version_url
from flywheel.workspace import Workspace
from tasks.operations import evaluate_version


@flow(name="flywheel-evaluate", flow_run_name="evaluate-{ref}")
def evaluate_model(config: FlywheelConfig = FlywheelConfig(), ref: str = registry.CHAMPION,
                   workspace: str | None = None) -> VersionEvaluation:
    ws = Workspace.from_config(config, workspace)
    result = evaluate_version(config, ws, ref)
    scores = result.scores
    create_table_artifact(
        [{"instruction type": kind, "accuracy": round(value, 4)} for kind, value in scores.per_type.items()],
        key=artifact_key("evaluation", result.name, f"v{result.version}"),
        description=f"Held-out accuracy per instruction type of {result.name} v{result.version}",
    )
    link = mlflow_version_url(ws.tracking_uri, result.name, result.version)
    create_markdown_artifact(
        f"## {result.name} v{result.version} ({ref}) on {scores.prompts} held-out prompts\n\n"
        f"| figure | value |\n| --- | --- |\n| prompt accuracy | {scores.prompt_accuracy:.3f} |\n"
        f"| constraint accuracy | {scores.constraint_accuracy:.3f} |\n| truncated | {scores.truncated_share:.3f} |\n"
        f"| probe perplexity | {result.perplexity:.2f} |\n"
        + (f"| probe perplexity against the base (v{result.base_version}) | "
           f"{result.perplexity_increase_vs_base:+.1%} |\n" if result.perplexity_increase_vs_base is not None else "")
        + "\n" + (f"[MLflow model version]({link})\n" if link else ""),
        key=artifact_key("evaluation-summary", result.name),
    )
    return result
