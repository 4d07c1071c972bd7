from prefect import task
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_table_artifact

from flywheel import stages
from flywheel.config import FlywheelConfig
from flywheel.quality import enforce
from flywheel.workspace import Workspace


@task(name="quality-gate")
def quality_gate(config: FlywheelConfig, workspace: Workspace, context: stages.RoundContext,
                 split: stages.PromptSplit, data: stages.RoundData) -> stages.QualityResult:
    result = stages.quality_gate(config, workspace, context, split, data)
    rows = [
        {"table": t.table, "rows": t.rows, "failed_rows": t.failed_rows, "success": t.success}
        for t in result.report.tables
    ]
    create_table_artifact(rows, key=f"quality-{context.name}", description=f"Quality gate of {context.name}")
    stages.log_metrics(workspace, context.run_id, {
        "quality.failed_fraction": result.report.failed_fraction, "quality.quarantined": result.quarantined,
    })
    if result.report.data_docs_path:
        create_link_artifact(Path(result.report.data_docs_path).resolve().as_uri(), link_text="Great Expectations Data Docs",
                             key=f"data-docs-{context.name}", description=f"Validation results of {context.name}")
    stages.log_quality_artifacts(workspace, context, result)
    enforce(result.report)  # fails the run loudly, after the quarantine and report are on disk
    return result
